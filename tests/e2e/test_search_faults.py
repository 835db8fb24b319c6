"""Faults during a search, with the stand-in app (tests/sweeper_app: no model training):

- the PostgreSQL server of the study restarts while two workers share it: both reconnect and
  exit 0, and the study ends at exactly n_trials, none stuck RUNNING, none run twice;
- a worker is killed -9 mid-trial: the trial heartbeat fails its trial after the grace period,
  another worker retries it once with the same params, so the study still ends with n_trials
  finished trials, and the dead trial's MLflow run ends KILLED (closed by the retry's job, as
  embft's jobs close their config's dead runs).

Each test starts and stops what it needs itself (its own PostgreSQL cluster on a free loopback
port, SQLite files in tmp_path), so `make e2e`'s services are not used; each is bounded in time.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # slow too: `-m "not slow"` must stay quick

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "tests" / "sweeper_app" / "my_app.py"
SRC = ROOT / "src"


def _env() -> dict[str, str]:
    env = dict(os.environ, HYDRA_FULL_ERROR="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _worker(cwd: Path, *overrides: str) -> subprocess.Popen[str]:
    """One search worker (its own process group, output in cwd/worker.log)."""
    cwd.mkdir(parents=True, exist_ok=True)
    log = open(cwd / "worker.log", "w")  # noqa: SIM115  (closed with the process: the child holds it)
    cmd = [sys.executable, str(APP), "-m", "hydra.sweep.dir=sweep", *overrides]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    log.close()
    return proc


def _wait_ok(workers: list[tuple[Path, subprocess.Popen[str]]], deadline: float) -> None:
    try:
        for cwd, proc in workers:
            rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
            assert rc == 0, f"worker in {cwd} exited {rc}:\n{(cwd / 'worker.log').read_text()[-4000:]}"
    finally:
        _kill(workers)


def _kill(workers: list[tuple[Path, subprocess.Popen[str]]]) -> None:
    for _, proc in workers:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _poll(what: str, check: Callable[[], Any], timeout: float, proc: subprocess.Popen[str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except Exception:  # the database or table does not exist yet
            found = None
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the worker exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _jobs(cwd: Path) -> int:
    sweep = cwd / "sweep"
    return sum(p.is_dir() and p.name.isdigit() for p in sweep.iterdir()) if sweep.is_dir() else 0


# --------------------------------------------------------------------------- PostgreSQL restart


def _pg_bin() -> Path:
    for bin_dir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name, reverse=True):
        if (bin_dir / "initdb").is_file():
            return bin_dir
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql", pytrace=False)


class Postgres:
    """A throwaway PostgreSQL cluster listening on 127.0.0.1 only (trust auth: loopback, this
    test's own data), run as `postgres` when the test runs as root (the server refuses root)."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.as_root = os.geteuid() == 0
        # In /tmp, not tmp_path: as root, `postgres` must reach the folder (pytest's is mode 700).
        self.dir = Path(tempfile.mkdtemp(prefix="embft-faults-pg."))
        self.data = self.dir / "data"
        self.port = 0
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "embft", "--auth=trust", "--no-locale", "-E", "UTF8")

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, cwd="/", capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            pytest.fail(f"{tool} failed ({done.returncode}): {done.stdout}{done.stderr}{self.log()}", pytrace=False)
        return done

    def log(self) -> str:
        path = self.dir / "postgres.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def _pg_ctl_start(self) -> subprocess.CompletedProcess[str]:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir}"
        log = str(self.dir / "postgres.log")
        return self._run(
            "pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "-t", "60", "start", check=False
        )

    def start(self) -> None:
        """On a free port, found by trying (the server's own bind says whether it is taken)."""
        for _ in range(20):
            self.port = random.randint(20000, 32000)
            if self._pg_ctl_start().returncode == 0:
                return
        pytest.fail(f"PostgreSQL did not start on 20 loopback ports tried:\n{self.log()}", pytrace=False)

    def restart(self, down_s: float) -> None:
        """Fast shutdown (clients' sessions end), `down_s` seconds down, then up on the same port."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        time.sleep(down_s)
        done = self._pg_ctl_start()
        assert done.returncode == 0, f"PostgreSQL did not come back on port {self.port}:\n{self.log()}"

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=embft"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://embft@127.0.0.1:{self.port}/{database}"


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    import psycopg2

    pg = Postgres()
    try:
        pg.start()
        conn = psycopg2.connect(f"{pg.dsn} dbname=postgres", connect_timeout=10)
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE optuna")
        conn.close()
        yield pg
    finally:
        pg.stop()


def _count_trials(pg: Postgres, state: str) -> int:
    import psycopg2

    conn = psycopg2.connect(f"{pg.dsn} dbname=optuna", connect_timeout=2)
    try:
        cur = conn.cursor()
        cur.execute("SELECT count(*) FROM trials WHERE state = %s", (state,))
        return int(cur.fetchone()[0])
    finally:
        conn.close()


def test_two_workers_survive_a_postgres_restart(postgres: Postgres, tmp_path: Path) -> None:
    import optuna
    from optuna.trial import TrialState

    n_trials, start = 12, time.monotonic()
    storage = postgres.url("optuna")
    common = [
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=restart",
        f"hydra.sweeper.n_trials={n_trials}",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.heartbeat_interval=1",
        # Above the outage: live trials cannot beat while the server is down.
        "hydra.sweeper.grace_period=20",
        "sleep_s=1.0",
    ]
    workers = [(tmp_path / f"w{i}", _worker(tmp_path / f"w{i}", *common)) for i in range(2)]
    try:
        # Mid-search: some trials done, most to come (the workers ask trials of ~1 s each).
        _poll("2 COMPLETE trials", lambda: _count_trials(postgres, "COMPLETE") >= 2, 120, workers[0][1])
        postgres.restart(down_s=3.0)
        done_at_restart = _count_trials(postgres, "COMPLETE")
    except BaseException:
        _kill(workers)
        raise
    assert done_at_restart < n_trials - 2, "the restart came too late to hit the search"
    _wait_ok(workers, start + 170)

    logs = [(cwd / "worker.log").read_text() for cwd, _ in workers]
    assert any("Database connection lost" in log for log in logs), "no worker met the restart"
    trials = optuna.load_study(study_name="restart", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * n_trials, [(t.number, t.state) for t in trials]
    assert sorted(t.number for t in trials) == list(range(n_trials))
    # No trial run twice: one job per trial, each with its own output folder and params.
    assert sum(_jobs(cwd) for cwd, _ in workers) == n_trials
    assert len({t.user_attrs["output_dir"] for t in trials}) == n_trials
    assert len({tuple(sorted(t.params.items())) for t in trials}) == n_trials


# --------------------------------------------------------------------------- worker killed -9


def test_killed_worker_trial_is_failed_and_retried_once(tmp_path: Path) -> None:
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from embft import names

    n_trials, start = 4, time.monotonic()
    storage = f"sqlite:///{tmp_path}/optuna.db"
    mlflow_uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = [
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=killed",
        f"hydra.sweeper.n_trials={n_trials}",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.heartbeat_interval=1",
        "hydra.sweeper.grace_period=3",
        f"mlflow_uri={mlflow_uri}",
        "close_stale_runs=true",
    ]
    MlflowClient(tracking_uri=mlflow_uri).search_experiments()  # creates the store's tables, before any worker
    # Worker 0's first trial would take 10 minutes: it is killed in it, its MLflow run RUNNING.
    victim = _worker(tmp_path / "w0", *common, "sleep_s=600")
    other = (tmp_path / "w1", None)
    try:

        def running_job() -> Any:
            client = MlflowClient(tracking_uri=mlflow_uri)
            experiment = client.get_experiment_by_name("sweeper_app")
            runs = client.search_runs(
                [experiment.experiment_id], f"attributes.status = 'RUNNING' and tags.`{names.OPTUNA_TRIAL}` = '0'"
            )
            return runs[0] if runs else None

        run = _poll("trial 0's MLflow run, RUNNING", running_job, 120, victim)
        assert optuna.load_study(study_name="killed", storage=storage).trials[0].state == TrialState.RUNNING
        # Another worker, as on another machine, with trials of 0.2 s: it runs the other trials
        # while worker 0 lives, then finds the study full and waits for worker 0's trial.
        other = (tmp_path / "w1", _worker(tmp_path / "w1", *common, "sleep_s=0.2"))
        _poll("worker 1 to wait", lambda: "Study full; waiting" in (other[0] / "worker.log").read_text(), 120, other[1])
    except BaseException:
        if other[1] is not None:
            _kill([other])
        raise
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    _wait_ok([other], start + 170)  # it retries trial 0 once the heartbeat says its worker is dead

    trials = optuna.load_study(study_name="killed", storage=storage).trials
    states = [(t.number, t.state.name, t.system_attrs.get("failed_trial")) for t in trials]
    dead = trials[0]
    assert dead.state == TrialState.FAIL, states
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1, states
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params, (retry, dead)
    assert retry.system_attrs["retry_history"] == [0]
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n_trials and len(trials) == n_trials + 1, states
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], states

    client = MlflowClient(tracking_uri=mlflow_uri)
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    experiment = client.get_experiment_by_name("sweeper_app")
    retry_runs = client.search_runs([experiment.experiment_id], f"tags.`{names.OPTUNA_TRIAL}` = '{retry.number}'")
    assert [r.info.status for r in retry_runs] == ["FINISHED"]
    assert retry_runs[0].data.tags[names.CONFIG_HASH] == run.data.tags[names.CONFIG_HASH]
