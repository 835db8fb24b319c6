"""MLflow for multiruns: one parent run per Optuna study (or per grid sweep) with the jobs' runs
nested under it, pruned / best / Pareto-optimal trials tagged, and what a job returns to a search.

The parent run is created when a sweep starts and found again by its tag when the study is
resumed or another worker joins it, so the MLflow UI shows a study as one row that opens into
its trials. It is written with MlflowClient only: a job may run in the same process and needs
the fluent API's active run for itself.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from embft import names

log = logging.getLogger(__name__)

SWEEPER_NAME = "embft_optuna_sweeper"  # in the sweeper's _target_


# ------------------------------------------------------------------------------- what a job returns


def objective_values(metrics: Mapping[str, float], objectives: Sequence[Any]) -> float | list[float]:
    """What a job returns to the sweeper: the value of each objective's metric, in order.

    One objective gives a float (what a single-direction study expects), several a list.
    A missing metric is NaN, which the sweeper records as a failed trial.
    """
    if not objectives:
        raise ValueError("objectives: list at least one {metric, direction}")
    values = [float(metrics.get(_metric(o), math.nan)) for o in objectives]
    return values[0] if len(values) == 1 else values


def _metric(objective: Any) -> str:
    return str(objective["metric"] if isinstance(objective, Mapping) else objective.metric)


def mask_storage(resolved: dict) -> None:
    """Hide the password of the job's Optuna storage URL in its resolved config (what MLflow gets)."""
    node = resolved.get("optuna") or {}
    if node.get("storage"):
        from sqlalchemy.engine import make_url

        node["storage"] = make_url(node["storage"]).render_as_string(hide_password=True)


# ------------------------------------------------------------------------------------ parent runs


def is_optuna_sweep(config: Any) -> bool:
    from omegaconf import OmegaConf

    return SWEEPER_NAME in str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))


def parent_key(config: Any) -> str:
    """The parent run's key from the multirun's config (with its `hydra` node): the Optuna study
    (shared by every sweep and worker of the study), else the sweep folder."""
    from omegaconf import OmegaConf

    if is_optuna_sweep(config):
        name = OmegaConf.select(config, "hydra.sweeper.study_name") or config.hydra.job.name
        return f"study:{name}"
    return f"sweep:{names.sweep_id(config.hydra.sweep.dir)}"


def job_parent_key(study_name: Optional[str], sweep: Optional[str]) -> Optional[str]:
    """The same key seen from a job: its `optuna.study_name`, else its sweep (None for one run)."""
    if study_name is not None:
        return f"study:{study_name}"
    return None if sweep is None else f"sweep:{sweep}"


def _parents(client: Any, experiment_id: str, key: str) -> list:
    from embft.tracking.run_search import search_runs

    runs = search_runs(client, [experiment_id], {names.PARENT_KEY: key})
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def find_parent_run(experiment_id: str, key: Optional[str]) -> Optional[str]:
    """Run id of the parent run for `key` (the oldest, should two workers have raced), or None."""
    import mlflow

    if key is None:
        return None
    runs = _parents(mlflow.MlflowClient(), experiment_id, key)
    return runs[0].info.run_id if runs else None


def start_parent_run(experiment_id: str, config: Any) -> str:
    """Create the multirun's parent run, or reopen the one a previous sweep of the study made.

    Workers starting together may both create one; every worker then keeps the oldest and
    deletes its own extra, so all jobs nest under one parent without a lock.
    """
    import mlflow

    client = mlflow.MlflowClient()
    key = parent_key(config)
    existing = _parents(client, experiment_id, key)
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        log.info("MLflow parent run %s (%s) reopened", run_id, key)
        return run_id
    kind, _, name = key.partition(":")
    tags = {names.ROLE: kind, names.PARENT_KEY: key, "mlflow.runName": f"{kind}-{name.replace('/', '_')}"}
    if kind == "sweep":  # one process owns a grid sweep's parent: a later sweep can tell it died
        from embft.tracking import mlflow_runs

        tags.update({k: v for k, v in mlflow_runs.process_tags().items() if k != names.HEARTBEAT})
    if kind == "study":
        from sqlalchemy.engine import make_url

        storage = config.hydra.sweeper.storage
        if storage:  # where `embft report` finds the study (password hidden)
            tags[names.OPTUNA_STORAGE] = make_url(str(storage)).render_as_string(hide_password=True)
            tags.update(dashboard_tags(tags[names.OPTUNA_STORAGE]))
    own = client.create_run(experiment_id, tags=tags).info.run_id
    winner = _parents(client, experiment_id, key)[0].info.run_id
    if winner != own:
        client.delete_run(own)
        client.update_run(winner, status="RUNNING")
    log.info("MLflow parent run %s (%s)", winner, key)
    return winner


def dashboard_tags(storage: str) -> dict[str, str]:
    """The study in optuna-dashboard, linked from its parent run: the command that serves it and its URL."""
    from embft.sweeping.dashboard import dashboard_url

    return {
        "optuna.dashboard": dashboard_url(),
        "optuna.dashboard_command": f"make optuna-dashboard STORAGE='{storage}'",
    }


def close_dead_sweep_parents(experiment_id: str) -> list[str]:
    """Mark KILLED the grid sweeps' parent runs left RUNNING by a sweep whose process is gone from
    this machine (Ctrl-C or a kill: Hydra calls no callback then); returns their ids. A study's
    parent is shared by workers and left alone."""
    import mlflow

    from embft.tracking import mlflow_runs

    client = mlflow.MlflowClient()
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{names.ROLE}` = 'sweep' and attributes.status = 'RUNNING'"
    )
    closed = []
    for run in found:
        if mlflow_runs.process_gone(run):
            log.warning("Marking sweep parent run %s (its sweep process is gone) as KILLED", run.info.run_id)
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


def job_tags(experiment_id: str, study_name: Optional[str], sweep: Optional[str]) -> dict[str, str]:
    """Tags that nest a job's run under its parent ({} when there is none, e.g. a single run)."""
    parent = find_parent_run(experiment_id, job_parent_key(study_name, sweep))
    return {names.PARENT_RUN: parent} if parent else {}


# ------------------------------------------------------------------------------ end of a multirun


def count_runs(runs: Iterable[Any]) -> dict[str, int]:
    """Runs by status, FINISHED runs of pruned trials counted apart as PRUNED."""
    counts: dict[str, int] = {}
    for run in runs:
        status = run.info.status
        if status == "FINISHED" and run.data.tags.get(names.OPTUNA_PRUNED) == "true":
            status = "PRUNED"
        counts[status] = counts.get(status, 0) + 1
    return counts


def tag_trials(experiment_id: str, results: Mapping[str, Any]) -> None:
    """Tag each trial run of the study optuna.best_trial (one objective) or optuna.pareto."""
    import mlflow

    from embft.tracking import mlflow_runs

    if "best_trials" in results:
        tag, chosen = names.OPTUNA_PARETO, {str(t["number"]) for t in results["best_trials"] or []}
    elif results.get("best_trial_number") is not None:
        tag, chosen = names.OPTUNA_BEST, {str(results["best_trial_number"])}
    else:
        return
    client = mlflow.MlflowClient()
    for run in mlflow_runs.find_runs(
        experiment_id, {names.OPTUNA_STUDY: str(results["study_name"]), names.ROLE: "finetune"}
    ):
        chosen_run = run.data.tags.get(names.OPTUNA_TRIAL) in chosen
        client.set_tag(run.info.run_id, tag, str(chosen_run).lower())
        if chosen_run and tag == names.OPTUNA_BEST:
            log.info(
                "Best trial %s (value %s): MLflow run %s",
                results["best_trial_number"],
                results.get("best_value"),
                run.info.run_id,
            )


def finish_parent_run(experiment_id: str, run_id: str, config: Any, counts: Mapping[str, int]) -> None:
    """Close the parent run with the study's results: counts, best value and params (tags, as a
    resumed study may change them), optimization_results.yaml, the search plots; tag the trials."""
    import mlflow
    from mlflow.entities import Metric
    from omegaconf import OmegaConf

    client = mlflow.MlflowClient()
    try:
        finished = sum(counts.values())
        now = int(time.time() * 1000)
        # this sweep's runs; "skipped (already FINISHED)" -> sweep_n_skipped_already_finished (MLflow's name rules)
        metrics = [Metric("sweep_n_" + re.sub(r"\W+", "_", s.lower()).strip("_"), n, now, 0) for s, n in counts.items()]
        results_file = Path(config.hydra.sweep.dir) / names.RESULTS_FILE
        if results_file.is_file():
            results = OmegaConf.to_container(OmegaConf.load(results_file))
            tag_trials(experiment_id, results)
            client.log_artifact(run_id, str(results_file))
            metrics += [
                Metric(f"study_{k}", results[k], now, 0)
                for k in ("n_complete", "n_pruned", "n_failed")
                if results.get(k) is not None
            ]
            if results.get("best_value") is not None:
                # step = trials finished by then, so a resumed study's parent shows the best over time
                metrics.append(
                    Metric(
                        "best_value",
                        float(results["best_value"]),
                        now,
                        int(results["n_complete"]) + int(results.get("n_pruned") or 0),
                    )
                )
                client.set_tag(run_id, "best_trial_number", str(results["best_trial_number"]))
                for name, value in (results.get("best_params") or {}).items():
                    client.set_tag(run_id, f"best.{name}", str(value))
            if "best_trials" in results:
                client.set_tag(
                    run_id, "pareto_trial_numbers", ",".join(str(t["number"]) for t in results["best_trials"] or [])
                )
            _log_plots(client, run_id, config)
        client.log_batch(run_id, metrics=metrics)
        log.info(
            "MLflow parent run %s: %d runs (%s)",
            run_id,
            finished,
            ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
        )
    finally:
        client.set_terminated(run_id, status="FINISHED")  # never left RUNNING


def _log_plots(client: Any, run_id: str, config: Any) -> None:
    """The search plots (embft.tracking.study_plots) of the study, as artifacts `plots/*.png`."""
    import optuna

    from embft.tracking.study_plots import write_plots

    sweeper = config.hydra.sweeper
    name = sweeper.study_name or config.hydra.job.name
    try:
        study = optuna.load_study(study_name=str(name), storage=str(sweeper.storage))
        out = Path(config.hydra.sweep.dir) / "plots"
        for path in write_plots(study, out).values():
            client.log_artifact(run_id, str(path), "plots")
    except Exception as err:  # plots are a view; a missing one must not fail the sweep
        log.warning("No search plots for study %s: %s", name, err)
