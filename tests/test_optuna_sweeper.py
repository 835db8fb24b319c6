"""Tests of the in-project Hydra Optuna sweeper (hydra/sweeper=embft_optuna)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest
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
        ("p=range(1,10,2)", IntDistribution(1, 9, step=2)),
        ("p=range(5)", IntDistribution(0, 4)),
        ("p=range(0,1,0.25)", FloatDistribution(0.0, 0.75, step=0.25)),
        ("p=interval(0,5)", IntDistribution(0, 5)),
        ("p=interval(0.0,1)", FloatDistribution(0.0, 1.0)),
        ("p=tag(log,interval(1e-5,1e-1))", FloatDistribution(1e-5, 1e-1, log=True)),
        ("p=tag(log, interval(1, 1024))", IntDistribution(1, 1024, log=True)),
    ],
)
def test_sweep_grammar_maps_to_distribution(line: str, distribution: Any) -> None:
    space = parse_search_space({}, [line])
    assert space.fixed == {}
    assert space.distributions == {"p": distribution}


def test_fixed_values_pass_through_unchanged() -> None:
    space = parse_search_space(
        {"lr": "interval(0.1, 1.0)", "epochs": "3"}, ["+extra='a b'", "model=bge", "~drop"]
    )
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
    assert conf._target_ == (
        "hydra_plugins.embft_optuna_sweeper.embft_optuna_sweeper.EmbftOptunaSweeper"
    )
    assert conf.direction == "maximize" and conf.n_trials == 20 and conf.n_jobs == 1
    assert conf.seed == 42 and conf.sampler.name == "tpe" and conf.max_failure_rate == 0.5
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
        timeout=120,
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
    assert job_cfg.optuna == {"trial_number": 2, "study_name": "my_app"}
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


def test_stale_running_trial_is_failed_and_counted(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=1, grace_period=1
        )
        study = optuna.create_study(study_name="my_app", storage=storage, direction="maximize")
        trial = study.ask()  # as if its process had been killed mid-trial
        storage.record_heartbeat(trial._trial_id)
    time.sleep(2.5)
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


def test_two_workers_share_one_study(tmp_path: Path) -> None:
    # The same command (seed included) in two places, as on two machines sharing a database.
    cmd = [
        sys.executable,
        str(APP),
        "-m",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
        "hydra.sweeper.n_trials=6",
        "hydra.sweep.dir=sweep",
        "sleep_s=0.5",
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
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
    trials = _study(tmp_path).trials
    # Counting and asking happen under a lock, so the budget holds exactly.
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    # Per-trial seeds: the workers did not replay one random stream.
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6
    jobs = [sum(p.is_dir() for p in (tmp_path / f"w{i}" / "sweep").iterdir()) for i in range(2)]
    assert sum(jobs) == 6 and min(jobs) >= 1, jobs


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_trial_seeds_follow_trial_numbers(sampler: str) -> None:
    from hydra_plugins.embft_optuna_sweeper._impl import _make_sampler, _PerTrialSeedSampler

    space = {
        "x": FloatDistribution(-3.0, 5.0),
        "y": IntDistribution(-3, 2),
        "z": CategoricalDistribution(("a", "b", "c")),
    }

    def per_trial() -> _PerTrialSeedSampler:
        return _PerTrialSeedSampler(lambda seed: _make_sampler({"name": sampler}, seed), 42)

    def tell(study: optuna.Study, trial: optuna.Trial) -> dict:
        study.tell(trial, -((trial.params["x"] - 2) ** 2))
        return trial.params

    # One process asking trials 0..5 in turn.
    alone = optuna.create_study(direction="maximize", sampler=per_trial())
    sequential = [tell(alone, alone.ask(space)) for _ in range(6)]

    # Two "workers" with the same seed taking turns on one storage.
    storage = optuna.storages.InMemoryStorage()
    a, b = (
        optuna.create_study(study_name="s", storage=storage, direction="maximize",
                            sampler=per_trial(), load_if_exists=True)
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
