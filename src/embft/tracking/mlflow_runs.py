"""Tracking: MLflow experiments, one run per job, the baseline run, and resume by config hash."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from embft.config import TrackingConfig
from embft.errors import EmbftError
from embft.names import (
    BACKED_OFF,
    BASELINE_KEY,
    CLAIM,
    CONFIG_HASH,
    ERROR,
    ERROR_ARTIFACT,
    GIT_COMMIT,
    HEARTBEAT,
    HOST,
    OPTUNA_PRUNED,
    PID,
    PID_NS,
    ROLE,
    ROLE_BASELINE,
    SCORES_ARTIFACT,
    VALIDATION_PREFIX,
)
from embft.tracking.identity import config_hash, twin_key  # noqa: F401  (a job's identity: its own module)

log = logging.getLogger(__name__)

# Liveness (who is running a config right now). A job's run carries where it runs and a heartbeat
# (epoch seconds) that a thread refreshes; a RUNNING run is dead, and may be closed as KILLED, only
# when its heartbeat is older than STALE_AFTER_S or its process is gone from this very machine.
HEARTBEAT_INTERVAL_S = 30.0
STALE_AFTER_S = 4 * HEARTBEAT_INTERVAL_S  # missed beats tolerated: a loaded store or a busy GIL delays one
CLAIM_SETTLE_S = 1.0  # wait between claiming and checking, longer than a store write takes to show
TWIN_POLL_S = 5.0  # how often a job looks again for a twin run that trains its weights right now
RUNNING_ELSEWHERE_FILE = "running_elsewhere.json"  # in a skipped job's output folder, for the sweep summary

# MLflow's own client retries (urllib3 Retry, see mlflow.environment_variables), set for an
# http(s) store unless the environment already sets them. A refused or dropped request is retried
# after 0, 2, 4, 8, 16, 32, 64 s (factor 1: sleeps 2**(n-1) s, plus up to 1 s jitter), so a call
# waits out a server that is away for up to ~2 min and resumes at most ~2x the outage after it
# began; a 40 s restart thus leaves a heartbeat at most ~30 + 62 s old, under STALE_AFTER_S, and
# no other job takes the run for dead. MLflow's defaults (7, factor 2) wait ~4 min, longer than a
# heartbeat may lag. MLFLOW_HTTP_REQUEST_TIMEOUT (120 s a request) stays MLflow's.
CLIENT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def setup(tracking_cfg: TrackingConfig) -> str:
    """Point MLflow at the store and return the experiment id (created with its artifact root)."""
    import mlflow

    uri = tracking_cfg.uri
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        try:
            probe_writable(db.parent)
        except OSError as err:
            raise EmbftError(
                f"tracking.uri={uri}: cannot write to {db.parent} ({err}); choose a writable location."
            ) from err
    elif uri.startswith(("http://", "https://")):
        for name, value in CLIENT_RETRIES.items():
            os.environ.setdefault(name, value)
        _check_server(uri)
    elif is_database(uri):
        uri = store_uri(uri)
        _check_database(uri)
    mlflow.set_tracking_uri(uri)
    lock = nullcontext()
    if uri.startswith("sqlite:///"):
        from filelock import FileLock

        # Jobs started together on a new SQLite store would both run MLflow's schema migrations
        # (alembic: "expected to match one row ... 0 found"); the first creates it, the others wait.
        lock = FileLock(str(db.parent / f".{db.name}.init.lock"))
    with lock:
        return _experiment(tracking_cfg, uri)


def _experiment(tracking_cfg: Any, uri: str) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    name = tracking_cfg.experiment_name
    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        if tracking_cfg.artifact_root is None:  # the store's default, e.g. a server's mlflow-artifacts:
            return mlflow.create_experiment(name)
        artifacts = Path(tracking_cfg.artifact_root).expanduser().resolve() / name
        return mlflow.create_experiment(name, artifact_location=artifacts.as_uri())
    except MlflowException as err:
        if "already exists" in str(err):  # another worker created it first
            return mlflow.get_experiment_by_name(name).experiment_id
        raise EmbftError(f"tracking.uri={uri}: MLflow refused the store ({err}).") from err


def probe_writable(folder: Path) -> None:
    """Create `folder` and a file in it, or raise OSError. A unique name: jobs started together probe
    the same folder at the same moment."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".embft-write-probe."):
        pass


def _check_server(uri: str, timeout: float = 10.0) -> None:
    """Fail in seconds with one line when a tracking server is down; MLflow's own client retries
    with backoff for minutes before it says so. Only an unreachable host counts: a proxy that
    answers /health with an HTTP error may still serve the API."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise EmbftError(
            f"tracking.uri={uri}: no MLflow server answers ({reason}); start one "
            "(`make mlflow-server`) or point tracking.uri / EMBFT_MLFLOW_URI at it."
        ) from err


DATABASES = ("postgresql", "mysql", "mssql")  # MLflow's database stores besides SQLite


def is_database(uri: str) -> bool:
    return uri.split(":", 1)[0].split("+", 1)[0] in DATABASES


def store_uri(uri: str) -> str:
    """`postgresql://` (MLflow's documented form) as `postgresql+psycopg2://` where psycopg 3 is missing:
    SQLAlchemy 2.1 maps the bare scheme to psycopg 3, while embft installs psycopg2 (as the sweeper's
    storage does, embft.sweeping.storage)."""
    import importlib.util

    if uri.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        if importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + uri[len("postgresql://") :]
    return uri


def masked(uri: str) -> str:
    """A database URI with its password hidden (what a message or a param may show)."""
    if not is_database(uri):
        return uri
    from sqlalchemy.engine import make_url

    return make_url(uri).render_as_string(hide_password=True)


def _check_database(uri: str, timeout: int = 10) -> None:
    """Fail in seconds with one line when the database is down or its driver missing; MLflow's store
    retries its first connection for about two minutes, then ends in SQLAlchemy's traceback."""
    import sqlalchemy
    import sqlalchemy.exc

    try:
        engine = sqlalchemy.create_engine(
            uri, poolclass=sqlalchemy.pool.NullPool, connect_args={"connect_timeout": timeout}
        )
    except (ImportError, sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as err:
        raise EmbftError(f"tracking.uri={masked(uri)}: no database driver for it ({err}).") from err
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as err:
        reason = str(getattr(err, "orig", err)).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EmbftError(
            f"tracking.uri={masked(uri)}: the database does not answer ({reason}); start it or point "
            "tracking.uri / EMBFT_MLFLOW_URI at a running one."
        ) from err
    finally:
        engine.dispose()


def _server_away(err: BaseException) -> bool:
    """An MLflow client call that gave up on an unreachable server (retries spent)."""
    from mlflow.exceptions import MlflowException

    text = str(err)
    return isinstance(err, MlflowException) and "API request to" in text and "Max retries exceeded" in text


def _versions() -> dict[str, str]:
    tags = {}
    for package in ("torch", "transformers", "FlagEmbedding", "mteb", "sentence-transformers", "mlflow"):
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return tags


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def find_runs(experiment_id: str, tags: dict[str, str], statuses: tuple[str, ...] = ("FINISHED",)) -> list:
    """The experiment's runs whose tags equal `tags`, in `statuses`: all of them (every page), any tag value."""
    from mlflow.tracking import MlflowClient

    from embft.tracking.run_search import search_runs

    return search_runs(MlflowClient(), [experiment_id], tags, statuses=statuses)


def is_pruned(run: Any) -> bool:
    """A run of a trial that the study's pruner stopped: FINISHED, but with a partial score and no model."""
    return run.data.tags.get(OPTUNA_PRUNED) == "true"


def eligible_for_best(run: Any, metric: str) -> bool:
    """May `run` be chosen as a "best" by `metric` (log_model=best, the registry's champion)? Only a
    FINISHED run that trained to the end (not pruned) and was scored on validation: a choice is never
    made on the test split alone, nor against a trial that stopped half-way."""
    validation = metric if metric.startswith(VALIDATION_PREFIX) else f"{VALIDATION_PREFIX}{metric}"
    metrics = run.data.metrics
    return run.info.status == "FINISHED" and not is_pruned(run) and metric in metrics and validation in metrics


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")  # containers on one host share its name, not their pids
    except OSError:
        return ""


def process_tags() -> dict[str, str]:
    """Where this job runs, and a first heartbeat."""
    return {
        HOST: socket.gethostname(),
        PID: str(os.getpid()),
        PID_NS: _pid_namespace(),
        HEARTBEAT: f"{time.time():.0f}",
    }


def heartbeat_age(run: Any, now: Optional[float] = None) -> float:
    """Seconds since the run's last heartbeat (its start time for runs logged before heartbeats)."""
    tags = run.data.tags
    try:
        beat = float(tags[HEARTBEAT])
    except (KeyError, ValueError):
        beat = (run.info.start_time or 0) / 1000
    return (time.time() if now is None else now) - beat


def process_gone(run: Any) -> bool:
    """Whether the run's process (its HOST/PID tags) ran on this very machine and has ended."""
    tags = run.data.tags
    same_machine = tags.get(HOST) == socket.gethostname() and tags.get(PID_NS, "") == _pid_namespace()
    if not (same_machine and tags.get(PID, "").isdigit()):
        return False
    try:
        os.kill(int(tags[PID]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, another user's
        pass
    return False


def is_alive(run: Any, now: Optional[float] = None) -> tuple[bool, str]:
    """(alive, why) for a RUNNING run: a fresh heartbeat, unless its process is gone from this machine."""
    tags = run.data.tags
    age = heartbeat_age(run, now)
    if process_gone(run):
        return False, f"its process {tags[PID]} on this machine is gone"
    if age > STALE_AFTER_S:
        return False, f"no heartbeat for {age:.0f} s"
    return True, f"heartbeat {max(age, 0):.0f} s ago"


def close_stale_runs(experiment_id: str, hash_: str) -> None:
    """Runs of this config left RUNNING by a dead process are marked KILLED, never reused; a live
    run (fresh heartbeat) is left alone, whoever runs it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    now = time.time()
    for run in find_runs(experiment_id, {CONFIG_HASH: hash_}, statuses=("RUNNING",)):
        alive, why = is_alive(run, now)
        if not alive:
            log.warning("Marking run %s (left RUNNING by an interrupted job: %s) as KILLED", run.info.run_id, why)
            client.set_terminated(run.info.run_id, status="KILLED")


def _start_order(run: Any) -> tuple:
    return (run.info.start_time, run.info.run_id)


def earlier_live_runs(runs: list, own: Any) -> list:
    """The RUNNING runs of `runs` started before `own` that are alive, earliest first: a strict
    order (start time, then run id), so two runs never wait for each other."""
    now = time.time()
    earlier = (r for r in runs if r.info.status == "RUNNING" and _start_order(r) < _start_order(own))
    return sorted((r for r in earlier if is_alive(r, now)[0]), key=_start_order)


def live_twin(experiment_id: str, hash_: str, own: Any) -> Optional[Any]:
    """The live run of this config that goes ahead of `own` (a just-created RUNNING run), or None.

    Every contender decides from the same list by the same rule, so exactly one goes ahead: a run
    that already won its claim beats any other; else the earliest (start time, run id)."""
    now = time.time()
    runs = find_runs(experiment_id, {CONFIG_HASH: hash_}, statuses=("RUNNING",))
    won = [
        r for r in runs if r.info.run_id != own.info.run_id and r.data.tags.get(CLAIM) == "won" and is_alive(r, now)[0]
    ]
    return (won or earlier_live_runs(runs, own) or [None])[0]


class Heartbeat:
    """Refreshes the run's heartbeat tag every `interval` seconds from a daemon thread."""

    def __init__(self, run_id: str, interval: float = HEARTBEAT_INTERVAL_S):
        from mlflow.tracking import MlflowClient

        self.run_id, self.interval = run_id, interval
        self._client = MlflowClient()  # the store setup() chose; works in a thread (no fluent state)
        self._stop = threading.Event()
        self._last_ok = time.time()
        self._thread = threading.Thread(target=self._loop, name=f"embft-heartbeat-{run_id[:8]}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._client.set_tag(self.run_id, HEARTBEAT, f"{time.time():.0f}")
                self._last_ok = time.time()
            except Exception as err:  # a busy store: try again next beat, warn before others give up on us
                if time.time() - self._last_ok > STALE_AFTER_S / 2:
                    log.warning(
                        "Heartbeat of run %s not written for %.0f s (%s); another job may take it for dead "
                        "after %.0f s",
                        self.run_id,
                        time.time() - self._last_ok,
                        err,
                        STALE_AFTER_S,
                    )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def count_running_elsewhere(sweep_dir: Path) -> int:
    """Jobs of a sweep that skipped because their config was running elsewhere."""
    return sum(1 for _ in Path(sweep_dir).rglob(RUNNING_ELSEWHERE_FILE)) if Path(sweep_dir).is_dir() else 0


def _back_off(run: Any, twin: Any, note_dir: Optional[Path]) -> None:
    """Withdraw this job's claim: end and delete its run (no trace in searches, the UI or reports)."""
    import mlflow

    tags = twin.data.tags
    where = f"{tags.get(HOST, '?')} pid {tags.get(PID, '?')}"
    age = heartbeat_age(twin)
    log.warning(
        "Skipping: this config (%s=%s) is running elsewhere as run %s (%s, heartbeat %.0f s ago); its result "
        "will be logged there. Run the command again after it ends: it then skips, or retrains if that job "
        "died (no heartbeat for %.0f s).",
        CONFIG_HASH,
        tags.get(CONFIG_HASH),
        twin.info.run_id,
        where,
        max(age, 0),
        STALE_AFTER_S,
    )
    mlflow.set_tag(BACKED_OFF, twin.info.run_id)
    mlflow.end_run(status="KILLED")
    mlflow.MlflowClient().delete_run(run.info.run_id)
    if note_dir is not None:
        note_dir.mkdir(parents=True, exist_ok=True)
        (note_dir / RUNNING_ELSEWHERE_FILE).write_text(
            json.dumps({"run_id": twin.info.run_id, "host": tags.get(HOST), "pid": tags.get(PID)})
        )


@contextmanager
def job_run(
    experiment_id: str,
    run_name: str,
    tags: dict[str, str],
    note_dir: Optional[Path] = None,
    heartbeat_s: float = HEARTBEAT_INTERVAL_S,
    settle_s: float = CLAIM_SETTLE_S,
) -> Iterator[Any]:
    """An MLflow run that ends FINISHED, or FAILED with the traceback as an artifact, or KILLED;
    its heartbeat is kept fresh while it runs.

    Yields None instead when a live run of the same config (tag CONFIG_HASH) goes ahead of it: the
    job then does nothing (its claim is deleted, `note_dir` gets RUNNING_ELSEWHERE_FILE). The claim
    is a run, so this works with any MLflow store, a server included, without a lock service:
    create the run, wait `settle_s`, and look for a live twin (`live_twin`). Skip rather than wait:
    on a shared store the twin's result lands in the same experiment, and a worker of a sweep is
    better used on its next job than blocked for the twin's whole training.
    """
    import mlflow

    run = mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, tags={**tags, **_versions(), **process_tags(), CLAIM: "pending"}
    )
    beat = Heartbeat(run.info.run_id, heartbeat_s)
    try:
        hash_ = tags.get(CONFIG_HASH)
        if hash_:
            time.sleep(settle_s)
            twin = live_twin(experiment_id, hash_, run)
            if twin is not None:
                beat.stop()
                _back_off(run, twin, note_dir)
                yield None
                return
        mlflow.set_tag(CLAIM, "won")
        commit = git_commit()
        if commit:
            mlflow.set_tag(GIT_COMMIT, commit)
    except BaseException as err:
        beat.stop()
        if mlflow.active_run() is not None:
            mlflow.end_run(status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    try:
        yield run
    except KeyboardInterrupt:
        beat.stop()
        mlflow.end_run(status="KILLED")
        raise
    except BaseException as err:
        beat.stop()
        try:
            mlflow.set_tag(ERROR, f"{type(err).__name__}: {err}"[:5000])
            mlflow.log_text(traceback.format_exc(), ERROR_ARTIFACT)
        except Exception as away:  # the store is away too: the error stays in the job's log
            log.warning("Could not log the error of run %s (%s)", run.info.run_id, away)
        try:
            mlflow.end_run(status="FAILED")  # ends the active run first, so the sweep's next job starts its own
        except Exception as away:  # still RUNNING there; a rerun of the command closes it and retrains
            log.warning("Could not mark run %s FAILED (%s)", run.info.run_id, away)
        if _server_away(err):
            raise EmbftError(
                f"the MLflow server at {mlflow.get_tracking_uri()} did not answer for the client's retries "
                f"({err}); run the command again once it is back: finished jobs are skipped."
            ) from err
        raise
    else:
        beat.stop()
        mlflow.end_run(status="FINISHED")


# MLflow's runs.name is varchar(250): a tracking server on PostgreSQL refuses a longer name (SQLite does not).
RUN_NAME_MAX = 250
# What tells a sweep's jobs apart, first in a name that has to be cut (report.labels reads arm= from it).
NAME_FIRST = ("arm", "data", "variant", "train.seed", "train.per_class")


def short_run_name(overrides: list[str], limit: int = RUN_NAME_MAX) -> str:
    """The overrides as a run name of at most `limit` characters: the keys of NAME_FIRST first, then the rest
    in order while they fit, "..." where some were left out (every override is in the run's params)."""

    def rank(override: str) -> int:
        key = override.split("=", 1)[0]
        return NAME_FIRST.index(key) if key in NAME_FIRST else len(NAME_FIRST)

    kept: list[str] = []
    for override in sorted(overrides, key=rank):
        if len(",".join([*kept, override, "..."])) <= limit:
            kept.append(override)
    name = ",".join(kept)
    return name if len(kept) == len(overrides) else f"{name},..."[:limit]


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    items = [(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):
        mlflow.log_params({k: v[:6000] for k, v in items[start : start + 100]})


def log_series(name: str, points: list[tuple[int, float]]) -> None:
    """A metric per step (e.g. the training loss), in batches."""
    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(name, value, now, step) for step, value in points]
    run_id = mlflow.active_run().info.run_id
    for start in range(0, len(metrics), 1000):
        mlflow.MlflowClient().log_batch(run_id, metrics=metrics[start : start + 1000])


def ensure_baseline_run(
    experiment_id: str, key: str, metrics: dict[str, float], scores: dict[str, Any], params: dict[str, Any]
) -> None:
    """One FINISHED baseline run per (experiment, baseline key), so fine-tuned runs show a delta.

    Logged with the client, not the fluent API, so that it never nests in the job's own run.
    """
    import mlflow
    from mlflow.entities import Metric, Param

    if find_runs(experiment_id, {ROLE: ROLE_BASELINE, BASELINE_KEY: key}):
        return
    client = mlflow.MlflowClient()
    tags = {ROLE: ROLE_BASELINE, BASELINE_KEY: key, "mlflow.runName": f"baseline-{params.get('model.name', 'model')}"}
    run = client.create_run(experiment_id, tags={**tags, **_versions()})
    try:
        now = int(time.time() * 1000)
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            params=[Param(k, str(v)[:6000]) for k, v in params.items()],
        )
        client.log_text(run.info.run_id, json.dumps(scores, indent=2), SCORES_ARTIFACT)
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
