"""Implementation of the embft Optuna sweeper; imported lazily by the plugin class."""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import optuna
import sqlalchemy
import sqlalchemy.exc
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import Trial, TrialState
from sqlalchemy.engine import make_url

from embft.names import RESULTS_FILE  # one name, which the core reads too
from embft.sweeping.storage import (
    DISCARDED_ATTR,
    HEARTBEAT_ATTR,
    INTERRUPTED_ATTR,
    STALE_CALLBACK_ARG,
    Heartbeat,
    NoHeartbeat,
    ReconnectingRDBStorage,
    RetryOwnStaleTrial,
    ask_lock,
    counts_towards_n_trials,
    retried_trial_numbers,
    stops_deferred,
    with_installed_pg_driver,
)
from embft.sweeping.trial_reporter import PRUNER_ATTR, make_pruner

from ._results import PRUNED, log_summary, objective_values, study_results, write_results
from ._samplers import (
    _AskTellGridSampler,
    _PerTrialSeedSampler,
    _plain,
    is_grid,
    make_sampler,
    sampler_factory,
    seeds_per_trial,
    split_seed,
)
from ._search_space import SearchSpace, SearchSpaceError, _check_compatible, format_value, parse_search_space
from .checks import NOP_PRUNER, check_pruner, check_sampler, load_custom_search_space, parse_directions

log = logging.getLogger(__name__)

__all__ = ["RESULTS_FILE", "OptunaSweeperImpl", "format_value", "parse_search_space"]
FINISHED_STATES = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
# Top-level job config node that, when present, receives the trial number and study name.
TRIAL_INFO_NODE = "optuna"
TRIAL_INFO_KEYS = ("trial_number", "study_name", "storage")
# System attributes this sweeper puts on its trials.
MLFLOW_STALE_AFTER_S = 120  # embft.tracking.mlflow_runs.STALE_AFTER_S (not imported: the plugin works without embft)
POLL_S = 2.0  # how often a worker whose study is full looks at other workers' running trials


def _state_counts(trials: Sequence[Any]) -> dict[TrialState, int]:
    counts: dict[TrialState, int] = {}
    for t in trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    return counts


class FailureBudgetExceeded(RuntimeError):
    """Raised when too many of the sweep's trials failed."""


# --------------------------------------------------------------------------- sweeper


def _parse_directions(direction: Any) -> tuple[list[str], Optional[list[str]]]:
    """Directions, and metric names when given as ``{metric, direction}`` entries."""
    return parse_directions(direction)


def _pruner_spec(pruner: Any) -> Optional[dict[str, Any]]:
    """The pruner config as plain data (None for none/NopPruner), checked by building it."""
    spec = check_pruner(pruner)
    if spec is None or spec.get("_target_") == NOP_PRUNER:
        return None
    return spec


class OptunaSweeperImpl(Sweeper):
    """Ask/tell loop: asks ``n_jobs`` trials, launches them as one batch, tells results."""

    def __init__(
        self,
        direction: Any,
        study_name: Optional[str],
        storage: Optional[str],
        n_trials: int,
        n_jobs: int,
        seed: Optional[int],
        sampler: Optional[Mapping[str, Any]],
        max_failure_rate: float,
        failure_rate_min_trials: int,
        heartbeat_interval: Optional[int],
        grace_period: Optional[int],
        params: Optional[Mapping[str, Any]],
        pruner: Any = None,
        storage_options: Optional[Mapping[str, Any]] = None,
        stale_trial_retries: Optional[int] = 1,
        wait_for_running: bool = True,
        custom_search_space: Optional[str] = None,
        search_space: Optional[Mapping[str, Any]] = None,
        enqueue_trials: Optional[Sequence[Mapping[str, Any]]] = None,
    ) -> None:
        directions, metric_names = _parse_directions(direction)
        if n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_jobs must be >= 1, got {n_jobs}")
        if n_trials < 0:
            raise ValueError(f"hydra.sweeper.n_trials must be >= 0, got {n_trials}")
        self.directions = directions
        self.metric_names = metric_names
        # Hydra instantiates the pruner node (recursive instantiation); a mapping also works.
        if pruner is None or isinstance(pruner, optuna.pruners.BasePruner):
            self.pruner = pruner or optuna.pruners.NopPruner()
            self.pruner_spec: Optional[dict[str, Any]] = None  # read from the config in setup()
        else:
            self.pruner_spec = _pruner_spec(pruner)
            self.pruner = make_pruner(self.pruner_spec)
        self.study_name = study_name
        self.storage_url = storage
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        # Hydra instantiates the node as a partial; its seed (the official spelling) wins when set.
        self.sampler, sampler_seed = split_seed(sampler_factory(check_sampler(sampler)))
        self.seed = seed if sampler_seed is None else sampler_seed
        self.seed_key = "hydra.sweeper.seed" if sampler_seed is None else "hydra.sweeper.sampler.seed"
        self.custom_search_space = custom_search_space
        self.extend_trial = load_custom_search_space(custom_search_space)
        self.search_space = _plain(search_space) if search_space else None
        self.enqueue_trials = [dict(_plain(point)) for point in enqueue_trials or []]
        self.max_failure_rate = max_failure_rate
        self.failure_rate_min_trials = failure_rate_min_trials
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.params = params
        options = dict(storage_options or {})
        unknown = set(options) - {"engine_kwargs", "reconnect_timeout"}
        if unknown:
            raise ValueError(
                f"hydra.sweeper.storage_options: unknown key(s) {sorted(unknown)}; "
                "expected engine_kwargs, reconnect_timeout"
            )
        self.engine_kwargs: dict[str, Any] = dict(options.get("engine_kwargs") or {})
        self.reconnect_timeout = float(
            options.get("reconnect_timeout") if options.get("reconnect_timeout") is not None else 120
        )
        if self.reconnect_timeout < 0:
            raise ValueError(
                f"hydra.sweeper.storage_options.reconnect_timeout must be >= 0, got {self.reconnect_timeout}"
            )
        if stale_trial_retries is not None and stale_trial_retries < 0:
            raise ValueError(f"hydra.sweeper.stale_trial_retries must be >= 0 or null, got {stale_trial_retries}")
        self.stale_trial_retries = stale_trial_retries
        self.wait_for_running = wait_for_running

        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher: Optional[Launcher] = None
        self.n_told = 0  # trials finished by this sweep, for the failure budget
        self.n_failed = 0
        self.last_error: Optional[BaseException] = None  # the last failed job's exception
        self.n_pruned = 0

    def setup(
        self,
        *,
        hydra_context: HydraContext,
        task_function: TaskFunction,
        config: DictConfig,
    ) -> None:
        self.hydra_context = hydra_context
        self.config = config
        if self.pruner_spec is None and not isinstance(self.pruner, optuna.pruners.NopPruner):
            # What a job needs to rebuild this pruner (reporting.TrialReporter).
            self.pruner_spec = _pruner_spec(OmegaConf.select(config, "hydra.sweeper.pruner"))
        if self.pruner_spec is not None and len(self.directions) > 1:
            raise ValueError(
                "hydra.sweeper.pruner: Optuna prunes single-objective studies only; "
                "use hydra/sweeper/pruner=none with several directions"
            )
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ---------------------------------------------------------------- study

    def _make_storage(self) -> Optional[RDBStorage]:
        if self.storage_url is None:
            return None
        assert self.config is not None
        url = with_installed_pg_driver(make_url(self.storage_url))
        engine_kwargs: dict[str, Any] = _plain(self.engine_kwargs)
        if url.get_backend_name() == "sqlite":
            database = url.database
            if database and database != ":memory:" and not database.startswith("file:"):
                path = Path(database).expanduser()
                if not path.is_absolute():
                    # Jobs may chdir; pin the file to where the command was started.
                    base = OmegaConf.select(self.config, "hydra.runtime.cwd") or os.getcwd()
                    path = Path(base) / path
                path.parent.mkdir(parents=True, exist_ok=True)
                url = url.set(database=str(path))
            # Workers and the heartbeat thread share the file: wait on locks, don't fail fast.
            engine_kwargs["connect_args"] = {"timeout": 60, **engine_kwargs.get("connect_args", {})}
        else:
            # A pooled connection may be dead (the server restarted, a firewall dropped it):
            # test it before use and reconnect, instead of failing the operation.
            engine_kwargs.setdefault("pool_pre_ping", True)
        self.storage_url = url.render_as_string(hide_password=False)
        callback = None
        if self.stale_trial_retries != 0:
            callback = RetryOwnStaleTrial(self.stale_trial_retries)
        for attempt in range(1, 6):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ExperimentalWarning)
                    return ReconnectingRDBStorage(
                        self.storage_url,
                        reconnect_timeout=self.reconnect_timeout,
                        engine_kwargs=engine_kwargs,
                        heartbeat_interval=self.heartbeat_interval,
                        grace_period=self.effective_grace_period(),
                        **{STALE_CALLBACK_ARG: callback},
                    )
            except (
                sqlalchemy.exc.IntegrityError,
                sqlalchemy.exc.OperationalError,
                sqlalchemy.exc.ProgrammingError,  # PostgreSQL: "relation ... already exists"
            ) as e:
                # Workers starting together race to create the schema of a new database;
                # the loser succeeds on retry once the winner's tables exist.
                if attempt == 5:
                    raise
                log.info("Storage not ready (%s); retrying", type(e).__name__)
                time.sleep(0.2 * attempt + random.random() * 0.2)
        raise AssertionError("unreachable")

    def effective_grace_period(self) -> Optional[int]:
        """``grace_period``, by default ``max(2 * heartbeat_interval, heartbeat_interval + 120)``: a
        trial is only failed as stale once embft's MLflow heartbeat (every 30 s, stale after 120 s,
        embft.tracking.mlflow_runs) tells its dead run too, so that the retried job, with the same config
        hash, closes that run KILLED instead of skipping it as a live twin."""
        if self.grace_period is not None or self.heartbeat_interval is None:
            return self.grace_period
        return max(2 * self.heartbeat_interval, self.heartbeat_interval + MLFLOW_STALE_AFTER_S)

    def _grid_sampler(self, space: SearchSpace) -> _AskTellGridSampler:
        """Every point of the choice() and range() params once, in an order seeded by the seed;
        n_trials is capped to the grid's size (asking past it would repeat points)."""
        grid = space.grid()
        size = math.prod(len(v) for v in grid.values())
        if self.n_trials > size:
            log.info("Grid of %d points: n_trials %d capped to %d", size, self.n_trials, size)
            self.n_trials = size
        factory = functools.partial(_AskTellGridSampler, *self.sampler.args, **self.sampler.keywords)
        return make_sampler(factory, self.seed, search_space=grid)

    def _open_study(self, study_name: str, storage: Optional[RDBStorage], space: SearchSpace) -> optuna.Study:
        if is_grid(self.sampler):
            # GridSampler keeps which points are taken in the study itself, so workers share one grid.
            sampler: optuna.samplers.BaseSampler = self._grid_sampler(space)
        elif self.seed is None or not seeds_per_trial(self.sampler):
            sampler = make_sampler(self.sampler, self.seed)
        else:
            sampler = _PerTrialSeedSampler(functools.partial(make_sampler, self.sampler), self.seed)
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            sampler=sampler,
            pruner=self.pruner,
            directions=self.directions,
            load_if_exists=True,
        )
        actual = [d.name.lower() for d in study.directions]
        if actual != self.directions:
            raise ValueError(
                f"Study '{study_name}' exists with direction {actual}, "
                f"but hydra.sweeper.direction is {self.directions}."
            )
        if self.metric_names is not None and study.metric_names != self.metric_names:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                study.set_metric_names(self.metric_names)
        return study

    # ---------------------------------------------------------------- sweep

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None
        assert self.hydra_context is not None
        try:  # refused before the store is opened, in one line that names the parameter
            space = parse_search_space(
                self.params, arguments, self.hydra_context.config_loader, search_space=self.search_space
            )
            if is_grid(self.sampler):
                space.grid()
            for i, point in enumerate(self.enqueue_trials):
                space.check_point(point, f"hydra.sweeper.enqueue_trials[{i}]")
        except SearchSpaceError as err:
            log.error("%s", err)
            raise SystemExit(1) from None

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        study_name = self.study_name or str(self.config.hydra.job.name)
        storage = self._make_storage()
        study = self._open_study(study_name, storage, space)
        for trial in study.get_trials(deepcopy=False):
            for name, dist in trial.distributions.items():
                if name in space.params:
                    _check_compatible(name, dist, space.params[name].distribution)
        self._enqueue(study)

        use_heartbeat = storage is not None and self.heartbeat_interval is not None
        heartbeat = (
            Heartbeat(storage, self.heartbeat_interval)  # type: ignore[arg-type]
            if use_heartbeat
            else NoHeartbeat()
        )
        info_keys = self._trial_info_keys()
        if self.pruner_spec is not None and (storage is None or "storage" not in info_keys):
            log.warning(
                "hydra.sweeper.pruner is set, but jobs cannot reach their trials (%s): nothing will be pruned",
                "in-memory study" if storage is None else "the job config has no optuna.storage",
            )
        results_path = sweep_dir / RESULTS_FILE
        self._log_start(study, space)

        returns: list[Sequence[JobReturn]] = []
        with heartbeat:
            while True:
                results = self._run_batch(
                    study,
                    space,
                    heartbeat,
                    use_heartbeat=use_heartbeat,
                    job_idx=sum(len(r) for r in returns),
                    trial_info_keys=info_keys,
                )
                if not results:  # the study has its n_trials
                    if self._wait_for_others(study, use_heartbeat):
                        continue
                    break
                returns.append(results)
                self._write_results(study, space, results_path)
                self._check_failure_budget(results_path)

        log_summary(self._write_results(study, space, results_path), results_path)
        return returns

    def _log_start(self, study: optuna.Study, space: SearchSpace) -> None:
        """What embft does differently from the official plugin's defaults, said before any trial."""
        trials = study.get_trials(deepcopy=False)
        states = ", ".join(f"{n} {s.name}" for s, n in sorted(_state_counts(trials).items(), key=lambda x: x[0].name))
        log.info("Study name: %s", study.study_name)
        log.info(
            "Storage: %s (%s)",
            self._masked_storage() or "in memory",
            "in memory: kept by nobody after this run"
            if self.storage_url is None
            else "persistent: rerunning this command resumes the study",
        )
        log.info("Directions: %s", self.directions)
        log.info("Sampler: %s (seed %s, %s)", self.sampler.func.__name__, self.seed, self.seed_key)
        log.info(
            "Trials already in the study: %d%s; n_trials=%d is the study's total, n_jobs=%d",
            len(trials),
            f" ({states})" if states else "",
            self.n_trials,
            self.n_jobs,
        )
        log.info("Search space: %s; fixed: %s", space.distributions, list(space.fixed.values()))

    def _wait_for_others(self, study: optuna.Study, use_heartbeat: bool) -> bool:
        """With the study full, wait while other workers run trials with heartbeats: one of
        them may die, and its trial then needs a worker to be retried. True: look again."""
        if not (use_heartbeat and self.wait_for_running):
            return False
        running = self._others_running(study)
        if not running:
            return False
        if running != getattr(self, "_waited_for", None):
            log.info("Study full; waiting for other workers' running trial(s) %s (retried if they die)", running)
            self._waited_for = running
        time.sleep(min(POLL_S, float(self.heartbeat_interval or POLL_S)))
        return True

    def _run_batch(
        self,
        study: optuna.Study,
        space: SearchSpace,
        heartbeat: Heartbeat | NoHeartbeat,
        use_heartbeat: bool,
        job_idx: int,
        trial_info_keys: Sequence[str],
    ) -> Sequence[JobReturn]:
        """Ask up to ``n_jobs`` trials (none once the study is full), launch them in one call
        and tell their results."""
        assert self.launcher is not None
        trials: list[Trial] = []
        try:
            # Count and ask under one lock, so that concurrent workers never ask for the
            # same remaining trial; the asked trials are RUNNING, hence counted, on release.
            with ask_lock(self.storage_url, study.study_name, self.reconnect_timeout) as lock:
                n = min(self.n_jobs, self._remaining_trials(study, use_heartbeat))
                for _ in range(n):
                    with stops_deferred(), warnings.catch_warnings():  # asked, it is in `trials` before a stop
                        warnings.filterwarnings("ignore", message="Heartbeat of storage")
                        trial = study.ask(space.distributions)
                        heartbeat.track(trial)
                        trials.append(trial)
                lock_held = lock.held()
            if trials and not lock_held:
                self._discard_overshoot(study, trials, heartbeat, use_heartbeat)
            if not trials:
                return []
            batch = []
            for trial in trials:
                extra = self._extend(trial, space)
                overrides = space.overrides(trial.params) + extra
                trial.set_user_attr("overrides", overrides)
                if self.pruner_spec is not None:
                    # The job rebuilds its trial's pruner from here (reporting.TrialReporter).
                    trial.set_user_attr(PRUNER_ATTR, self.pruner_spec)
                batch.append(overrides + self._trial_info(trial_info_keys, trial, study.study_name, self.storage_url))
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=job_idx)
            for trial, ret in zip(trials, results):
                with stops_deferred():  # told whole or not at all
                    self._tell(study, trial, ret)
        except BaseException as err:
            # Don't leave RUNNING trials behind when composition or the launcher fails. A stop (Ctrl-C, a
            # kill) is no failure of the trial: it takes no slot of n_trials and reruns first, same params;
            # a trial told before the stop keeps its result and is not queued again.
            with stops_deferred():
                for trial in trials:
                    if study._storage.get_trial(trial._trial_id).state.is_finished():  # no public by-id lookup
                        continue
                    if isinstance(err, KeyboardInterrupt) and trial.params:
                        study._storage.set_trial_system_attr(trial._trial_id, INTERRUPTED_ATTR, True)  # no setter
                        study.enqueue_trial(trial.params, skip_if_exists=False)
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        finally:
            heartbeat.untrack(trials)
        return results

    def _extend(self, trial: Trial, space: SearchSpace) -> list[str]:
        """``custom_search_space``: the user's function suggests more params on the trial, as in the
        official plugin (fixed overrides readable in ``trial.user_attrs``); it may also return a
        mapping of further fixed overrides."""
        if self.extend_trial is None:
            return []
        assert self.config is not None
        for name, line in space.fixed.items():
            trial.set_user_attr(name, line.split("=", 1)[-1])
        returned = self.extend_trial(self.config, trial)
        clash = sorted(set(trial.params) & set(space.fixed))
        if clash:
            raise ValueError(
                f"hydra.sweeper.custom_search_space={self.custom_search_space} suggested {clash}, "
                "which an override fixes: drop the override or the suggestion"
            )
        if returned is None:
            return []
        if not isinstance(returned, Mapping):
            raise TypeError(
                f"hydra.sweeper.custom_search_space={self.custom_search_space} returned {type(returned).__name__}: "
                "return None or a mapping of overrides"
            )
        return [f"{k}={format_value(v)}" for k, v in returned.items()]

    def _enqueue(self, study: optuna.Study) -> None:
        """hydra.sweeper.enqueue_trials, each once: a point already in the study (a rerun, another worker's
        queue) is skipped; under the ask lock, so that two workers starting at once cannot both queue it."""
        if not self.enqueue_trials:
            return
        with ask_lock(self.storage_url, study.study_name, self.reconnect_timeout):
            for point in self.enqueue_trials:
                study.enqueue_trial(point, skip_if_exists=True)

    def _discard_overshoot(
        self, study: optuna.Study, trials: list[Trial], heartbeat: Heartbeat | NoHeartbeat, use_heartbeat: bool
    ) -> None:
        """The ask lock was lost while asking (the database restarted), so another worker may
        have counted the same remaining trials: recount under a new lock and end our excess
        trials, not yet run, as FAIL marked DISCARDED_ATTR, which do not count."""
        with ask_lock(self.storage_url, study.study_name, self.reconnect_timeout):
            excess = min(-self._remaining_trials(study, use_heartbeat), len(trials))
            if excess <= 0:
                log.info("Ask lock lost with the database connection; recounted: no overshoot")
                return
            log.warning("Ask lock lost with the database connection: %d trial(s) past n_trials dropped unrun", excess)
            dropped = trials[-excess:]
            for trial in dropped:
                study._storage.set_trial_system_attr(trial._trial_id, DISCARDED_ATTR, True)  # no public setter
                trial.set_user_attr("fail_reason", "asked past n_trials while the database restarted; not run")
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            heartbeat.untrack(dropped)
            del trials[-excess:]

    def _fail_stale(self, study: optuna.Study) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)

    def _remaining_trials(self, study: optuna.Study, use_heartbeat: bool) -> int:
        if use_heartbeat:
            self._fail_stale(study)
        trials = study.get_trials(deepcopy=False)
        return self.n_trials - sum(
            counts_towards_n_trials(t, use_heartbeat, retried_trial_numbers(trials)) for t in trials
        )

    def _others_running(self, study: optuna.Study) -> list[int]:
        """Numbers of the study's RUNNING trials with heartbeats (of live workers: stale ones
        are failed first, and retried if the sweeper asked them)."""
        self._fail_stale(study)
        trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return [t.number for t in trials if t.system_attrs.get(HEARTBEAT_ATTR) is not None]

    def _trial_info_keys(self) -> list[str]:
        assert self.config is not None
        node = self.config.get(TRIAL_INFO_NODE)
        if not isinstance(node, DictConfig):
            return []
        return [k for k in TRIAL_INFO_KEYS if k in node]

    @staticmethod
    def _trial_info(keys: Sequence[str], trial: Trial, study_name: str, storage_url: Optional[str]) -> list[str]:
        values = {"trial_number": trial.number, "study_name": study_name, "storage": storage_url}
        return [f"{TRIAL_INFO_NODE}.{k}={format_value(values[k])}" for k in keys]

    def _tell(self, study: optuna.Study, trial: Trial, ret: JobReturn) -> None:
        values, reason = objective_values(ret, len(self.directions))
        # The job may have ended its trial itself (reporting.TrialReporter.prune), in the
        # storage every worker shares; that state wins over whatever the job returned.
        state = study._storage.get_trial(trial._trial_id).state  # no public by-id lookup
        if state == TrialState.PRUNED or reason == PRUNED:
            self.n_told += 1
            self.n_pruned += 1
            if state != TrialState.PRUNED:
                study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
            pruned = study._storage.get_trial(trial._trial_id)
            log.info(
                "Trial %d pruned at step %s (value there: %s)",
                trial.number,
                pruned.last_step,
                None if pruned.last_step is None else pruned.intermediate_values[pruned.last_step],
            )
            return
        try:
            output_dir = None
            if ret.hydra_cfg is not None:
                output_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir")
            if output_dir is not None:
                trial.set_user_attr("output_dir", str(output_dir))
            if values is None:
                trial.set_user_attr("fail_reason", reason)
        except UpdateFinishedTrialError:
            log.warning("Trial %d was already finished (failed as stale?)", trial.number)
        self.n_told += 1
        if values is None:
            self.n_failed += 1
            error = getattr(ret, "_return_value", None)  # JobReturn keeps a failed job's exception there
            self.last_error = error if isinstance(error, BaseException) else ValueError(reason)
            log.warning("Trial %d failed: %s", trial.number, reason)
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        else:
            log.info("Trial %d finished with value %s", trial.number, ", ".join(map(str, values)))
            study.tell(trial, values if len(values) > 1 else values[0], skip_if_finished=True)

    def _check_failure_budget(self, results_path: Path) -> None:
        if self.n_told < self.failure_rate_min_trials:
            return
        rate = self.n_failed / self.n_told
        if rate > self.max_failure_rate:
            reason = "none" if self.last_error is None else f"{type(self.last_error).__name__}: {self.last_error}"
            raise FailureBudgetExceeded(
                f"Optuna sweep stopped: {self.n_failed} of the {self.n_told} trials run by this "
                f"sweep failed ({rate:.0%}), more than hydra.sweeper.max_failure_rate="
                f"{self.max_failure_rate} (checked once hydra.sweeper.failure_rate_min_trials="
                f"{self.failure_rate_min_trials} trials finished). See the job logs for the "
                f"errors; partial results are in {results_path}. Last error: {reason}"
            ) from self.last_error

    # ---------------------------------------------------------------- results

    def _masked_storage(self) -> Optional[str]:
        if self.storage_url is None:
            return None
        return make_url(self.storage_url).render_as_string(hide_password=True)

    def _write_results(self, study: optuna.Study, space: SearchSpace, path: Path) -> dict[str, Any]:
        results = study_results(
            study,
            space,
            directions=self.directions,
            storage=self._masked_storage(),
            n_trials=self.n_trials,
            pruner=self.pruner_spec,
            metric_names=self.metric_names,
        )
        write_results(results, path)
        return results
