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

    from embft.tracking import study_runs

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


def _multirun(root, *overrides: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "EMBFT_ROOT": str(root), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "embft", "-m", "experiment=search", *overrides],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("override", "instead"),
    [
        ("hydra.sweeper.pruner=median", "write hydra/sweeper/pruner=median (choices: none, median, successive_halving"),
        ("hydra.sweeper.sampler=tpe", "write hydra/sweeper/sampler=tpe (choices: tpe, random, grid"),
    ],
)
def test_a_sweeper_node_of_the_wrong_shape_stops_before_any_run_in_one_line(tmp_path, override, instead):
    done = _multirun(tmp_path, override)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 1, output
    assert len(output.splitlines()) == 1 and override in output and instead in output, output
    assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output
    # Checked before the MLflow store, the study's parent run or the Optuna study exist.
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "multirun").exists(), list(tmp_path.rglob("*"))


@pytest.mark.parametrize(
    ("override", "says"),
    [
        (
            "train.temperature=interval(5, 1)",
            "search parameter train.temperature: train.temperature=interval(5, 1): `low <= high`",
        ),
        (
            "train.learning_rate=tag(log, interval(0, 1))",
            "search parameter train.learning_rate: train.learning_rate=tag(log, interval(0, 1)): `low > 0`",
        ),
        (
            "hydra/sweeper/sampler=grid",
            "sampler=grid visits choice(...) and range(...) params only; train.learning_rate",
        ),
    ],
)
def test_a_search_range_optuna_cannot_search_stops_before_the_store_in_one_line(tmp_path, override, says):
    done = _multirun(tmp_path, override)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 1, output
    assert len(output.splitlines()) == 1 and says in output, output
    assert "Traceback" not in output
    # Refused before the MLflow store, the study's parent run or the Optuna store (mlruns/optuna.db) exist.
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "multirun").exists(), list(tmp_path.rglob("*"))


def test_the_sweeper_built_without_the_app_gives_the_same_one_line_fix(sweeper_of):
    from hydra.errors import InstantiationException

    cfg, _ = sweeper_of("search", build=False)
    # Imported after Hydra's plugin scan, which re-executes the plugin's modules.
    from hydra_plugins.embft_optuna_sweeper.checks import check_sweeper_node

    check_sweeper_node(cfg.hydra.sweeper)  # the search as shipped is well formed
    with pytest.raises(InstantiationException, match="write hydra/sweeper/pruner=median"):
        sweeper_of("search", "hydra.sweeper.pruner=median")
    for overrides, message in [
        (
            ["hydra.sweeper.sampler._target_=optuna.samplers.NoSuchSampler"],
            "sampler._target_=optuna.samplers.NoSuchSampler",
        ),
        (
            ["+hydra.sweeper.sampler.bogus=1"],
            "sampler._target_=optuna.samplers.TPESampler: .*bogus",
        ),
        (["hydra.sweeper.direction=max"], "'max' is not maximize or minimize"),
        (["hydra.sweeper.direction=[{metric:val_accuracy_cosine,goal:maximize}]"], "direction entry"),
        (["hydra.sweeper.pruner.n_startup_trials=-1"], "MedianPruner.*ValueError: Number of startup trials"),
        (["hydra/sweeper/pruner=hyperband", "hydra.sweeper.direction=[maximize,minimize]"], "single-objective"),
        (["hydra/sweeper/sampler=motpe"], "MOTPESampler was removed in Optuna 4"),
        (["hydra.sweeper.custom_search_space=no_such_module.configure"], "custom_search_space=no_such_module"),
    ]:
        cfg, _ = sweeper_of("search", *overrides, build=False)
        with pytest.raises(ValueError, match=message) as raised:
            check_sweeper_node(cfg.hydra.sweeper)
        assert raised.typename == "SweeperConfigError" and "\n" not in str(raised.value)
