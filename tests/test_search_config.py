"""The search experiments compose into the sweeper they promise: pruner, objectives, directions."""

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from conftest import CONF_DIR


@pytest.fixture
def sweeper_of():
    import embft.app  # noqa: F401  (registers the schema and resolvers)

    def _sweeper(experiment: str, *overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={experiment}", *overrides], return_hydra_config=True)
        return cfg, instantiate(cfg.hydra.sweeper).sweeper  # what Hydra builds for `-m`

    yield _sweeper
    GlobalHydra.instance().clear()


def test_search_prunes_with_the_median_pruner_after_its_warmup(sweeper_of):
    cfg, sweeper = sweeper_of("search")
    assert isinstance(sweeper.pruner, optuna.pruners.MedianPruner)
    assert cfg.hydra.sweeper.pruner.n_startup_trials == 5 and cfg.eval.every_steps == 50
    assert sweeper.directions == ["maximize"] and sweeper.metric_names == ["accuracy_cosine"]


def test_pruner_none_turns_pruning_off(sweeper_of):
    _, sweeper = sweeper_of("search", "hydra/sweeper/pruner=none")
    assert isinstance(sweeper.pruner, optuna.pruners.NopPruner)


def test_tradeoff_search_directions_follow_its_objectives(sweeper_of):
    cfg, sweeper = sweeper_of("search_tradeoff")
    assert [o.metric for o in cfg.objectives] == ["accuracy_cosine", "train_seconds"]
    assert sweeper.directions == ["maximize", "minimize"]
    assert sweeper.metric_names == ["accuracy_cosine", "train_seconds"]
