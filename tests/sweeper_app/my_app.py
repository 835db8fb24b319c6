"""Tiny Hydra app driving the embft_optuna sweeper in tests.

With `steps` > 0 a job is a synthetic learning curve: embft's LiveTrainingCallback scores it every
step, reports the score to the job's Optuna trial and stops when the study's pruner says so.
With `mlflow_uri` each job logs an MLflow run as embft's jobs do, nested under the multirun's
parent run (embft.tracking.study_runs), which AppRuns opens and closes like embft's SweepSummary; with
`close_stale_runs` too, the run carries its config's hash and, as embft's jobs, the job first
marks that config's runs left RUNNING by a dead process KILLED (embft.tracking.mlflow_runs.close_stale_runs).
"""

import math
import os
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

EXPERIMENT = "sweeper_app"


def _experiment_id(uri: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    return exp.experiment_id if exp else mlflow.create_experiment(EXPERIMENT)


class AppRuns(Callback):
    """The parent run: opened when the multirun starts, closed with the study's results."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.mlflow_uri:
            from embft.tracking import study_runs

            study_runs.start_parent_run(_experiment_id(config.mlflow_uri), config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.mlflow_uri:
            return
        from embft import names
        from embft.tracking import mlflow_runs, study_runs

        experiment_id = _experiment_id(config.mlflow_uri)
        parent = study_runs.find_parent_run(experiment_id, study_runs.parent_key(config))
        sweep = names.sweep_id(config.hydra.sweep.dir)
        runs = mlflow_runs.find_runs(experiment_id, {names.SWEEP: sweep}, ("FINISHED", "FAILED"))
        counts = study_runs.count_runs(runs)
        print("COUNTS", sorted(counts.items()))
        study_runs.finish_parent_run(experiment_id, parent, config, counts)


def _rendezvous(cfg: DictConfig) -> None:
    """Wait until `rendezvous` worker processes have each started a job (a file per process in
    `rendezvous_dir`, polled): the shared-study tests' workers then surely run side by side."""
    if not cfg.rendezvous:
        return
    folder = Path(cfg.rendezvous_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + 240
    while len(list(folder.iterdir())) < cfg.rendezvous:
        if time.monotonic() > deadline:
            raise RuntimeError(f"rendezvous: {len(list(folder.iterdir()))} of {cfg.rendezvous} workers came")
        time.sleep(0.05)


def objective(cfg: DictConfig) -> Any:
    trial = cfg.optuna.trial_number
    _rendezvous(cfg)
    time.sleep(cfg.sleep_s)  # how long a job takes (the e2e fault tests kill a worker mid-job)
    if cfg.mode == "raise" or trial in cfg.raise_on_trials:
        raise RuntimeError(f"requested failure (trial {trial})")
    if cfg.mode == "nan" or trial in cfg.nan_on_trials:
        return math.nan
    value = -((cfg.x - 2) ** 2) - (cfg.y + 1) ** 2
    if cfg.steps:
        value = _learning_curve(cfg, value)
    if cfg.multi_objective:
        return [value, abs(cfg.x)]
    return value


def _learning_curve(cfg: DictConfig, final: float) -> Any:
    """Drive embft's callback as the Trainer would, with the score rising towards `final`."""
    import optuna
    import torch
    from transformers import TrainerControl, TrainerState

    from embft.sweeping.trial_reporter import TrialReporter
    from embft.training.callbacks import LiveTrainingCallback

    reporter = TrialReporter.from_config(cfg.optuna)
    if cfg.prune_by == "raise" and reporter is not None:
        reporter.prune = lambda step=None: None  # the sweeper tells PRUNED from the raised TrialPruned
    callback = LiveTrainingCallback(lambda step, model: final - (cfg.steps - step), every_steps=1, reporter=reporter)
    state, control, model = TrainerState(), TrainerControl(), torch.nn.Linear(1, 1)
    for step in range(1, cfg.steps + 1):
        state.global_step = step
        callback.on_step_end(None, state, control, model=model)
        if control.should_training_stop:
            if cfg.prune_by == "raise":
                raise optuna.TrialPruned(f"pruned at step {step}")
            return final - (cfg.steps - step)  # ignored: the trial is PRUNED in the storage
    return final


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> Any:
    if not cfg.mlflow_uri:
        return objective(cfg)
    import mlflow

    from embft import names
    from embft.tracking import mlflow_runs, study_runs

    experiment_id = _experiment_id(cfg.mlflow_uri)
    sweep = names.sweep_id(HydraConfig.get().sweep.dir)
    tags = {
        names.ROLE: "finetune",
        names.SWEEP: sweep,
        names.OPTUNA_STUDY: str(cfg.optuna.study_name),
        names.OPTUNA_TRIAL: str(cfg.optuna.trial_number),
        **study_runs.job_tags(experiment_id, cfg.optuna.study_name, sweep),
    }
    if cfg.close_stale_runs:  # as embft.app.run_job: tag the config's hash, close its dead runs first
        from omegaconf import OmegaConf

        resolved = OmegaConf.to_container(cfg, resolve=True)
        for key in ("sleep_s", "rendezvous", "rendezvous_dir"):  # how the stand-in job runs, not its result
            resolved.pop(key)
        tags[names.CONFIG_HASH] = mlflow_runs.config_hash(resolved)  # trial bookkeeping (optuna.*) excluded
        mlflow_runs.close_stale_runs(experiment_id, tags[names.CONFIG_HASH])
    with mlflow_runs.job_run(experiment_id, f"trial-{cfg.optuna.trial_number}", tags):
        mlflow.log_params({"x": cfg.x, "y": cfg.y})
        result = objective(cfg)
        values = result if isinstance(result, list) else [result]
        mlflow.log_metrics({f"objective_{i}": v for i, v in enumerate(values)})
        return result


if __name__ == "__main__":
    main()
