"""Job side of pruning: report intermediate values to the job's Optuna trial.

The sweeper runs each job with ``optuna.study_name``, ``optuna.trial_number`` and
``optuna.storage`` overrides (when the app's config has those keys). A job, in whatever
process or machine the launcher put it, opens its trial with :class:`TrialReporter`,
reports a value per step and stops when told to::

    reporter = TrialReporter.from_config(cfg.optuna)
    for step in ...:
        if reporter.report(score, step):   # the study's pruner says stop
            reporter.prune()               # trial -> PRUNED in the shared storage
            break

The trial's state lives in the storage shared by every worker, so the sweeper sees the
PRUNED state whichever launcher ran the job; raising ``optuna.TrialPruned`` from the job
works too (the sweeper reads it from the JobReturn).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import optuna

# Optuna is imported inside the functions: Hydra imports this module when it scans for plugins.
log = logging.getLogger(__name__)

PRUNER_ATTR = "pruner"  # trial user attribute: the pruner config (``_target_`` + arguments)
PRUNED_STEP_ATTR = "pruned_step"
RECONNECT_TIMEOUT_S = 120.0  # as the sweeper's storage_options.reconnect_timeout default


def make_pruner(spec: Optional[Mapping[str, Any]]) -> optuna.pruners.BasePruner:
    """The pruner a sweeper recorded for a trial (NopPruner when none)."""
    import optuna

    if not spec:
        return optuna.pruners.NopPruner()
    target = str(spec.get("_target_", ""))
    if not target.startswith("optuna.pruners."):
        # The spec comes from a database; only build what the sweeper can write.
        raise ValueError(f"unexpected pruner {target!r}: expected an optuna.pruners class")
    from hydra.utils import instantiate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return instantiate(dict(spec))


class TrialReporter:
    """Reports intermediate values of one trial of a stored study and asks its pruner."""

    def __init__(self, study_name: str, storage: str, trial_number: int) -> None:
        import optuna
        from optuna.trial import Trial

        from embft.sweeping.storage import ReconnectingRDBStorage

        self.trial_number = int(trial_number)
        rdb = ReconnectingRDBStorage(
            storage,
            # As the sweeper: workers share a SQLite file, so wait on its lock instead of failing;
            # a server's pooled connections are tested before use, and an operation that a
            # database restart dropped is retried (the sweeper's default reconnect_timeout).
            engine_kwargs={"connect_args": {"timeout": 60}}
            if storage.startswith("sqlite")
            else {"pool_pre_ping": True},
            reconnect_timeout=RECONNECT_TIMEOUT_S,
        )
        self.study = optuna.load_study(study_name=study_name, storage=rdb)
        # Optuna has no public lookup of a live Trial by number: ask/tell code holds the Trial
        # object, which a job in another process (or machine) does not have.
        storage_ = self.study._storage
        trial_id = storage_.get_trial_id_from_study_id_trial_number(self.study._study_id, self.trial_number)
        self.trial = Trial(self.study, trial_id)
        frozen = storage_.get_trial(trial_id)
        self.study.pruner = make_pruner(frozen.user_attrs.get(PRUNER_ATTR))
        # Optuna prunes single-objective studies only (Trial.report raises otherwise).
        self.enabled = len(self.study.directions) == 1
        self.pruned_step: Optional[int] = None

    @classmethod
    def from_config(cls, node: Any) -> Optional[TrialReporter]:
        """From the job's ``optuna`` config node; None outside a search or without storage."""
        if node is None:
            return None
        name, number = node.get("study_name"), node.get("trial_number")
        storage = node.get("storage")
        if name is None or number is None:
            return None
        if storage is None:
            log.warning("Optuna trial %s: no storage URL given (in-memory study?); not reporting", number)
            return None
        return cls(str(name), str(storage), int(number))

    def report(self, value: float, step: int) -> bool:
        """Record ``value`` at ``step``; True when the pruner says the trial should stop."""
        if not self.enabled:
            return False
        self.trial.report(float(value), int(step))
        return self.trial.should_prune()

    def prune(self, step: Optional[int] = None) -> None:
        """End the trial PRUNED (Optuna keeps its last reported value as the trial's value)."""
        from optuna.trial import TrialState

        if step is not None:
            self.trial.set_user_attr(PRUNED_STEP_ATTR, int(step))
            self.pruned_step = int(step)
        self.study.tell(self.trial_number, state=TrialState.PRUNED, skip_if_finished=True)
        log.info("Optuna trial %d pruned%s", self.trial_number, "" if step is None else f" at step {step}")
