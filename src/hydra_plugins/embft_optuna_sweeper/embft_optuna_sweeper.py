"""Hydra sweeper plugin entry point.

Hydra imports every public module under ``hydra_plugins`` when it scans for plugins, so
this module stays light; Optuna is only imported (from ``_impl``) once the sweeper is used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from .config import EmbftOptunaSweeperConf  # noqa: F401  (registers the config node)


class EmbftOptunaSweeper(Sweeper):
    """Optuna ask/tell sweeper with a persistent, resumable and shareable study.

    Each trial's job gets the fixed overrides plus one override per search-space
    parameter. If the composed job config has a top-level ``optuna`` mapping, its
    ``trial_number``, ``study_name`` and ``storage`` keys (those present) are also
    overridden per trial (e.g. ``optuna.trial_number=7 optuna.study_name=my_study``), so
    the job can tag its outputs and report intermediate values to its trial
    (:class:`.reporting.TrialReporter`); apps without that node get no extra overrides.
    """

    def __init__(
        self,
        direction: Any = "maximize",
        study_name: Optional[str] = None,
        storage: Optional[str] = None,
        n_trials: int = 20,
        n_jobs: int = 1,
        seed: Optional[int] = 42,
        sampler: Optional[Mapping[str, Any]] = None,
        max_failure_rate: float = 0.5,
        failure_rate_min_trials: int = 5,
        heartbeat_interval: Optional[int] = 60,
        grace_period: Optional[int] = None,
        params: Optional[Mapping[str, str]] = None,
        pruner: Optional[Mapping[str, Any]] = None,
        storage_options: Optional[Mapping[str, Any]] = None,
        stale_trial_retries: Optional[int] = 1,
        wait_for_running: bool = True,
        custom_search_space: Optional[str] = None,
        search_space: Optional[Mapping[str, Any]] = None,
        enqueue_trials: Optional[Sequence[Mapping[str, Any]]] = None,
    ) -> None:
        from ._impl import OptunaSweeperImpl

        self.sweeper = OptunaSweeperImpl(
            direction=direction,
            study_name=study_name,
            storage=storage,
            n_trials=n_trials,
            n_jobs=n_jobs,
            seed=seed,
            sampler=sampler,
            max_failure_rate=max_failure_rate,
            failure_rate_min_trials=failure_rate_min_trials,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            params=params,
            pruner=pruner,
            storage_options=storage_options,
            stale_trial_retries=stale_trial_retries,
            wait_for_running=wait_for_running,
            custom_search_space=custom_search_space,
            search_space=search_space,
            enqueue_trials=enqueue_trials,
        )

    def setup(
        self,
        *,
        hydra_context: HydraContext,
        task_function: TaskFunction,
        config: DictConfig,
    ) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.sweeper.sweep(arguments)
