"""Two search workers share one Optuna study on the password-protected PostgreSQL: one finds the
password in PGPASSFILE (libpq's password file), the other in the storage URL."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # slow too: `-m "not slow"` must not need the services

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "tests" / "sweeper_app" / "my_app.py"


# A pruned trial is certain, whatever the two workers' timing: the random sampler draws trial n's
# params from seed 42 + n alone, so the trials' values are known up front, and the worst of them
# (trial 6, x=-2.86 y=2) comes after trials 0 and 1. Each worker asks its next trial only once its
# previous one ended, and the study's first trial to end is COMPLETE (nothing to compare with), so
# when any trial from number 2 on reports, at least one other trial is COMPLETE; the median pruner
# (n_startup_trials=1) then stops the worst trial at its first step, below every other trial there.
PRUNING = [
    "steps=4",
    "hydra/sweeper/pruner=median",
    "hydra.sweeper.pruner.n_startup_trials=1",
    "hydra/sweeper/sampler=random",
]


@pytest.mark.parametrize("pruning", [False, True], ids=["complete", "median-pruner"])
def test_two_workers_share_one_postgres_study(pg_uri: str, tmp_path: Path, pruning: bool) -> None:
    import optuna
    from sqlalchemy.engine import make_url

    from embft.sweeping.storage import with_installed_pg_driver

    n_trials, study_name = 8, f"e2e_{uuid.uuid4().hex[:8]}"
    storage = f"{pg_uri}/optuna"  # a bare postgresql:// URL, as a user would write it
    password = Path(os.environ["PGPASSFILE"]).read_text().strip().split(":")[-1]
    with_password = make_url(storage).set(password=password).render_as_string(hide_password=False)
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    no_pgpass = {k: v for k, v in env.items() if k != "PGPASSFILE"}
    workers = []
    for i, (url, worker_env) in enumerate([(storage, env), (with_password, no_pgpass)]):  # as two machines
        cmd = [
            sys.executable,
            str(APP),
            "-m",
            f"hydra.sweeper.storage={url}",
            f"hydra.sweeper.study_name={study_name}",
            f"hydra.sweeper.n_trials={n_trials}",
            "hydra.sweep.dir=sweep",
            "sleep_s=0.5",
            *(PRUNING if pruning else []),
        ]
        (tmp_path / f"w{i}").mkdir()
        workers.append(
            subprocess.Popen(
                cmd,
                cwd=tmp_path / f"w{i}",
                env=worker_env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]

    url = with_installed_pg_driver(make_url(storage)).render_as_string(hide_password=False)
    trials = optuna.load_study(study_name=study_name, storage=url).trials
    states = [t.state for t in trials]
    assert len(trials) == n_trials  # pruned trials count: no overshoot
    if pruning:  # each worker reports every step to the shared study and its median pruner stops laggards
        assert set(states) <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}, states
        assert all(t.intermediate_values for t in trials), "every trial reported its learning curve"
        # The app's objective from the params: the worst trial, after trials 0 and 1, is pruned at step 1.
        worst = min(trials, key=lambda t: -((t.params["x"] - 2) ** 2) - (t.params["y"] + 1) ** 2)
        assert worst.number >= 2, [(t.number, t.params) for t in trials]  # the premise of the certainty
        assert worst.state == optuna.trial.TrialState.PRUNED and worst.last_step == 1, (worst, states)
        assert optuna.trial.TrialState.COMPLETE in states
    else:
        assert states == [optuna.trial.TrialState.COMPLETE] * n_trials
    assert sorted(t.number for t in trials) == list(range(n_trials))
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == n_trials, params  # per-trial seeds: no replayed random stream
    jobs = [sum(p.is_dir() for p in (tmp_path / f"w{i}" / "sweep").iterdir()) for i in range(2)]
    assert sum(jobs) == n_trials and min(jobs) >= 1, f"trials per worker: {jobs}"
