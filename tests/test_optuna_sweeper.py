"""Tests of the in-project Hydra Optuna sweeper (hydra/sweeper=embft_optuna)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
APP = Path(__file__).resolve().parent / "sweeper_app" / "my_app.py"

# Until the project is installed (editable), src/ is not on sys.path.
if importlib.util.find_spec("hydra_plugins.embft_optuna_sweeper") is None:
    sys.path.insert(0, str(SRC))

from hydra_plugins.embft_optuna_sweeper._impl import (  # noqa: E402
    format_value,
    parse_search_space,
)
from hydra_plugins.embft_optuna_sweeper.config import EmbftOptunaSweeperConf  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("line", "distribution"),
    [
        ("p=choice(adam,sgd,lion)", CategoricalDistribution(("adam", "sgd", "lion"))),
        ("p=choice(16,32,64)", CategoricalDistribution((16, 32, 64))),
        ("p=a,b", CategoricalDistribution(("a", "b"))),
        # As the official hydra-optuna-sweeper: range() runs from start to stop (Optuna lowers stop
        # to the last step), interval() is a float search, int(interval()) an integer one.
        ("p=range(1,10,2)", IntDistribution(1, 9, step=2)),
        ("p=range(5)", IntDistribution(0, 5)),
        ("p=range(0,1,0.25)", FloatDistribution(0.0, 1.0, step=0.25)),
        ("p=interval(0,5)", FloatDistribution(0.0, 5.0)),
        ("p=int(interval(0,5))", IntDistribution(0, 5)),
        ("p=interval(0.0,1)", FloatDistribution(0.0, 1.0)),
        ("p=tag(log,interval(1e-5,1e-1))", FloatDistribution(1e-5, 1e-1, log=True)),
        ("p=tag(log, interval(1, 1024))", FloatDistribution(1, 1024, log=True)),
        ("p=tag(log, int(interval(1, 1024)))", IntDistribution(1, 1024, log=True)),
    ],
)
def test_sweep_grammar_maps_to_distribution(line: str, distribution: Any) -> None:
    space = parse_search_space({}, [line])
    assert space.fixed == {}
    assert space.distributions == {"p": distribution}


def test_fixed_values_pass_through_unchanged() -> None:
    space = parse_search_space({"lr": "interval(0.1, 1.0)", "epochs": "3"}, ["+extra='a b'", "model=bge", "~drop"])
    assert list(space.params) == ["lr"]
    assert list(space.fixed.values()) == ["epochs=3", "+extra='a b'", "model=bge", "~drop"]
    assert space.overrides({"lr": 0.5}) == [
        "epochs=3",
        "+extra='a b'",
        "model=bge",
        "~drop",
        "lr=0.5",
    ]


def test_command_line_wins_over_config_params() -> None:
    space = parse_search_space({"x": "interval(0, 1)", "y": "choice(a, b)"}, ["x=3", "y=c,d"])
    assert space.fixed == {"x": "x=3"}
    assert space.distributions == {"y": CategoricalDistribution(("c", "d"))}


def test_categorical_overrides_keep_types_and_prefix() -> None:
    space = parse_search_space(None, ["+opt.k=choice('1',2,[3,4],'a b')"])
    param = space.params["opt.k"]
    assert param.key == "+opt.k"
    assert param.distribution == CategoricalDistribution(("1", 2, "[3,4]", "a b"))
    assert [param.override(c) for c in ("1", 2, "[3,4]", "a b")] == [
        "+opt.k='1'",
        "+opt.k=2",
        "+opt.k=[3,4]",
        "+opt.k=a\\ b",
    ]


@pytest.mark.parametrize(
    "value",
    ["plain", "1", "true", "a b", "x=y", "it's", "q'\"mix", "back\\", "a,b", "${x}", 3, 0.1, None],
)
def test_format_value_round_trips(value: Any) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_override(f"k={format_value(value)}").value()
    assert parsed == value and type(parsed) is type(value)


def test_config_node_defaults() -> None:
    conf = OmegaConf.structured(EmbftOptunaSweeperConf)
    assert conf._target_ == ("hydra_plugins.embft_optuna_sweeper.embft_optuna_sweeper.EmbftOptunaSweeper")
    assert conf.direction == "maximize" and conf.n_trials == 20 and conf.n_jobs == 1
    assert conf.seed == 42 and conf.sampler is None and conf.max_failure_rate == 0.5
    assert OmegaConf.to_container(conf)["storage"] == "sqlite:///${hydra.runtime.cwd}/optuna.db"


# --------------------------------------------------------------------------- end to end


def _app_env() -> dict[str, str]:
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    # Harmless when the project is installed editable; needed until it is.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


def _run(
    tmp_path: Path,
    sweep_dir: str,
    *overrides: str,
    check: bool = True,
    storage: str | None = "sqlite:///{tmp_path}/optuna.db",
) -> subprocess.CompletedProcess[str]:
    storage_override = [] if storage is None else [f"hydra.sweeper.storage={storage}"]
    proc = subprocess.run(
        [
            sys.executable,
            str(APP),
            "-m",
            *(o.format(tmp_path=tmp_path) for o in storage_override),
            f"hydra.sweep.dir={sweep_dir}",
            *overrides,
        ],
        cwd=tmp_path,
        env=_app_env(),
        capture_output=True,
        text=True,
        timeout=300,  # a loaded 2-core machine: imports alone can take a minute
    )
    if check and proc.returncode != 0:
        pytest.fail(f"sweep failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _study(tmp_path: Path, name: str = "my_app") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")


def _results(tmp_path: Path, sweep_dir: str) -> Any:
    return OmegaConf.load(tmp_path / sweep_dir / "optimization_results.yaml")


def test_study_persists_and_resumes(tmp_path: Path) -> None:
    _run(tmp_path, "s1", "hydra.sweeper.n_trials=2")
    assert (tmp_path / "optuna.db").is_file()
    first = _results(tmp_path, "s1")
    assert first.n_complete == 2 and first.n_failed == 0
    assert first.study_name == "my_app"
    assert first.storage == f"sqlite:///{tmp_path}/optuna.db"
    assert set(first.best_params) == {"x", "y"}
    assert first.best_overrides == [
        f"x={first.best_params.x}",
        f"y={first.best_params.y}",
    ]

    _run(tmp_path, "s2", "hydra.sweeper.n_trials=3")
    trials = _study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert _results(tmp_path, "s2").n_complete == 3
    # The job saw its trial number and the study name through the `optuna` node.
    job_cfg = OmegaConf.load(tmp_path / "s2" / "0" / ".hydra" / "config.yaml")
    assert job_cfg.optuna == {
        "trial_number": 2,
        "study_name": "my_app",
        "storage": f"sqlite:///{tmp_path}/optuna.db",  # where the job reports intermediate values
    }
    assert trials[2].user_attrs["overrides"] == [
        f"x={trials[2].params['x']}",
        f"y={trials[2].params['y']}",
    ]


def test_raising_and_nan_trials_fail_and_study_goes_on(tmp_path: Path) -> None:
    _run(
        tmp_path,
        "s",
        "hydra.sweeper.n_trials=4",
        "raise_on_trials=[0]",
        "nan_on_trials=[3]",
    )
    states = [t.state for t in _study(tmp_path).trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    results = _results(tmp_path, "s")
    assert (results.n_complete, results.n_failed) == (2, 2)
    assert results.best_trial_number in (1, 2)
    # Fixed overrides are part of what reruns the best trial.
    assert results.best_overrides[:2] == ["raise_on_trials=[0]", "nan_on_trials=[3]"]


def test_failure_budget_stops_the_sweep(tmp_path: Path) -> None:
    proc = _run(tmp_path, "s", "mode=raise", "hydra.sweeper.n_trials=10", check=False)
    assert proc.returncode != 0
    assert "hydra.sweeper.max_failure_rate" in proc.stderr
    assert "3 of the 3 trials run by this sweep failed" in proc.stderr
    assert [t.state for t in _study(tmp_path).trials] == [TrialState.FAIL] * 3
    assert _results(tmp_path, "s").n_failed == 3


def test_n_jobs_launches_batches(tmp_path: Path) -> None:
    proc = _run(tmp_path, "s", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2")
    log = proc.stdout + proc.stderr
    assert log.count("Launching 2 jobs locally") == 1
    assert log.count("Launching 1 jobs locally") == 1
    assert len(_study(tmp_path).trials) == 3
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir()) == ["0", "1", "2"]


def test_grid_sampler_runs_every_combination_once(tmp_path: Path) -> None:
    _run(
        tmp_path,
        "s",
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.n_trials=10",  # capped to the 6 points of the grid
        "x=choice(0.5, 1.5)",
        "y=choice(-1, 0, 2)",
    )
    trials = _study(tmp_path).trials
    assert sorted((t.params["x"], t.params["y"]) for t in trials) == [(x, y) for x in (0.5, 1.5) for y in (-1, 0, 2)]
    assert all(t.state == TrialState.COMPLETE for t in trials)


def test_grid_sampler_visits_a_range_and_refuses_an_interval_before_the_store(tmp_path: Path) -> None:
    # As the official plugin: a grid over range() visits the values Hydra's basic sweeper would.
    _run(
        tmp_path, "s", "hydra/sweeper/sampler=grid", "hydra.sweeper.n_trials=10", "x=choice(0.5, 1.5)", "y=range(-1, 2)"
    )
    trials = _study(tmp_path).trials
    assert sorted((t.params["x"], t.params["y"]) for t in trials) == [(x, y) for x in (0.5, 1.5) for y in (-1, 0, 1)]

    (tmp_path / "b").mkdir()
    proc = _run(tmp_path / "b", "s", "hydra/sweeper/sampler=grid", check=False, storage="sqlite:///b.db")
    assert proc.returncode == 1
    assert "hydra/sweeper/sampler=grid visits choice(...) and range(...) params only; x is an interval" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "b" / "b.db").exists()  # refused before the study's store was opened


def test_enqueued_points_run_first_and_once_and_one_outside_the_space_is_refused_before_the_store(
    tmp_path: Path,
) -> None:
    recipe = "hydra.sweeper.enqueue_trials=[{x: 1.25, y: 2}]"
    _run(tmp_path, "s1", "hydra.sweeper.n_trials=2", recipe)
    _run(tmp_path, "s2", "hydra.sweeper.n_trials=3", recipe)  # resumed: the point is in the study already
    trials = _study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert trials[0].params == {"x": 1.25, "y": 2}
    assert trials[0].user_attrs["overrides"] == ["x=1.25", "y=2"]  # what the job ran
    assert [t.params for t in trials].count({"x": 1.25, "y": 2}) == 1

    (tmp_path / "b").mkdir()
    proc = _run(tmp_path / "b", "s", "hydra.sweeper.enqueue_trials=[{x: 9.0}]", check=False, storage="sqlite:///b.db")
    assert proc.returncode == 1
    assert "hydra.sweeper.enqueue_trials[0].x=9.0: outside its search space" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "b" / "b.db").exists()


def test_stale_running_trial_is_failed_and_counted(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=1, grace_period=1)
        study = optuna.create_study(study_name="my_app", storage=storage, direction="maximize")
        trial = study.ask()  # as if its process had been killed mid-trial
        storage.record_heartbeat(trial._trial_id)
    # Its last beat a day ago, in the store itself: stale for any grace period, with no waiting.
    with sqlalchemy.create_engine(f"sqlite:///{tmp_path}/optuna.db").begin() as db:
        db.execute(sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 day')"))
    _run(
        tmp_path,
        "s",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.heartbeat_interval=1",
        "hydra.sweeper.grace_period=1",
    )
    states = [t.state for t in _study(tmp_path).trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE]


def test_default_and_relative_storage_resolve_against_launch_dir(tmp_path: Path) -> None:
    # hydra.job.chdir moves each job into its output dir; the storage must not follow.
    _run(tmp_path, "s1", "hydra.sweeper.n_trials=1", "hydra.job.chdir=true", storage=None)
    assert _results(tmp_path, "s1").storage == f"sqlite:///{tmp_path}/optuna.db"
    assert len(_study(tmp_path).trials) == 1

    relative = "sqlite:///nested/dir/study.db"
    _run(tmp_path, "s2", "hydra.sweeper.n_trials=1", "hydra.job.chdir=true", storage=relative)
    assert (tmp_path / "nested" / "dir" / "study.db").is_file()
    assert _results(tmp_path, "s2").storage == f"sqlite:///{tmp_path}/nested/dir/study.db"


def _sweeper(**overrides: Any) -> Any:
    """The sweeper object as Hydra would build it, with the config's defaults unless overridden."""
    from hydra_plugins.embft_optuna_sweeper._impl import OptunaSweeperImpl

    options: dict[str, Any] = dict(
        direction="maximize",
        study_name=None,
        storage=None,
        n_trials=1,
        n_jobs=1,
        seed=None,
        sampler=None,
        max_failure_rate=0.5,
        failure_rate_min_trials=5,
        heartbeat_interval=None,
        grace_period=None,
        params=None,
    )
    return OptunaSweeperImpl(**{**options, **overrides})


def _MEET(tmp_path: Path) -> list[str]:
    """Both workers' first jobs wait for each other (files, polled): the workers overlap by construction."""
    return ["rendezvous=2", f"rendezvous_dir={tmp_path}/rendezvous"]


def _two_workers(tmp_path: Path, *overrides: str, timeout: int = 300) -> None:
    """The same command (seed included) in two places, as on two machines sharing one database."""
    cmd = [
        sys.executable,
        str(APP),
        "-m",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
        "hydra.sweep.dir=sweep",
        *overrides,
    ]
    workers = []
    for i in range(2):
        (tmp_path / f"w{i}").mkdir()
        workers.append(
            subprocess.Popen(
                cmd,
                cwd=tmp_path / f"w{i}",
                env=_app_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for w in workers:
        _, err = w.communicate(timeout=timeout)
        assert w.returncode == 0, err


def test_two_workers_share_one_study(tmp_path: Path) -> None:
    _two_workers(tmp_path, "hydra.sweeper.n_trials=6", *_MEET(tmp_path))
    trials = _study(tmp_path).trials
    # Counting and asking happen under a lock, so the budget holds exactly.
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    # Per-trial seeds: the workers did not replay one random stream.
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6
    jobs = [sum(p.is_dir() for p in (tmp_path / f"w{i}" / "sweep").iterdir()) for i in range(2)]
    assert sum(jobs) == 6 and min(jobs) >= 1, jobs


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_trial_seeds_follow_trial_numbers(sampler: str) -> None:
    from hydra_plugins.embft_optuna_sweeper._samplers import _PerTrialSeedSampler, make_sampler, sampler_factory
    from hydra_plugins.embft_optuna_sweeper.config import SAMPLERS

    space = {
        "x": FloatDistribution(-3.0, 5.0),
        "y": IntDistribution(-3, 2),
        "z": CategoricalDistribution(("a", "b", "c")),
    }

    def per_trial() -> _PerTrialSeedSampler:
        return _PerTrialSeedSampler(
            lambda seed: make_sampler(sampler_factory(OmegaConf.structured(SAMPLERS[sampler])), seed), 42
        )

    def tell(study: optuna.Study, trial: optuna.Trial) -> dict:
        study.tell(trial, -((trial.params["x"] - 2) ** 2))
        return trial.params

    # One process asking trials 0..5 in turn.
    alone = optuna.create_study(direction="maximize", sampler=per_trial())
    sequential = [tell(alone, alone.ask(space)) for _ in range(6)]

    # Two "workers" with the same seed taking turns on one storage.
    storage = optuna.storages.InMemoryStorage()
    a, b = (
        optuna.create_study(
            study_name="s", storage=storage, direction="maximize", sampler=per_trial(), load_if_exists=True
        )
        for _ in range(2)
    )
    interleaved = [tell(w, w.ask(space)) for w in (a, b, a, b, a, b)]

    assert interleaved == sequential  # a trial's sample depends on its number, not its worker
    assert len({tuple(sorted(p.items())) for p in interleaved}) == 6


def test_multi_objective(tmp_path: Path) -> None:
    _run(
        tmp_path,
        "s",
        "multi_objective=true",
        "hydra.sweeper.direction=[maximize,minimize]",
        "hydra.sweeper.n_trials=3",
    )
    study = _study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    results = _results(tmp_path, "s")
    assert results.direction == ["maximize", "minimize"]
    assert {t.number for t in study.best_trials} == {t.number for t in results.best_trials}


# --------------------------------------------------------------------------- pruning

PRUNE = ["steps=4", "hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=2"]


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("median", optuna.pruners.MedianPruner),
        ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
        ("hyperband", optuna.pruners.HyperbandPruner),
        ("none", optuna.pruners.NopPruner),
    ],
)
def test_pruner_config_nodes_build_optuna_pruners(name: str, target: type) -> None:
    from hydra.utils import instantiate

    from hydra_plugins.embft_optuna_sweeper.config import PRUNERS

    assert isinstance(instantiate(OmegaConf.structured(PRUNERS[name])), target)


def _pruned_ok(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The PRUNED trials, after checking each was worse than the median, at the step it stopped, of
    the trials that had completed by then (MedianPruner's reference: with two workers trial numbers
    do not order completions), and stopped before the end of its curve."""
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    for t in pruned:
        step = t.last_step
        assert step is not None and step < 4
        earlier = [
            u.intermediate_values[step]
            for u in study.trials
            if u.state == TrialState.COMPLETE
            and u.datetime_complete <= t.datetime_complete
            and step in u.intermediate_values
        ]
        assert t.intermediate_values[step] < sorted(earlier)[len(earlier) // 2]
    return pruned


@pytest.mark.parametrize("prune_by", ["tell", "raise"])
def test_bad_trials_are_pruned_and_count_towards_n_trials(tmp_path: Path, prune_by: str) -> None:
    proc = _run(tmp_path, "s", *PRUNE, f"prune_by={prune_by}", "hydra.sweeper.n_trials=8")
    study = _study(tmp_path)
    assert len(study.trials) == 8  # pruned trials count
    pruned = _pruned_ok(study)
    assert pruned and {t.state for t in study.trials} == {TrialState.COMPLETE, TrialState.PRUNED}
    results = _results(tmp_path, "s")
    assert (results.n_complete, results.n_pruned, results.n_failed) == (8 - len(pruned), len(pruned), 0)
    assert results.pruner._target_ == "optuna.pruners.MedianPruner"
    assert f"Trial {pruned[0].number} pruned at step" in proc.stdout + proc.stderr
    # Trials finished in full report every step; the pruner decided from step 1 on.
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert all(sorted(t.intermediate_values) == [1, 2, 3, 4] for t in complete)


def test_two_workers_with_a_pruner_end_at_exactly_n_trials(tmp_path: Path) -> None:
    _two_workers(tmp_path, "hydra.sweeper.n_trials=9", *_MEET(tmp_path), *PRUNE, timeout=300)
    study = _study(tmp_path)
    assert len(study.trials) == 9
    assert _pruned_ok(study)
    assert {t.state for t in study.trials} == {TrialState.COMPLETE, TrialState.PRUNED}


def test_pruner_refuses_several_objectives(tmp_path: Path) -> None:
    proc = _run(
        tmp_path,
        "s",
        "multi_objective=true",
        "hydra.sweeper.direction=[maximize,minimize]",
        "hydra/sweeper/pruner=median",
        check=False,
    )
    assert proc.returncode != 0 and "single-objective studies only" in proc.stderr


# --------------------------------------------------------------------------- MLflow (embft.tracking.study_runs)


def _mlflow(tmp_path: Path) -> Any:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("sweeper_app")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("embft.role") == "study"]
    trials = {int(r.data.tags["optuna.trial_number"]): r for r in runs if r.data.tags.get("embft.role") == "finetune"}
    return client, parents, trials


def test_pruned_runs_are_tagged_and_nest_under_one_parent_run_across_resumes(tmp_path: Path) -> None:
    from embft.report.search import add_search_section

    uri = f"mlflow_uri=sqlite:///{tmp_path}/mlflow.db"
    first = _run(tmp_path, "s1", *PRUNE, uri, "hydra.sweeper.n_trials=7")
    _, parents, _ = _mlflow(tmp_path)
    assert len(parents) == 1
    parent_id = parents[0].info.run_id
    second = _run(tmp_path, "s2", *PRUNE, uri, "hydra.sweeper.n_trials=9")  # resume to 9 trials

    client, parents, trials = _mlflow(tmp_path)
    assert [p.info.run_id for p in parents] == [parent_id]  # found again, not a second parent
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    # The parent run links to the study in optuna-dashboard (make optuna-dashboard).
    assert parent.data.tags["optuna.dashboard"] == "http://127.0.0.1:8080/dashboard"
    assert (
        parent.data.tags["optuna.dashboard_command"]
        == f"make optuna-dashboard STORAGE='sqlite:///{tmp_path}/optuna.db'"
    )
    study = _study(tmp_path)
    assert sorted(trials) == list(range(9)) == [t.number for t in study.trials]
    for t in study.trials:
        run = trials[t.number]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        if t.state == TrialState.PRUNED:
            assert run.data.tags["optuna.pruned"] == "true"
            assert run.data.tags["optuna.pruned_step"] == str(t.last_step)
        else:
            assert "optuna.pruned" not in run.data.tags
        # The intermediate scores are logged by step, as in Optuna, under their own name (never the final one's).
        history = client.get_metric_history(run.info.run_id, "live_val_accuracy_cosine")
        assert {m.step: m.value for m in history} == t.intermediate_values
    n_pruned = sum(t.state == TrialState.PRUNED for t in study.trials)
    assert n_pruned >= 1
    # The sweep summary counts pruned runs apart (second sweep: trials 7 and 8).
    assert "COUNTS" in first.stdout and "PRUNED" in first.stdout + second.stdout
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert parent.data.metrics["study_n_pruned"] == n_pruned
    assert parent.data.tags["best_trial_number"] == str(study.best_trial.number)
    assert parent.data.tags["best.x"] == str(study.best_params["x"])
    assert trials[study.best_trial.number].data.tags["optuna.best_trial"] == "true"
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    plots = {a.path for a in client.list_artifacts(parent_id, "plots")}
    assert "optimization_results.yaml" in artifacts
    assert "plots/search_intermediate_values.png" in plots and "plots/search_optimization_history.png" in plots

    # embft report's search section: every applicable plot, embedded, and logged to the parent.
    md = tmp_path / "report" / "report.md"
    md.parent.mkdir()
    md.write_text("# report\n")
    written = add_search_section(client, ["sweeper_app"], md)
    names = {p.name for p in written}
    assert names == {
        f"search_{n}.png"
        for n in ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")
    }
    text = md.read_text()
    assert all(f"]({n})" in text for n in names) and "PRUNED" in text
    assert all(p.stat().st_size > 10_000 for p in written)


def test_report_of_two_studies_keeps_each_studys_plots(tmp_path: Path) -> None:
    from embft.report.search import add_search_section

    for study in ("first", "second"):
        _run(tmp_path, study, f"hydra.sweeper.study_name={study}", f"mlflow_uri=sqlite:///{tmp_path}/mlflow.db")
    client, parents, _ = _mlflow(tmp_path)
    assert len(parents) == 2
    md = tmp_path / "report.md"
    md.write_text("# report\n")
    written = {p.name for p in add_search_section(client, ["sweeper_app"], md)}
    text = md.read_text()
    for study in ("first", "second"):
        plot = f"search_{study}_optimization_history.png"
        assert plot in written and f"]({plot})" in text and f"Optuna study `{study}`" in text


def test_multi_objective_names_objectives_and_tags_the_pareto_set(tmp_path: Path) -> None:
    from embft.report.search import write_plots

    _run(
        tmp_path,
        "s",
        "multi_objective=true",
        f"mlflow_uri=sqlite:///{tmp_path}/mlflow.db",
        "hydra.sweeper.direction=[{metric:score,direction:maximize},{metric:abs_x,direction:minimize}]",
        "hydra.sweeper.n_trials=6",
    )
    study = _study(tmp_path)
    assert study.metric_names == ["score", "abs_x"]
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    _, parents, trials = _mlflow(tmp_path)
    pareto = {t.number for t in study.best_trials}
    assert 0 < len(pareto) < 6
    assert {n for n, r in trials.items() if r.data.tags["optuna.pareto"] == "true"} == pareto
    assert {n for n, r in trials.items() if r.data.tags["optuna.pareto"] == "false"} == set(range(6)) - pareto
    assert parents[0].data.tags["pareto_trial_numbers"] == ",".join(
        str(n) for n in sorted(pareto, key=[t.number for t in study.best_trials].index)
    )
    assert "pareto_front" in write_plots(study, tmp_path / "plots")
    results = _results(tmp_path, "s")
    assert list(results.metric_names) == ["score", "abs_x"]


def test_objective_values_follow_the_objectives_list() -> None:
    import math

    from embft.tracking.study_runs import objective_values

    one = [{"metric": "val_accuracy_cosine", "direction": "maximize"}]
    two = [*one, {"metric": "train_seconds", "direction": "minimize"}]
    metrics = {"val_accuracy_cosine": 0.8, "train_seconds": 120.0, "f1": 0.7}
    assert objective_values(metrics, one) == 0.8
    assert objective_values(metrics, two) == [0.8, 120.0]
    assert math.isnan(objective_values({"f1": 0.7}, one))  # the sweeper fails such a trial


# --------------------------------------------------------------------------- database faults
# (the faults themselves, a PostgreSQL restart and a worker killed -9: tests/e2e/test_search_faults.py)


def test_fault_settings_defaults() -> None:
    conf = OmegaConf.structured(EmbftOptunaSweeperConf)
    assert conf.stale_trial_retries == 1 and conf.wait_for_running is True
    assert conf.storage_options.reconnect_timeout == 120 and dict(conf.storage_options.engine_kwargs) == {}


def test_ask_lock_lost_with_its_connection_is_reported_and_released_without_raising() -> None:
    """CI's PostgreSQL restart: the lock's check statement fails and SQLAlchemy invalidates the
    connection, after which a commit raises PendingRollbackError; the worker must go on."""
    import sqlalchemy

    from embft.sweeping.storage import AskLock

    engine = sqlalchemy.create_engine("sqlite://", poolclass=sqlalchemy.pool.NullPool)
    healthy = engine.connect()
    healthy.execute(sqlalchemy.text("SELECT 1"))  # the lock's transaction
    lock = AskLock(healthy)
    assert lock.held()
    lock.release()
    assert healthy.closed and not healthy.in_transaction()

    conn = engine.connect()
    conn.execute(sqlalchemy.text("SELECT 1"))
    conn.connection.dbapi_connection.close()  # the server ended the session
    lost = AskLock(conn)
    assert not lost.held()
    assert not lost.held()  # stays lost: no statement on the invalidated connection
    lost.release()  # raised PendingRollbackError from commit() before
    assert conn.closed


def test_retry_on_disconnect_retries_lost_connections_only() -> None:
    import sqlalchemy.exc

    from embft.sweeping.storage import is_disconnect, retry_on_disconnect

    lost = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
    wrapped = optuna.exceptions.StorageInternalError("commit failed")  # how RDBStorage raises it
    wrapped.__cause__ = lost
    assert is_disconnect(lost) and is_disconnect(wrapped)
    assert not is_disconnect(sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate key")))

    class PgError(Exception):  # psycopg2's errors carry the SQLSTATE as pgcode
        def __init__(self, message: str, pgcode: str | None = None) -> None:
            super().__init__(message)
            self.pgcode = pgcode

    def committed_through(cause: BaseException) -> BaseException:
        err = optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
        err.__cause__ = cause
        return err

    # A restart seen mid-commit: each of these reached Optuna's commit as a plain SQLAlchemyError.
    for cause in (
        sqlalchemy.exc.PendingRollbackError("Can't reconnect until invalid transaction is rolled back"),
        sqlalchemy.exc.DatabaseError(
            "COMMIT", {}, PgError("error with status PGRES_TUPLES_OK and no message from the libpq")
        ),
        sqlalchemy.exc.InternalError("UPDATE", {}, PgError("terminating connection", pgcode="57P01")),
    ):
        assert is_disconnect(committed_through(cause)), cause
    # Bad data is not a lost connection: retrying it would only fail again.
    too_long = sqlalchemy.exc.DataError(
        "INSERT", {}, PgError("value too long for type character varying(512)", "22001")
    )
    assert not is_disconnect(committed_through(too_long))

    attempts: list[int] = []

    def flaky(attempt: int) -> str:
        attempts.append(attempt)
        if attempt < 3:
            raise wrapped
        return "ok"

    assert retry_on_disconnect("flaky", flaky, timeout=30) == "ok" and attempts == [1, 2, 3]
    with pytest.raises(optuna.exceptions.StorageInternalError):  # past the timeout: the error itself
        retry_on_disconnect("down", lambda _: (_ for _ in ()).throw(wrapped), timeout=0)
    with pytest.raises(ValueError):  # not a lost connection: never retried
        retry_on_disconnect("bug", lambda _: (_ for _ in ()).throw(ValueError("bug")), timeout=30)


def test_reconnecting_storage_retries_an_operation_and_a_landed_state_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlalchemy.exc

    from embft.sweeping.storage import ReconnectingRDBStorage

    storage = ReconnectingRDBStorage(f"sqlite:///{tmp_path}/optuna.db", reconnect_timeout=30)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    lost = sqlalchemy.exc.OperationalError("COMMIT", {}, Exception("terminating connection"))
    real = optuna.storages.RDBStorage.set_trial_state_values
    calls: list[TrialState] = []

    def commit_then_drop(self: Any, trial_id: int, state: TrialState, values: Any = None) -> bool:
        calls.append(state)
        real(self, trial_id, state, values)  # lands, then the answer is lost
        raise optuna.exceptions.StorageInternalError("commit") from lost

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_state_values", commit_then_drop)
    assert storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [1.0]) is True
    assert calls == [TrialState.COMPLETE]  # the retry saw the landed state: no second attempt
    monkeypatch.undo()
    assert storage.get_trial(trial._trial_id).state == TrialState.COMPLETE


def test_reconnecting_storage_covers_every_database_call_of_optunas_cached_storage() -> None:
    """study.ask() reaches RDBStorage through _CachedStorage's private calls (CI: a restart during
    a suggest's _set_trial_param ended a worker); a new Optuna calling another one fails here."""
    import inspect
    import re

    from optuna.storages import _cached_storage

    from embft.sweeping.storage import DB_METHODS, ReconnectingRDBStorage

    called = set(re.findall(r"self\._backend\.(\w+)", inspect.getsource(_cached_storage)))
    no_database = {"get_heartbeat_interval", "get_heartbeat_stale_trial_callback"}
    overridden = {"set_trial_state_values", "_set_trial_param"}  # retried with a landed-commit check
    assert called - no_database - overridden <= set(DB_METHODS)
    for name in overridden:
        assert name in vars(ReconnectingRDBStorage)


def test_a_suggest_whose_param_commit_landed_is_not_inserted_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlalchemy.exc

    from embft.sweeping.storage import ReconnectingRDBStorage

    storage = ReconnectingRDBStorage(f"sqlite:///{tmp_path}/optuna.db", reconnect_timeout=30)
    study = optuna.create_study(storage=storage)
    lost = sqlalchemy.exc.OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))
    real = optuna.storages.RDBStorage._set_trial_param
    calls: list[str] = []

    def commit_then_drop(self: Any, trial_id: int, name: str, *args: Any) -> None:
        calls.append(name)
        real(self, trial_id, name, *args)  # lands, then the answer is lost
        raise optuna.exceptions.StorageInternalError("commit") from lost

    monkeypatch.setattr(optuna.storages.RDBStorage, "_set_trial_param", commit_then_drop)
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)})
    monkeypatch.undo()
    assert calls == ["lr"]  # the retry saw the landed row: no duplicate insert
    assert storage.get_trial(trial._trial_id).params == {"lr": trial.params["lr"]}


def test_trials_counted_towards_n_trials() -> None:
    from embft.sweeping.storage import DISCARDED_ATTR, counts_towards_n_trials, retried_trial_numbers

    def trial(number: int, state: TrialState, **system_attrs: Any) -> optuna.trial.FrozenTrial:
        t = optuna.trial.create_trial(state=state, value=1.0 if state == TrialState.COMPLETE else None)
        t.number = number
        t._system_attrs = system_attrs
        return t

    trials = [
        trial(0, TrialState.FAIL),  # a dead worker's, retried by trial 3: trial 3 counts instead
        trial(1, TrialState.FAIL),  # a job that raised: counts
        trial(2, TrialState.FAIL, **{DISCARDED_ATTR: True}),  # asked past n_trials, never run
        trial(3, TrialState.WAITING, failed_trial=0, retry_history=[0]),  # asked before new trials
        trial(4, TrialState.COMPLETE),
        trial(5, TrialState.PRUNED),
        trial(6, TrialState.RUNNING),  # a live worker's (stale ones were failed just before)
    ]
    retried = retried_trial_numbers(trials)
    assert retried == {0}
    assert [t.number for t in trials if counts_towards_n_trials(t, True, retried)] == [1, 4, 5, 6]
    assert [t.number for t in trials if counts_towards_n_trials(t, False, retried)] == [1, 4, 5]


def test_storage_options_reach_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra_plugins.embft_optuna_sweeper import _impl

    seen: list[dict[str, Any]] = []

    class Recording(_impl.ReconnectingRDBStorage):
        def __init__(self, url: str, **kwargs: Any) -> None:
            seen.append({"url": url, **kwargs})

    monkeypatch.setattr(_impl, "ReconnectingRDBStorage", Recording)

    def storage_kwargs(url: str, **options: Any) -> dict[str, Any]:
        sweeper = _sweeper(storage=url, heartbeat_interval=1, grace_period=3, storage_options=options)
        sweeper.config = OmegaConf.create({"hydra": {"runtime": {"cwd": str(tmp_path)}}})
        sweeper._make_storage()
        return seen.pop()

    pg = storage_kwargs("postgresql+psycopg2://u@127.0.0.1:1/db")
    assert pg["engine_kwargs"] == {"pool_pre_ping": True} and pg["reconnect_timeout"] == 120
    assert pg["grace_period"] == 3 and pg["heartbeat_stale_trial_callback"].max_retry == 1
    off = storage_kwargs(
        "postgresql+psycopg2://u@127.0.0.1:1/db", engine_kwargs={"pool_pre_ping": False, "pool_size": 2}
    )
    assert off["engine_kwargs"] == {"pool_pre_ping": False, "pool_size": 2}
    sqlite = storage_kwargs("sqlite:///s.db", reconnect_timeout=5, engine_kwargs={"connect_args": {"timeout": 9}})
    assert sqlite["engine_kwargs"] == {"connect_args": {"timeout": 9}} and sqlite["reconnect_timeout"] == 5


def test_storage_options_from_the_command_line(tmp_path: Path) -> None:
    _run(
        tmp_path,
        "s",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.storage_options.reconnect_timeout=30",
        "+hydra.sweeper.storage_options.engine_kwargs.pool_recycle=3600",
        "hydra.sweeper.stale_trial_retries=2",
    )
    assert [t.state for t in _study(tmp_path).trials] == [TrialState.COMPLETE]


@pytest.mark.parametrize(("interval", "grace", "effective"), [(60, None, 180), (200, None, 400), (60, 30, 30)])
def test_default_grace_period_outlasts_embfts_mlflow_heartbeat(interval: int, grace: Any, effective: int) -> None:
    sweeper = _sweeper(heartbeat_interval=interval, grace_period=grace)
    assert sweeper.effective_grace_period() == effective


def test_a_point_is_queued_under_the_ask_lock_so_two_workers_starting_at_once_queue_it_once(tmp_path: Path) -> None:
    from filelock import FileLock, Timeout

    url = f"sqlite:///{tmp_path}/optuna.db"
    sweeper = _sweeper(storage=url, n_trials=2, enqueue_trials=[{"x": 1.25}])
    study = optuna.create_study(study_name="s", storage=url)
    held = []
    queue = study.enqueue_trial

    def enqueue_as_the_other_worker_would_see_it(*args: Any, **kwargs: Any) -> None:
        try:  # the lock the other worker's ask and queue wait on
            with FileLock(f"{tmp_path}/optuna.db.embft-ask.lock", timeout=0):
                held.append(False)
        except Timeout:
            held.append(True)
        queue(*args, **kwargs)

    study.enqueue_trial = enqueue_as_the_other_worker_would_see_it  # type: ignore[method-assign]
    sweeper._enqueue(study)
    sweeper._enqueue(study)  # the second worker, after the first: the point is there already
    assert held == [True, True]
    assert [(t.state, t.system_attrs["fixed_params"]) for t in study.trials] == [(TrialState.WAITING, {"x": 1.25})]


class _StopWhileSampling(optuna.samplers.RandomSampler):
    """Sends this process Ctrl-C's signal from inside study.ask: a stop that lands after the trial exists in
    the store but before the sweeper holds it (the window a sweep stopped right after a tell can hit)."""

    def sample_independent(self, study: Any, trial: Any, name: str, distribution: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)
        return super().sample_independent(study, trial, name, distribution)


@pytest.fixture
def ctrl_c_raises() -> Any:
    """SIGINT at Python's default (KeyboardInterrupt in the main thread), whatever the runner set."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _stop_study(tmp_path: Path, sampler: Any = None) -> tuple[Any, Any, Any]:
    from hydra_plugins.embft_optuna_sweeper._search_space import SearchParam, SearchSpace

    url = f"sqlite:///{tmp_path}/optuna.db"
    sweeper = _sweeper(storage=url, n_trials=2)
    sweeper.launcher = object()  # never reached: the stop comes first
    space = SearchSpace(params={"x": SearchParam("x", FloatDistribution(0, 1))})
    return sweeper, optuna.create_study(study_name="s", storage=url, sampler=sampler), space


def test_a_stop_while_a_trial_is_asked_leaves_it_stopped_and_queued_again_not_running(
    tmp_path: Path, ctrl_c_raises: Any
) -> None:
    """A trial left RUNNING by a stop takes a slot of n_trials in every rerun (an arm of an advise ended a
    trial short on CI): the stop waits until the sweeper holds the trial, which then ends like any stopped one."""
    from hydra_plugins.embft_optuna_sweeper._impl import INTERRUPTED_ATTR, NoHeartbeat

    sweeper, study, space = _stop_study(tmp_path, _StopWhileSampling(seed=0))
    with pytest.raises(KeyboardInterrupt):
        sweeper._run_batch(study, space, NoHeartbeat(), use_heartbeat=False, job_idx=0, trial_info_keys=[])
    stopped, again = study.trials
    assert (stopped.state, stopped.system_attrs.get(INTERRUPTED_ATTR)) == (TrialState.FAIL, True)
    assert (again.state, again.system_attrs["fixed_params"]) == (TrialState.WAITING, stopped.params)
    assert sweeper._remaining_trials(study, use_heartbeat=True) == 2, "the stopped trial takes no slot"


def test_a_stop_while_a_result_is_told_keeps_the_result_and_queues_nothing(
    tmp_path: Path, ctrl_c_raises: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tell finishes before the stop acts, and the stop then leaves the finished trial alone (a copy
    queued would spend a slot of n_trials on a point already scored)."""
    from hydra.core.utils import JobReturn, JobStatus

    from hydra_plugins.embft_optuna_sweeper._impl import NoHeartbeat

    sweeper, study, space = _stop_study(tmp_path)

    class Launcher:
        def launch(self, batch: Any, initial_job_idx: int) -> list[JobReturn]:
            ret = JobReturn(overrides=batch[0], status=JobStatus.COMPLETED)
            ret.return_value = 0.5
            return [ret]

    told = sweeper._tell

    def stop_then_tell(*args: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the job's result is being told
        told(*args)

    sweeper.launcher = Launcher()
    monkeypatch.setattr(sweeper, "validate_batch_is_legal", lambda batch: None)
    monkeypatch.setattr(sweeper, "_tell", stop_then_tell)
    with pytest.raises(KeyboardInterrupt):
        sweeper._run_batch(study, space, NoHeartbeat(), use_heartbeat=False, job_idx=0, trial_info_keys=[])
    assert [(t.state, t.value) for t in study.trials] == [(TrialState.COMPLETE, 0.5)], "no copy queued to run again"


def test_trials_asked_past_n_trials_under_a_lost_lock_are_dropped_unrun(tmp_path: Path) -> None:
    from hydra_plugins.embft_optuna_sweeper._impl import DISCARDED_ATTR, NoHeartbeat

    url = f"sqlite:///{tmp_path}/optuna.db"
    sweeper = _sweeper(storage=url, n_trials=2, n_jobs=2, heartbeat_interval=60)
    sweeper.config = OmegaConf.create({"hydra": {"runtime": {"cwd": str(tmp_path)}}})
    study = optuna.create_study(study_name="s", storage=sweeper._make_storage())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = study.ask()  # another worker's, asked while our lock was gone
        ours = [study.ask(), study.ask()]
    sweeper._discard_overshoot(study, ours, NoHeartbeat(), use_heartbeat=True)
    assert len(ours) == 1  # 3 asked for n_trials=2: our last one goes
    states = {t.number: (t.state, t.system_attrs.get(DISCARDED_ATTR)) for t in study.trials}
    assert states == {
        other.number: (TrialState.RUNNING, None),
        1: (TrialState.RUNNING, None),
        2: (TrialState.FAIL, True),
    }
    assert sweeper._remaining_trials(study, use_heartbeat=True) == 0  # the dropped trial does not count


def test_dashboard_opens_the_searchs_store_and_refuses_a_missing_one(tmp_path: Path) -> None:
    from embft.sweeping.dashboard import resolve_storage

    # A missing SQLite file is refused in one line (optuna-dashboard would create an empty store).
    with pytest.raises(SystemExit, match=f"No study store at {tmp_path}/mlruns/optuna.db: run a search first"):
        resolve_storage("sqlite:///mlruns/optuna.db", tmp_path)
    (tmp_path / "mlruns").mkdir()
    optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert resolve_storage("sqlite:///mlruns/optuna.db", tmp_path) == f"sqlite:///{tmp_path}/mlruns/optuna.db"
    # A bare postgresql:// URL (as in hydra.sweeper.storage) gets the installed driver, as the sweeper's does.
    if importlib.util.find_spec("psycopg") is None:
        assert resolve_storage("postgresql://u:p@db/optuna", tmp_path).startswith("postgresql+psycopg2://u:p@db/")
