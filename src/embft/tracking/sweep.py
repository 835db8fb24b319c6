"""The end of a multirun as Hydra's callback sees it: the MLflow store created before parallel jobs
race to, the study's parent run, the count of the sweep's runs, the best run registered."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from embft import names
from embft.errors import EmbftError
from embft.tracking import mlflow_runs, study_runs

log = logging.getLogger("embft")
# Left in a job's output folder when it skipped an already finished config (counted by SweepSummary).
SKIPPED_MARKER = ".embft-skipped"
# Left there when the job failed: the sweep's exit status holds even when the store cannot be read
# at the end (a tracking server still away), or the job failed before it had a run.
FAILED_MARKER = ".embft-failed"


class SweepSummary(Callback):
    """Create the MLflow store before parallel jobs race to; at the end, count the sweep's runs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            experiment_id = mlflow_runs.setup(config.tracking)
        except EmbftError as err:
            log.error("%s", err)
            raise SystemExit(1) from None
        try:  # the study's (or sweep's) parent run; the jobs run without it if MLflow refuses
            study_runs.close_dead_sweep_parents(experiment_id)
            study_runs.start_parent_run(experiment_id, config)
        except Exception as err:
            log.warning("No parent run: %s", err)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep = names.sweep_id(sweep_dir)
        try:
            experiment_id = mlflow_runs.setup(config.tracking)
            runs = mlflow_runs.find_runs(
                experiment_id, {names.SWEEP: sweep}, ("FINISHED", "FAILED", "KILLED", "RUNNING")
            )
        except Exception as err:  # a summary must never mask the sweep's own outcome
            log.warning("No sweep summary: %s", err)
            _exit_if_failed(sweep_dir, sweep, 0)
            return
        counts = study_runs.count_runs(runs)  # PRUNED counted apart, never a failure
        skipped = len(list(sweep_dir.glob(f"**/{SKIPPED_MARKER}")))
        if skipped:
            counts["skipped (already FINISHED)"] = skipped
        elsewhere = mlflow_runs.count_running_elsewhere(sweep_dir)  # skipped too: a live twin runs the config
        if elsewhere:
            counts["running elsewhere"] = elsewhere
        log.info("Sweep %s: %s", sweep, ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no runs logged")
        try:  # best / Pareto tags on the trials, results and plots on the parent run, closed FINISHED
            parent = study_runs.find_parent_run(experiment_id, study_runs.parent_key(config))
            if parent is not None:
                study_runs.finish_parent_run(experiment_id, parent, config, counts)
        except Exception as err:
            log.warning("Parent run not completed: %s", err)
        from embft.tracking.registry import register_sweep_best

        try:  # the best run's classifier becomes NAME@champion
            register_sweep_best(config, experiment_id, sweep)
        except EmbftError as err:
            log.error("%s", err)
            raise SystemExit(1) from None
        _exit_if_failed(sweep_dir, sweep, counts.get("FAILED", 0) + counts.get("KILLED", 0))


def _exit_if_failed(sweep_dir: Path, sweep: str, failed_runs: int) -> None:
    """Exit 1 when a job of the sweep failed, by its MLflow run or by the marker it left."""
    failed = max(failed_runs, len(list(sweep_dir.glob(f"**/{FAILED_MARKER}"))))
    if failed:
        log.error(
            "%d job(s) of sweep %s failed; their MLflow runs hold the error (tag `error`, error.txt) where "
            "they have one, the log above where not. Rerunning the same command skips the finished jobs.",
            failed,
            sweep,
        )
        raise SystemExit(1)
