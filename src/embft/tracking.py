"""Tracking: MLflow experiments, one run per job, the baseline run, and resume by config hash."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
import traceback
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Optional

from embft.errors import EmbftError

log = logging.getLogger(__name__)

ROLE, SWEEP, CONFIG_HASH, BASELINE_KEY = "embft.role", "embft.sweep", "embft.config_hash", "embft.baseline_key"
# Keys that locate things rather than choose them: they stay out of the config hash.
LOCATION_KEYS = ("paths", "tracking", "optuna", "force", "debug")
# Keys added after studies were logged: at these defaults they leave a job's hash as it was, so
# rerunning an older study's command still skips its finished jobs.
HASH_NEUTRAL = {("train", "nproc_per_node"): 1, ("train", "negatives_cross_device"): False,
                ("eval", "precision"): "fp32", ("eval", "backend"): "torch"}  # issue 15: eval encode settings


def default_tracking_uri() -> str:
    from embft.config import project_root

    return f"sqlite:///{project_root()}/mlruns/mlflow.db"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_hash(resolved: dict) -> str:
    """Hash of the settings that decide a result (locations and trial bookkeeping excluded)."""
    chosen = {k: v for k, v in resolved.items() if k not in LOCATION_KEYS}
    for (group, key), neutral in HASH_NEUTRAL.items():
        if isinstance(chosen.get(group), dict) and chosen[group].get(key, neutral) == neutral:
            chosen[group] = {k: v for k, v in chosen[group].items() if k != key}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:16]


def setup(tracking_cfg: Any) -> str:
    """Point MLflow at the store and return the experiment id (created with its artifact root)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_cfg.uri
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            probe = db.parent / ".embft-write-probe"
            probe.touch()
            probe.unlink()
        except OSError as err:
            raise EmbftError(f"tracking.uri={uri}: cannot write to {db.parent} ({err}); choose a writable location.") from err
    elif uri.startswith(("http://", "https://")):
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
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
        raise EmbftError(f"tracking.uri={uri}: no MLflow server answers ({reason}); start one "
                         "(`make mlflow-server`) or point tracking.uri / EMBFT_MLFLOW_URI at it.") from err


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
    from mlflow.tracking import MlflowClient

    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = MlflowClient().search_runs([experiment_id], filter_string=query, max_results=1000)
    return [r for r in runs if r.info.status in statuses]


def close_stale_runs(experiment_id: str, hash_: str) -> None:
    """Runs of this config left RUNNING by a killed process are marked KILLED, never reused."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for run in find_runs(experiment_id, {CONFIG_HASH: hash_}, statuses=("RUNNING",)):
        log.warning("Marking run %s (left RUNNING by an interrupted job) as KILLED", run.info.run_id)
        client.set_terminated(run.info.run_id, status="KILLED")


@contextmanager
def job_run(experiment_id: str, run_name: str, tags: dict[str, str]) -> Iterator[Any]:
    """An MLflow run that ends FINISHED, or FAILED with the traceback as an artifact, or KILLED."""
    import mlflow

    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags={**tags, **_versions()})
    commit = git_commit()
    if commit:
        mlflow.set_tag("git_commit", commit)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise
    except BaseException as err:
        mlflow.set_tag("error", f"{type(err).__name__}: {err}"[:5000])
        mlflow.log_text(traceback.format_exc(), "error.txt")
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


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


def ensure_baseline_run(experiment_id: str, key: str, result: Any, metric: str, params: dict[str, Any]) -> None:
    """One FINISHED baseline run per (experiment, baseline key), so fine-tuned runs show a delta.

    Logged with the client, not the fluent API, so that it never nests in the job's own run.
    """
    import mlflow
    from mlflow.entities import Metric, Param

    if find_runs(experiment_id, {ROLE: "baseline", BASELINE_KEY: key}):
        return
    client = mlflow.MlflowClient()
    tags = {ROLE: "baseline", BASELINE_KEY: key, "mlflow.runName": f"baseline-{params.get('model.name', 'model')}"}
    run = client.create_run(experiment_id, tags={**tags, **_versions()})
    try:
        now = int(time.time() * 1000)
        values = {metric: result.accuracy, f"{metric}_std": result.accuracy_std, "f1": result.f1}
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, v, now, 0) for k, v in values.items()],
            params=[Param(k, str(v)[:6000]) for k, v in params.items()],
        )
        client.log_text(run.info.run_id, json.dumps(result.scores, indent=2), "mteb_scores.json")
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
