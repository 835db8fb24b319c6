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

    def _sweeper(experiment: str, *overrides: str, build: bool = True):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={experiment}", *overrides], return_hydra_config=True)
        return cfg, instantiate(cfg.hydra.sweeper).sweeper if build else None  # what Hydra builds for `-m`

    yield _sweeper
    GlobalHydra.instance().clear()


def test_search_prunes_with_the_median_pruner_after_its_warmup(sweeper_of):
    cfg, sweeper = sweeper_of("search")
    assert isinstance(sweeper.pruner, optuna.pruners.MedianPruner)
    assert cfg.hydra.sweeper.pruner.n_startup_trials == 5 and cfg.eval.every_steps == 50
    assert sweeper.directions == ["maximize"] and sweeper.metric_names == ["val_accuracy_cosine"]


def test_pruner_none_turns_pruning_off(sweeper_of):
    _, sweeper = sweeper_of("search", "hydra/sweeper/pruner=none")
    assert isinstance(sweeper.pruner, optuna.pruners.NopPruner)


def test_tradeoff_search_directions_follow_its_objectives(sweeper_of):
    cfg, sweeper = sweeper_of("search_tradeoff")
    assert [o.metric for o in cfg.objectives] == ["val_accuracy_cosine", "train_seconds"]
    assert sweeper.directions == ["maximize", "minimize"]
    assert sweeper.metric_names == ["val_accuracy_cosine", "train_seconds"]


def test_jobs_find_the_parent_key_their_multirun_created(sweeper_of):
    from types import SimpleNamespace as NS

    from embft import study_runs

    cfg, _ = sweeper_of("search", "hydra.sweep.dir=multirun/search/2026-11-30_05-00-00")
    assert (
        study_runs.parent_key(cfg)
        == "study:search"
        == study_runs.job_parent_key("search", "search/2026-11-30_05-00-00")
    )
    grid, _ = sweeper_of("smoke", "hydra.sweep.dir=multirun/smoke/2026-11-30_05-00-00", build=False)
    assert (
        study_runs.parent_key(grid)
        == "sweep:smoke/2026-11-30_05-00-00"
        == study_runs.job_parent_key(None, "smoke/2026-11-30_05-00-00")
    )
    assert study_runs.job_parent_key(None, None) is None  # a single run has no parent

    def run(status, **tags):
        return NS(info=NS(status=status), data=NS(tags=tags))

    runs = [run("FINISHED"), run("FINISHED", **{"optuna.pruned": "true"}), run("FAILED")]
    assert study_runs.count_runs(runs) == {"FINISHED": 1, "PRUNED": 1, "FAILED": 1}
