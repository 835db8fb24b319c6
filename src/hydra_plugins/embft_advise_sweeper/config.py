"""Structured config of the ``embft_advise`` sweeper (``hydra/sweeper=embft_advise``)."""

# No `from __future__ import annotations`: Hydra executes plugin modules before they are in sys.modules.

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

SWEEPER_TARGET = "hydra_plugins.embft_advise_sweeper.embft_advise_sweeper.EmbftAdviseSweeper"


@dataclass
class EmbftAdviseSweeperConf:
    """What the advise sweeper runs; the budget itself is the job config's ``advise`` node (arms,
    trials_per_arm, total_trials, min_trials_per_arm, seeds, live_evals), read from the config it sweeps.

    - ``storage``: the arms' Optuna studies (``<name>/<arm>``), persistent so that a rerun resumes them;
      a PostgreSQL URL as for ``embft_optuna``.
    - ``sampler``/``pruner``: the ``hydra/sweeper/sampler`` and ``hydra/sweeper/pruner`` groups of
      ``embft_optuna`` (default tpe and median: a trial scoring under the median of earlier trials at the
      same live step stops).
    - ``n_jobs``: trials of one arm launched together (the launcher's parallelism).
    - ``report_dir``: where a cell's recommendation (advise.md, advise.png, advise.json) is written.
    - ``summary_dir``: when set (experiment=label_budget), report.md and accuracy_vs_per_class.png over every
      cell's advise.json under it, rewritten after the sweep (embft.report.label_budget).
    """

    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"pruner": "median"}, {"sampler": "tpe"}])
    _target_: str = SWEEPER_TARGET
    storage: Optional[str] = "sqlite:///${paths.root_dir}/mlruns/optuna.db"
    storage_options: dict[str, Any] = field(default_factory=dict)
    n_jobs: int = 1
    seed: Optional[int] = 42
    sampler: Any = None
    pruner: Any = None
    max_failure_rate: float = 0.5
    heartbeat_interval: Optional[int] = 60
    report_dir: str = "${paths.root_dir}/experiments/advise/${data.name}_${train.per_class}"
    summary_dir: Optional[str] = None


ConfigStore.instance().store(group="hydra/sweeper", name="embft_advise", node=EmbftAdviseSweeperConf, provider="embft")
