"""Liveness of runs (issue 16): a RUNNING run is closed as KILLED only when its job is dead, and a
second job of a config that is running elsewhere backs off instead of training it again.

Fast: fake runs in a real SQLite MLflow store; the racing processes are in test_concurrent_jobs.py."""

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from embft.tracking import mlflow_runs
from embft.tracking.mlflow_runs import CLAIM, CONFIG_HASH, HEARTBEAT, HOST, PID, PID_NS


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(client, experiment id) on one SQLite store for the module (creating a store takes seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('liveness')}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    return client, client.create_experiment("liveness")


@pytest.fixture
def hash_():
    return uuid.uuid4().hex[:16]


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def fake_run(client, experiment_id, hash_, *, host="other-machine", pid=1234, age=0.0, start_ms=None, **extra):
    """A RUNNING run of config `hash_` as another job would have left it, heartbeat `age` s old."""
    tags = {CONFIG_HASH: hash_, HOST: host, PID: str(pid), PID_NS: mlflow_runs._pid_namespace(), **extra}
    if age is not None:
        tags[HEARTBEAT] = f"{time.time() - age:.0f}"
    return client.create_run(experiment_id, start_time=start_ms, tags=tags)


def status(client, run):
    return client.get_run(run.info.run_id).info.status


def test_only_dead_runs_are_closed_as_killed(store, hash_):
    client, exp = store
    here = socket.gethostname()
    live_elsewhere = fake_run(client, exp, hash_, age=5)
    silent_elsewhere = fake_run(client, exp, hash_, age=mlflow_runs.STALE_AFTER_S + 30)
    gone_here = fake_run(client, exp, hash_, host=here, pid=dead_pid(), age=1)  # kill -9 a second ago
    live_here = fake_run(client, exp, hash_, host=here, pid=os.getpid(), age=2)
    legacy = fake_run(client, exp, hash_, age=None, start_ms=int((time.time() - 3600) * 1000))  # before heartbeats

    mlflow_runs.close_stale_runs(exp, hash_)

    assert status(client, live_elsewhere) == "RUNNING", "a live run on another machine must never be closed"
    assert status(client, live_here) == "RUNNING"
    assert status(client, silent_elsewhere) == "KILLED"
    assert status(client, gone_here) == "KILLED"
    assert status(client, legacy) == "KILLED"


def test_a_live_twin_makes_the_job_back_off_without_a_trace(store, hash_, tmp_path, caplog):
    client, exp = store
    twin = fake_run(client, exp, hash_, host="gpu-node-7", pid=4242, age=12, start_ms=int((time.time() - 60) * 1000))
    with caplog.at_level("WARNING", logger="embft.tracking.mlflow_runs"):
        with mlflow_runs.job_run(exp, "job", {CONFIG_HASH: hash_}, note_dir=tmp_path / "job", settle_s=0) as run:
            assert run is None
            entered = True
    assert entered and mlflow.active_run() is None
    message = caplog.text
    assert "running elsewhere" in message and twin.info.run_id in message and "gpu-node-7 pid 4242" in message
    assert status(client, twin) == "RUNNING"
    visible = client.search_runs([exp], f"tags.`{CONFIG_HASH}` = '{hash_}'")
    assert [r.info.run_id for r in visible] == [twin.info.run_id], "the withdrawn claim is deleted"
    withdrawn = client.search_runs([exp], f"tags.`{CONFIG_HASH}` = '{hash_}'", run_view_type=ViewType.DELETED_ONLY)
    assert len(withdrawn) == 1 and withdrawn[0].info.status != "RUNNING"
    assert mlflow_runs.count_running_elsewhere(tmp_path) == 1


def test_a_dead_twin_does_not_stop_the_job(store, hash_):
    client, exp = store
    fake_run(client, exp, hash_, age=mlflow_runs.STALE_AFTER_S + 1, start_ms=int((time.time() - 600) * 1000))
    with mlflow_runs.job_run(exp, "job", {CONFIG_HASH: hash_}, settle_s=0) as run:
        assert run is not None
        assert client.get_run(run.info.run_id).data.tags[CLAIM] == "won"
    assert status(client, run) == "FINISHED"


def test_contenders_agree_on_exactly_one_winner(store, hash_):
    """Each contender decides from the same list: the earliest start goes ahead, ties by run id;
    a claim that has already won beats an earlier start (another machine's clock may run behind)."""
    client, exp = store
    now_ms = int(time.time() * 1000)
    contenders = [
        fake_run(client, exp, hash_, host=f"m{i}", start_ms=now_ms + d, **{CLAIM: "pending"})
        for i, d in enumerate((500, 0, 0, 900))
    ]
    twins = [mlflow_runs.live_twin(exp, hash_, c) for c in contenders]
    winners = [c for c, t in zip(contenders, twins) if t is None]
    assert len(winners) == 1
    assert winners[0].info.run_id == min((c for c in contenders[1:3]), key=lambda c: c.info.run_id).info.run_id

    client.set_tag(contenders[3].info.run_id, CLAIM, "won")  # the latest start, but it went ahead already
    twins = [mlflow_runs.live_twin(exp, hash_, c) for c in contenders[:3]]  # the pending ones
    assert {t.info.run_id for t in twins} == {contenders[3].info.run_id}


def test_the_heartbeat_is_refreshed_while_the_job_runs(store, hash_):
    client, exp = store
    with mlflow_runs.job_run(exp, "job", {CONFIG_HASH: hash_}, heartbeat_s=0.2, settle_s=0) as run:
        first = beat = float(client.get_run(run.info.run_id).data.tags[HEARTBEAT])  # whole seconds
        deadline = time.monotonic() + 60  # a beat every 0.2 s: the tag moves on within ~1 s, or never
        while beat == first:
            assert time.monotonic() < deadline, f"heartbeat still {first:.0f} after 60 s (beats every 0.2 s)"
            time.sleep(0.1)
            beat = float(client.get_run(run.info.run_id).data.tags[HEARTBEAT])
    assert beat > first
    assert not [t for t in threading.enumerate() if t.name.startswith("embft-heartbeat")], (
        "the thread stops with the run"
    )


def test_interrupted_job_ends_killed(store, hash_):
    client, exp = store
    with pytest.raises(KeyboardInterrupt):
        with mlflow_runs.job_run(exp, "job", {CONFIG_HASH: hash_}, settle_s=0) as run:
            raise KeyboardInterrupt
    assert status(client, run) == "KILLED"


def test_jobs_probing_one_store_folder_together_do_not_collide(tmp_path):
    """Two jobs started 2 s apart failed with 'No such file ... .embft-write-probe' (one name, two probes)."""

    def probe(_):
        for _ in range(30):
            mlflow_runs.probe_writable(tmp_path / "mlruns")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(probe, range(8)))  # raises the first OSError of any thread
    assert not list((tmp_path / "mlruns").iterdir()), "probes leave nothing behind"


def test_a_killed_sweeps_parent_run_is_closed_by_the_next_sweep(store, tmp_path):
    """Ctrl-C or `kill` ends a grid sweep without Hydra's end callback: its parent run stayed
    RUNNING for good. The next sweep in the experiment marks it KILLED; a live sweep's parent and
    an Optuna study's (shared by workers) are left alone."""
    from omegaconf import OmegaConf

    from embft import names
    from embft.tracking import study_runs

    client, exp = store
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "multirun" / "grid" / "t0")}}})
    own = study_runs.start_parent_run(exp, config)  # this process: alive
    assert client.get_run(own).data.tags[PID] == str(os.getpid())
    here, ns = socket.gethostname(), mlflow_runs._pid_namespace()
    dead = {HOST: here, PID: str(dead_pid()), PID_NS: ns}
    killed_sweep = client.create_run(exp, tags={names.ROLE: "sweep", **dead})
    study = client.create_run(exp, tags={names.ROLE: "study", **dead})
    elsewhere = client.create_run(exp, tags={names.ROLE: "sweep", HOST: "other-machine", PID: "1234", PID_NS: ns})

    assert study_runs.close_dead_sweep_parents(exp) == [killed_sweep.info.run_id]
    assert status(client, killed_sweep) == "KILLED"
    assert [status(client, r) for r in (study, elsewhere)] == ["RUNNING", "RUNNING"]
    assert client.get_run(own).info.status == "RUNNING"


def test_a_sweep_that_skipped_jobs_closes_its_parent_run_with_every_count(store, tmp_path):
    """A rerun that skips finished configs counts them as "skipped (already FINISHED)": the parent
    run's metrics once failed MLflow's name check, so the counts were lost."""
    from omegaconf import OmegaConf

    from embft.tracking import study_runs

    client, exp = store
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "multirun" / "rerun" / "t0")}}})
    parent = study_runs.start_parent_run(exp, config)
    counts = {"FINISHED": 3, "skipped (already FINISHED)": 2, "running elsewhere": 1}
    study_runs.finish_parent_run(exp, parent, config, counts)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {
        "sweep_n_finished": 3,
        "sweep_n_skipped_already_finished": 2,
        "sweep_n_running_elsewhere": 1,
    }
