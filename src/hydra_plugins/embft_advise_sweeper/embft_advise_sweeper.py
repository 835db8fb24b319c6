"""Hydra sweeper plugin entry point (light: the work is in ``_impl``, imported when the sweeper is used)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from .config import EmbftAdviseSweeperConf  # noqa: F401  (registers the config node)


class EmbftAdviseSweeper(Sweeper):
    """experiment=advise: per arm an Optuna search, then seeds, a report and the champion (see ``_impl``)."""

    def __init__(
        self,
        storage: Optional[str] = None,
        storage_options: Optional[Mapping[str, Any]] = None,
        n_jobs: int = 1,
        seed: Optional[int] = 42,
        sampler: Any = None,
        pruner: Any = None,
        max_failure_rate: float = 0.5,
        heartbeat_interval: Optional[int] = 60,
        report_dir: Optional[str] = None,
        summary_dir: Optional[str] = None,
    ) -> None:
        from ._impl import AdviseSweeperImpl

        self.sweeper = AdviseSweeperImpl(
            storage=storage,
            storage_options=dict(storage_options or {}),
            n_jobs=n_jobs,
            seed=seed,
            sampler=sampler,
            pruner=pruner,
            max_failure_rate=max_failure_rate,
            heartbeat_interval=heartbeat_interval,
            report_dir=report_dir,
            summary_dir=summary_dir,
        )

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.sweeper.sweep(arguments)
