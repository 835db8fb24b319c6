"""Twin runs: a job whose training would repeat a FINISHED run's (the same weights, by the trainer's
twin rule, e.g. FlagEmbedding's inert no_in_batch_neg suffix) takes that run's results instead.

`job` is a TwinJob: what these functions read of the app's Job (embft.app.Job is one).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Protocol, runtime_checkable

from embft import names
from embft.config import Config
from embft.tracking import mlflow_runs

log = logging.getLogger("embft")


@runtime_checkable
class TwinJob(Protocol):
    """A job as the twin rule sees it (embft.app.Job): a Protocol, so tracking needs not import the app."""

    cfg: Config
    experiment_id: str
    metric: str  # the test score's name; names.validation(metric) for validation
    twin_key: Optional[str]  # the config hash with an inert no_in_batch_neg suffix left out
    twin_reason: Optional[str]  # why that suffix cannot change training

    def scored(self, run: Any) -> bool:
        """Does `run` hold every objective the job returns?"""
        ...


def finished_twin(job: TwinJob, own: Any) -> Optional[Any]:
    """A FINISHED run that trained what this job would train (see Job.twin_key), with its scores;
    none under force=true.

    While a twin that started earlier is still running (a parallel launcher starts twins together),
    wait for it: its result comes sooner than this job's own training would."""
    if not job.twin_key or job.cfg.force:
        return None
    waiting_for = None
    while True:
        runs = mlflow_runs.find_runs(
            job.experiment_id,
            {names.TWIN_KEY: job.twin_key, names.ROLE: names.ROLE_FINETUNE},
            statuses=("FINISHED", "RUNNING"),
        )
        found = next((r for r in runs if r.info.status == "FINISHED" and job.scored(r)), None)
        ahead = mlflow_runs.earlier_live_runs(runs, own)
        if found is not None or not ahead:
            return found
        if waiting_for != ahead[0].info.run_id:
            waiting_for = ahead[0].info.run_id
            log.info("Waiting for run %s, which trains the same weights (%s)", waiting_for, job.twin_reason)
        time.sleep(mlflow_runs.TWIN_POLL_S)


def take_twin(job: TwinJob, twin: Any) -> dict[str, float]:
    """Log the twin's metrics (with their histories) and scores as this run's: the same weights,
    evaluated the same way, would give the same numbers. Tagged with the run that trained."""
    import mlflow

    client = mlflow.MlflowClient()
    source = twin.data.tags.get(names.TRAINED_AS, twin.info.run_id)
    history = [point for key in twin.data.metrics for point in client.get_metric_history(twin.info.run_id, key)]
    run_id = mlflow.active_run().info.run_id
    for start_at in range(0, len(history), 1000):
        client.log_batch(run_id, metrics=history[start_at : start_at + 1000])
    mlflow.log_text(
        mlflow.artifacts.load_text(f"runs:/{twin.info.run_id}/{names.SCORES_ARTIFACT}"), names.SCORES_ARTIFACT
    )
    mlflow.set_tags(
        {
            names.TRAINED_AS: source,
            names.TWIN_REASON: job.twin_reason,
            # the baseline it was compared with, so a report groups the twin with the run that trained
            **{
                k: twin.data.tags[k] for k in (names.PRECISION, names.DEVICE, names.BASELINE_KEY) if k in twin.data.tags
            },
        }
    )
    log.info(
        "Not training: variant=%s trains the same weights as run %s (%s; train.reuse_twin=false trains anyway). "
        "Its scores are this run's: %s = %.4f, %s = %.4f.",
        job.cfg.variant.name,
        source,
        job.twin_reason,
        names.validation(job.metric),
        twin.data.metrics[names.validation(job.metric)],
        job.metric,
        twin.data.metrics[job.metric],
    )
    return twin.data.metrics
