"""Implementation of the embft Optuna sweeper; imported lazily by the plugin class."""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import random
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any, Optional

import optuna
import sqlalchemy
import sqlalchemy.exc
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    QuotedString,
    RangeSweep,
    Transformer,
)
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, Trial, TrialState
from sqlalchemy.engine import make_url

from .checks import NOP_PRUNER, check_pruner, check_sampler, parse_directions
from .reporting import PRUNER_ATTR, make_pruner

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"
FINISHED_STATES = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
# Top-level job config node that, when present, receives the trial number and study name.
TRIAL_INFO_NODE = "optuna"
TRIAL_INFO_KEYS = ("trial_number", "study_name", "storage")
# System attributes this sweeper puts on its trials.
HEARTBEAT_ATTR = "embft:heartbeat"  # the trial records heartbeats (its worker can be told dead)
DISCARDED_ATTR = "embft:discarded"  # asked past n_trials after a lost database lock, never run
RETRY_HISTORY_ATTR = "retry_history"  # Optuna's RetryHeartbeatStaleTrialCallback: the trials retried
MLFLOW_STALE_AFTER_S = 120  # embft.tracking.mlflow_runs.STALE_AFTER_S (not imported: the plugin works without embft)
POLL_S = 2.0  # how often a worker whose study is full looks at other workers' running trials

_INT_LITERAL = re.compile(r"[+-]?\d[\d_]*")


class FailureBudgetExceeded(RuntimeError):
    """Raised when too many of the sweep's trials failed."""


# --------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class SearchParam:
    """One searched parameter: the override key and its Optuna distribution."""

    key: str  # override key element, including a "+"/"++" prefix if one was given
    distribution: BaseDistribution
    choice_texts: tuple[str, ...] = ()  # override text of each categorical choice

    def override(self, value: Any) -> str:
        if isinstance(self.distribution, CategoricalDistribution):
            # Map through the choice index: the original text keeps quoting and types
            # (e.g. '1' vs 1) that the Python value alone would lose.
            text = self.choice_texts[int(self.distribution.to_internal_repr(value))]
        else:
            text = format_value(value)
        return f"{self.key}={text}"


@dataclass
class SearchSpace:
    """Searched parameters and fixed overrides, both keyed by parameter name."""

    params: dict[str, SearchParam] = field(default_factory=dict)
    fixed: dict[str, str] = field(default_factory=dict)  # name -> override, passed unchanged

    @property
    def distributions(self) -> dict[str, BaseDistribution]:
        return {name: p.distribution for name, p in self.params.items()}

    def overrides(self, values: Mapping[str, Any]) -> list[str]:
        """Job overrides for one trial: the fixed ones, then one per searched parameter."""
        return [*self.fixed.values(), *(p.override(values[n]) for n, p in self.params.items())]


def parse_search_space(
    params: Optional[Mapping[str, Any]],
    arguments: Sequence[str] = (),
    config_loader: Any = None,
) -> SearchSpace:
    """Build the search space from ``hydra.sweeper.params`` and command-line overrides.

    Sweep values map to distributions: ``choice(...)``/``a,b``/``glob(...)`` to categorical,
    ``range(start, stop, step)`` to a stepped int or float distribution (``stop`` excluded),
    ``interval(a, b)`` to a uniform float distribution, or int when both bounds are written
    as integers; ``tag(log, ...)`` makes it log-scaled. Plain overrides are kept as fixed
    overrides. A command-line override replaces a config entry of the same key.
    """
    lines = [f"{k}={'null' if v is None else v}" for k, v in (params or {}).items()]
    lines.extend(arguments)
    space = SearchSpace()
    for override in OverridesParser.create(config_loader=config_loader).parse_overrides(lines):
        name = _param_name(override)
        space.params.pop(name, None)
        space.fixed.pop(name, None)
        if override.is_sweep_override():
            space.params[name] = _search_param(override)
        else:
            assert override.input_line is not None
            space.fixed[name] = override.input_line
    return space


def _param_name(override: Override) -> str:
    if override.package is None:
        return override.key_or_group
    return f"{override.key_or_group}@{override.package}"


def _search_param(override: Override) -> SearchParam:
    key = override.get_key_element()
    value = override.value()
    log_scale = "log" in getattr(value, "tags", ())

    if override.is_choice_sweep():
        if log_scale:
            raise ValueError(f"'{override.input_line}': log scale needs interval(...) or range(...)")
        if isinstance(value, ChoiceSweep):
            elements = list(value.list)
        else:  # glob(...) over config group options
            elements = list(override.sweep_iterator())
        texts = tuple(format_value(e) for e in elements)
        choices = tuple(_categorical_choice(e) for e in elements)
        return SearchParam(key, CategoricalDistribution(choices), texts)

    if override.is_range_sweep():
        assert isinstance(value, RangeSweep)
        return SearchParam(key, _range_distribution(value, log_scale, override.input_line))

    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        assert value.start is not None and value.end is not None
        # Hydra's grammar turns interval bounds into floats; the text tells whether they were ints.
        if _interval_has_int_bounds(override.get_value_string()):
            return SearchParam(key, IntDistribution(int(value.start), int(value.end), log=log_scale))
        return SearchParam(key, FloatDistribution(float(value.start), float(value.end), log=log_scale))

    raise ValueError(f"'{override.input_line}': unsupported sweep type {override.value_type}")


def _categorical_choice(element: Any) -> Any:
    if isinstance(element, QuotedString):
        return element.text
    if element is None or isinstance(element, (bool, int, float, str)):
        return element
    return Transformer.str(element)  # lists/dicts: Optuna stores them as their text


def _range_distribution(value: RangeSweep, log_scale: bool, line: Optional[str]) -> BaseDistribution:
    start, stop, step = value.start, value.stop, value.step
    assert start is not None and stop is not None
    if all(isinstance(x, int) for x in (start, stop, step)):
        values = range(int(start), int(stop), int(step))
        if len(values) == 0:
            raise ValueError(f"'{line}': empty range")
        if log_scale and abs(int(step)) != 1:
            raise ValueError(f"'{line}': a log-scaled int range needs step 1")
        low, high = sorted((values[0], values[-1]))
        return IntDistribution(low, high, log=log_scale, step=abs(int(step)))

    if log_scale:
        raise ValueError(f"'{line}': use tag(log, interval(a, b)) for a log-scaled float")
    d_start, d_stop, d_step = (Decimal(str(x)) for x in (start, stop, step))
    if d_step == 0:
        raise ValueError(f"'{line}': range step must not be 0")
    count = int(((d_stop - d_start) / d_step).to_integral_value(rounding=ROUND_CEILING))
    if count <= 0:
        raise ValueError(f"'{line}': empty range")
    low, high = sorted((d_start, d_start + (count - 1) * d_step))
    return FloatDistribution(float(low), float(high), step=float(abs(d_step)))


def _interval_has_int_bounds(value_text: str) -> bool:
    match = re.search(r"interval\s*\(([^)]*)\)", value_text)
    if match is None:
        return False
    bounds = [arg.split("=", 1)[-1].strip() for arg in match.group(1).split(",")]
    return len(bounds) == 2 and all(_INT_LITERAL.fullmatch(b) for b in bounds)


@functools.lru_cache(maxsize=1)
def _plain_parser() -> OverridesParser:
    return OverridesParser.create()


def _parses_back(text: str, value: str) -> bool:
    try:
        parsed = _plain_parser().parse_override(f"k={text}")
    except Exception:
        return False
    if parsed.is_sweep_override():
        return False
    return type(parsed.value()) is str and parsed.value() == value


def _quote(text: str) -> str:
    quote = "'" if "'" not in text else ('"' if '"' not in text else "'")
    # Hydra only treats backslashes as escapes before a quote or the closing quote.
    body = re.sub(
        r"(\\*)(" + re.escape(quote) + "|$)",
        lambda m: m.group(1) * 2 + ("\\" + m.group(2) if m.group(2) else ""),
        text,
    )
    return quote + body + quote


def format_value(value: Any) -> str:
    """Override text that Hydra parses back to ``value`` (strings are quoted when needed)."""
    text = Transformer.str(value)
    if isinstance(value, str) and not _parses_back(text, value):
        text = _quote(value)
        if not _parses_back(text, value):
            raise ValueError(f"cannot write {value!r} as a Hydra override value")
    return text


# --------------------------------------------------------------------------- objective values


def _as_float(value: Any) -> Optional[float]:
    if value is None or isinstance(value, (bool, str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


PRUNED = "pruned"  # objective_values' reason for a job that raised or returned TrialPruned


def objective_values(ret: JobReturn, n_objectives: int) -> tuple[Optional[list[float]], str]:
    """The job's objective value(s), or ``None`` and the reason the trial did not complete
    (:data:`PRUNED` for a job that raised or returned ``optuna.TrialPruned``)."""
    try:
        value = ret.return_value  # re-raises the job's exception
    except optuna.TrialPruned:
        return None, PRUNED
    except Exception as e:
        return None, f"job raised {type(e).__name__}: {e}"
    if isinstance(value, optuna.TrialPruned):
        return None, PRUNED
    if n_objectives == 1:
        raw: Sequence[Any] = [value]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        raw = value
    else:
        return None, f"expected {n_objectives} objective values, job returned {value!r}"
    if len(raw) != n_objectives:
        return None, f"expected {n_objectives} objective values, job returned {value!r}"
    values = [_as_float(v) for v in raw]
    if any(v is None for v in values):
        return None, f"job returned a non-number: {value!r}"
    if any(math.isnan(v) for v in values):  # type: ignore[arg-type]
        return None, f"job returned NaN: {value!r}"
    return values, ""  # type: ignore[return-value]


# --------------------------------------------------------------------------- heartbeat


class _Heartbeat:
    """Records heartbeats of this process's in-flight trials from a background thread.

    Optuna only runs heartbeats inside ``Study.optimize``; with ask/tell we keep them
    ourselves so that other processes can tell our live trials from stale ones.
    """

    def __init__(self, storage: RDBStorage, interval: int) -> None:
        self._storage = storage
        self._interval = interval
        self._trial_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def track(self, trial: Trial) -> None:
        trial_id = trial._trial_id  # no public accessor; needed by record_heartbeat
        self._storage.record_heartbeat(trial_id)
        # Marks the trial as one with heartbeats: retried when they stop, waited for by others.
        self._storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, self._interval)
        with self._lock:
            self._trial_ids.add(trial_id)

    def untrack(self, trials: Sequence[Trial]) -> None:
        with self._lock:
            self._trial_ids.difference_update(t._trial_id for t in trials)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                trial_ids = list(self._trial_ids)
            for trial_id in trial_ids:
                try:
                    self._storage.record_heartbeat(trial_id)
                except Exception as e:  # a missed beat is harmless, a dead thread is not
                    log.warning("Could not record heartbeat of trial id %d: %s", trial_id, e)


class _NoHeartbeat:
    def __enter__(self) -> _NoHeartbeat:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def track(self, trial: Trial) -> None:
        pass

    def untrack(self, trials: Sequence[Trial]) -> None:
        pass


# --------------------------------------------------------------------------- reconnecting storage


def is_disconnect(err: BaseException) -> bool:
    """Whether ``err`` (or what it was raised from) says the database connection was lost or
    refused: a server restart or failover, a network blip, SQLite's busy file. Optuna wraps
    SQLAlchemy's errors in ``StorageInternalError``."""
    seen: Optional[BaseException] = err
    while seen is not None:
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and (
            seen.connection_invalidated
            or isinstance(seen, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))
        ):
            return True
        seen = seen.__cause__
    return False


def retry_on_disconnect(what: str, call: Callable[[int], Any], timeout: float) -> Any:
    """``call(attempt)`` (attempt 1, 2, ...) until it stops failing on a lost connection, for at
    most ``timeout`` seconds; other errors, and the last one, propagate."""
    deadline = time.monotonic() + timeout
    attempt = 1
    while True:
        try:
            return call(attempt)
        except Exception as e:
            if not is_disconnect(e) or time.monotonic() >= deadline:
                raise
            if attempt == 1:
                log.warning("Database connection lost (%s: %s); retrying %s", type(e).__name__, _first_line(e), what)
        time.sleep(min(0.25 * 2 ** min(attempt - 1, 4), 2.0, max(deadline - time.monotonic(), 0.0)))
        attempt += 1


def _first_line(err: BaseException) -> str:
    cause = err.__cause__ or err
    return (str(cause).strip().splitlines() or [""])[0]


_RETRY_DEPTH = threading.local()  # retries happen in the outermost storage call only

# RDBStorage methods that talk to the database (those the Study and _CachedStorage call).
_DB_METHODS = (
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "get_all_studies",
    "create_new_trial",
    "set_trial_param",
    "get_trial_param",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "get_all_trials",
    "_get_trials",
    "get_best_trial",
    "record_heartbeat",
    "_get_stale_trial_ids",
)


class ReconnectingRDBStorage(RDBStorage):
    """RDBStorage that retries an operation the database dropped, for up to ``reconnect_timeout``
    seconds, so that a database restart or failover does not end a worker.

    Reads and attribute writes are idempotent, so they are simply retried; a trial's state change
    is retried only while the trial is not in that state yet (the lost attempt's commit may have
    landed). An error on a connection is raised before its commit in practice (the server ends
    its sessions, then stops): only a commit that landed with its answer lost, in the instant
    the server stops, could make a retried ``create_new_trial`` leave an extra RUNNING trial
    that never gets a heartbeat (so it is never failed as stale and takes one of ``n_trials``).
    """

    def __init__(self, url: str, *, reconnect_timeout: float = 0.0, **kwargs: Any) -> None:
        self.reconnect_timeout = float(reconnect_timeout)
        retry_on_disconnect(
            "opening the storage",
            lambda _: super(ReconnectingRDBStorage, self).__init__(url, **kwargs),
            self.reconnect_timeout,
        )

    def _retry(self, name: str, call: Callable[[int], Any]) -> Any:
        if getattr(_RETRY_DEPTH, "value", 0) or self.reconnect_timeout <= 0:
            return call(1)
        _RETRY_DEPTH.value = 1
        try:
            return retry_on_disconnect(name, call, self.reconnect_timeout)
        finally:
            _RETRY_DEPTH.value = 0

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Optional[Sequence[float]] = None
    ) -> bool:
        def call(attempt: int) -> bool:
            if attempt > 1 and RDBStorage.get_trial(self, trial_id).state == state:
                return True  # the lost attempt's commit landed
            return RDBStorage.set_trial_state_values(self, trial_id, state, values)

        return self._retry("set_trial_state_values", call)


def _retrying(name: str) -> Callable[..., Any]:
    method = getattr(RDBStorage, name)

    @functools.wraps(method)
    def wrapper(self: ReconnectingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self._retry(name, lambda _: method(self, *args, **kwargs))

    return wrapper


for _name in _DB_METHODS:
    setattr(ReconnectingRDBStorage, _name, _retrying(_name))


# --------------------------------------------------------------------------- n_trials accounting


def _retried(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of the trials that a later trial retries (Optuna's retry callback)."""
    return {t.system_attrs[RETRY_HISTORY_ATTR][-1] for t in trials if t.system_attrs.get(RETRY_HISTORY_ATTR)}


def _counts(trial: FrozenTrial, use_heartbeat: bool, retried: set[int]) -> bool:
    """Whether ``trial`` takes one of the study's n_trials.

    COMPLETE and PRUNED trials do; FAIL ones too, unless another trial retries them (that one
    counts instead) or they were asked past n_trials and never run. With heartbeats, stale
    trials were just failed, so RUNNING ones belong to live workers and count as taken; without,
    we can't tell, so only finished ones count (and workers running concurrently may then
    overshoot by their in-flight trials). WAITING trials (retries, enqueued ones) are asked
    before new ones, so they only fill the remaining slots.
    """
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    if trial.state == TrialState.FAIL:
        return trial.number not in retried and not trial.system_attrs.get(DISCARDED_ATTR)
    return use_heartbeat and trial.state == TrialState.RUNNING


# --------------------------------------------------------------------------- sweeper


def _stale_callback_arg() -> str:
    import inspect

    params = inspect.signature(RDBStorage.__init__).parameters
    return "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"


_STALE_CALLBACK_ARG = _stale_callback_arg()  # Optuna 4.9 renamed failed_trial_callback


class _RetryOwnStaleTrial:
    """Optuna's retry of a heartbeat-stale trial (a WAITING copy with the same params, user
    attributes and system attributes ``failed_trial``/``retry_history``), for the trials this
    sweeper asked; a stale trial that other code left RUNNING is only failed."""

    def __init__(self, max_retry: Optional[int]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental / deprecated, by Optuna version
            retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
            self._retry = (retry_cls or optuna.storages.RetryFailedTrialCallback)(max_retry=max_retry)
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.system_attrs.get(HEARTBEAT_ATTR) is None:
            log.warning("Trial %d (not asked by this sweeper) had no heartbeat for too long: failed", trial.number)
            return
        retries = len(trial.system_attrs.get(RETRY_HISTORY_ATTR, []))
        if self.max_retry is not None and retries >= self.max_retry:
            log.warning(
                "Trial %d had no heartbeat for too long (its worker died?): failed; retried %d time(s) already",
                trial.number,
                retries,
            )
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._retry(study, trial)
        log.warning(
            "Trial %d had no heartbeat for too long (its worker died?): failed, and queued again with its params %s",
            trial.number,
            trial.params,
        )


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _make_sampler(conf: Mapping[str, Any], seed: Optional[int]) -> optuna.samplers.BaseSampler:
    name = str(conf.get("name", "tpe")).lower()
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name != "tpe":
        raise ValueError(f"hydra.sweeper.sampler.name must be 'tpe', 'random' or 'grid', got {name!r}")
    kwargs = {k: conf[k] for k in ("n_startup_trials", "multivariate", "constant_liar") if conf.get(k) is not None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, **kwargs)


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler whose after_trial does not call study.stop(), which raises outside study.optimize;
    this sweeper's ask/tell loop stops at n_trials, capped to the grid's size."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        pass


class _PerTrialSeedSampler(optuna.samplers.BaseSampler):
    """Samples each trial with its own sampler, seeded with ``seed + trial.number``.

    One seeded sampler per process would make workers that share a study replay the same
    random stream, i.e. propose the same parameters. Trial numbers are unique in the storage,
    so per-trial seeds never collide across workers, and a trial's parameters still depend
    only on its number and the trials before it (a resumed study gets new numbers, new seeds).
    The wrapped samplers (TPE, random) keep no state between trials besides their RNG.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make = make
        self._seed = seed
        self._samplers: dict[int, optuna.samplers.BaseSampler] = {}
        self._lock = threading.Lock()

    def _sampler(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        with self._lock:
            if trial.number not in self._samplers:
                self._samplers[trial.number] = self._make(self._seed + trial.number)
            return self._samplers[trial.number]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._sampler(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._sampler(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._sampler(trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._sampler(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Optional[Sequence[float]],
    ) -> None:
        self._sampler(trial).after_trial(study, trial, state, values)
        with self._lock:
            self._samplers.pop(trial.number, None)

    def reseed_rng(self) -> None:
        with self._lock:
            for sampler in self._samplers.values():
                sampler.reseed_rng()


def _with_installed_pg_driver(url: Any) -> Any:
    """``postgresql://`` with psycopg2 when psycopg (3) is missing: SQLAlchemy 2.1 maps the bare
    scheme to psycopg 3, while psycopg2-binary is what embft installs."""
    if url.drivername != "postgresql":
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        return url.set(drivername="postgresql+psycopg2")
    return url


def _lock_name(study_name: str) -> str:
    return hashlib.sha256(f"embft-optuna-ask\0{study_name}".encode()).hexdigest()


class _AskLock:
    """A held ask lock; :meth:`held` says whether it was held all along."""

    def __init__(self, conn: Optional[sqlalchemy.Connection] = None) -> None:
        self._conn = conn

    def held(self) -> bool:
        """False when the database session holding the lock is gone (a server restart): the lock
        went with it, so another worker may have counted the study's trials meanwhile."""
        if self._conn is None:
            return True
        try:
            self._conn.execute(sqlalchemy.text("SELECT 1"))
            return True
        except sqlalchemy.exc.DBAPIError:
            return False


@contextmanager
def _ask_lock(storage_url: Optional[str], study_name: str, reconnect_timeout: float = 0.0) -> Iterator[_AskLock]:
    """Serializes "count the study's trials, then ask" across the processes sharing a study.

    Without it two workers can both see one trial left and both ask, overshooting n_trials.
    PostgreSQL and MySQL get a database lock (works across machines), a SQLite file a lock
    file beside it; other backends run unlocked (an overshoot of up to n_jobs per concurrent
    worker is then possible). Taking a database lock is retried for ``reconnect_timeout``
    seconds while the server is unreachable.
    """
    if storage_url is None:
        yield _AskLock()
        return
    url = make_url(storage_url)
    backend = url.get_backend_name()
    name = _lock_name(study_name)
    if backend == "sqlite":
        database = url.database or ""
        if not database or database == ":memory:" or database.startswith("file:"):
            yield _AskLock()
            return
        from filelock import FileLock

        with FileLock(database + ".embft-ask.lock"):
            yield _AskLock()
        return
    if backend not in ("postgresql", "mysql", "mariadb"):
        yield _AskLock()
        return
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        if backend == "postgresql":
            # A transaction-level advisory lock: released when this transaction ends, also if
            # the process dies (the server drops the connection).
            key = int.from_bytes(bytes.fromhex(name[:16]), "big", signed=True)
            lock_sql, args, release_sql = "SELECT pg_advisory_xact_lock(:key)", {"key": key}, None
        else:
            lock = f"embft_optuna_{name[:40]}"  # MySQL lock names are at most 64 characters
            lock_sql, args, release_sql = "SELECT GET_LOCK(:name, 600)", {"name": lock}, "SELECT RELEASE_LOCK(:name)"

        def take(_: int) -> sqlalchemy.Connection:
            conn = engine.connect()
            try:
                got = conn.execute(sqlalchemy.text(lock_sql), args).scalar()
                if release_sql is not None and got != 1:
                    raise RuntimeError(f"could not take the MySQL lock {args['name']} in 600 s")
            except BaseException:
                conn.close()
                raise
            return conn

        conn = retry_on_disconnect("taking the ask lock", take, reconnect_timeout)
        try:
            yield _AskLock(conn)
        finally:
            try:
                if release_sql is not None:
                    conn.execute(sqlalchemy.text(release_sql), args)
                conn.commit()  # ends the transaction, which releases PostgreSQL's lock
                conn.close()
            except sqlalchemy.exc.DBAPIError as e:  # the session is gone, and its lock with it
                log.debug("Ask lock released with its lost connection: %s", e)
                conn.invalidate()
    finally:
        engine.dispose()


def _parse_directions(direction: Any) -> tuple[list[str], Optional[list[str]]]:
    """Directions, and metric names when given as ``{metric, direction}`` entries."""
    return parse_directions(direction)


def _pruner_spec(pruner: Any) -> Optional[dict[str, Any]]:
    """The pruner config as plain data (None for none/NopPruner), checked by building it."""
    spec = check_pruner(pruner)
    if spec is None or spec.get("_target_") == NOP_PRUNER:
        return None
    return spec


def _check_compatible(name: str, old: BaseDistribution, new: BaseDistribution) -> None:
    same = type(old) is type(new)
    if same and isinstance(old, (FloatDistribution, IntDistribution)):
        same = old.log == new.log  # type: ignore[union-attr]
    if same and isinstance(old, CategoricalDistribution):
        same = old.choices == new.choices  # type: ignore[attr-defined]
    if not same:
        raise ValueError(
            f"Search space of '{name}' is {new}, but the study already has trials with {old}. "
            "Use a new hydra.sweeper.study_name for a different search space."
        )


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
        self.seed = seed
        self.sampler_conf: Mapping[str, Any] = check_sampler(sampler)
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
        url = _with_installed_pg_driver(make_url(self.storage_url))
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
            callback = _RetryOwnStaleTrial(self.stale_trial_retries)
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
                        **{_STALE_CALLBACK_ARG: callback},
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
        """Every combination of the choice() params once, in an order seeded by hydra.sweeper.seed;
        n_trials is capped to the grid's size (asking past it would repeat points)."""
        ranges = [n for n, d in space.distributions.items() if not isinstance(d, CategoricalDistribution)]
        if ranges:
            raise ValueError(
                f"hydra.sweeper.sampler.name=grid searches choice(...) params only; {', '.join(ranges)} "
                "is a range: write it as choice(a, b, ...) or use sampler.name=tpe"
            )
        grid = {n: list(d.choices) for n, d in space.distributions.items()}  # type: ignore[attr-defined]
        size = math.prod(len(v) for v in grid.values())
        if self.n_trials > size:
            log.info("Grid of %d points: n_trials %d capped to %d", size, self.n_trials, size)
            self.n_trials = size
        return _AskTellGridSampler(grid, seed=self.seed)

    def _open_study(self, study_name: str, storage: Optional[RDBStorage], space: SearchSpace) -> optuna.Study:
        if str(self.sampler_conf.get("name", "tpe")).lower() == "grid":
            # GridSampler keeps which points are taken in the study itself, so workers share one grid.
            sampler: optuna.samplers.BaseSampler = self._grid_sampler(space)
        elif self.seed is None:
            sampler = _make_sampler(self.sampler_conf, None)
        else:
            sampler = _PerTrialSeedSampler(functools.partial(_make_sampler, self.sampler_conf), self.seed)
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
        space = parse_search_space(self.params, arguments, self.hydra_context.config_loader)

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

        use_heartbeat = storage is not None and self.heartbeat_interval is not None
        heartbeat = (
            _Heartbeat(storage, self.heartbeat_interval)  # type: ignore[arg-type]
            if use_heartbeat
            else _NoHeartbeat()
        )
        info_keys = self._trial_info_keys()
        if self.pruner_spec is not None and (storage is None or "storage" not in info_keys):
            log.warning(
                "hydra.sweeper.pruner is set, but jobs cannot reach their trials (%s): nothing will be pruned",
                "in-memory study" if storage is None else "the job config has no optuna.storage",
            )
        results_path = sweep_dir / RESULTS_FILE
        log.info(
            "Optuna study '%s' (%s): n_trials=%d, n_jobs=%d, search space %s, fixed %s",
            study_name,
            self._masked_storage(),
            self.n_trials,
            self.n_jobs,
            {n: p.distribution for n, p in space.params.items()},
            list(space.fixed.values()),
        )

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

        self._log_summary(self._write_results(study, space, results_path), results_path)
        return returns

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
        heartbeat: _Heartbeat | _NoHeartbeat,
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
            with _ask_lock(self.storage_url, study.study_name, self.reconnect_timeout) as lock:
                n = min(self.n_jobs, self._remaining_trials(study, use_heartbeat))
                for _ in range(n):
                    with warnings.catch_warnings():
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
                overrides = space.overrides(trial.params)
                trial.set_user_attr("overrides", overrides)
                if self.pruner_spec is not None:
                    # The job rebuilds its trial's pruner from here (reporting.TrialReporter).
                    trial.set_user_attr(PRUNER_ATTR, self.pruner_spec)
                batch.append(overrides + self._trial_info(trial_info_keys, trial, study.study_name, self.storage_url))
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=job_idx)
            for trial, ret in zip(trials, results):
                self._tell(study, trial, ret)
        except BaseException:
            # Don't leave RUNNING trials behind when composition or the launcher fails.
            for trial in trials:
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        finally:
            heartbeat.untrack(trials)
        return results

    def _discard_overshoot(
        self, study: optuna.Study, trials: list[Trial], heartbeat: _Heartbeat | _NoHeartbeat, use_heartbeat: bool
    ) -> None:
        """The ask lock was lost while asking (the database restarted), so another worker may
        have counted the same remaining trials: recount under a new lock and end our excess
        trials, not yet run, as FAIL marked DISCARDED_ATTR, which do not count."""
        with _ask_lock(self.storage_url, study.study_name, self.reconnect_timeout):
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
        return self.n_trials - sum(_counts(t, use_heartbeat, _retried(trials)) for t in trials)

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
            raise FailureBudgetExceeded(
                f"Optuna sweep stopped: {self.n_failed} of the {self.n_told} trials run by this "
                f"sweep failed ({rate:.0%}), more than hydra.sweeper.max_failure_rate="
                f"{self.max_failure_rate} (checked once hydra.sweeper.failure_rate_min_trials="
                f"{self.failure_rate_min_trials} trials finished). See the job logs for the "
                f"errors; partial results are in {results_path}."
            )

    # ---------------------------------------------------------------- results

    def _masked_storage(self) -> Optional[str]:
        if self.storage_url is None:
            return None
        return make_url(self.storage_url).render_as_string(hide_password=True)

    @staticmethod
    def _trial_overrides(trial: FrozenTrial, space: SearchSpace) -> list[str]:
        recorded = trial.user_attrs.get("overrides")
        if recorded is not None:
            return list(recorded)
        try:  # e.g. a trial added to the study outside this sweeper
            return space.overrides(trial.params)
        except (KeyError, ValueError, IndexError):
            return [f"{k}={format_value(v)}" for k, v in trial.params.items()]

    def _results(self, study: optuna.Study, space: SearchSpace) -> dict[str, Any]:
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        results: dict[str, Any] = {
            "name": "optuna",
            "study_name": study.study_name,
            "storage": self._masked_storage(),
            "direction": self.directions[0] if len(self.directions) == 1 else self.directions,
            "n_trials": self.n_trials,
            "n_complete": len(complete),
            "n_failed": sum(t.state == TrialState.FAIL for t in trials),
            "n_pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "n_retried": len(_retried(trials)),
            "pruner": self.pruner_spec,
        }
        if self.metric_names is not None:
            results["metric_names"] = list(self.metric_names)
        if len(self.directions) == 1:
            best = study.best_trial if complete else None
            results.update(
                best_value=None if best is None else best.value,
                best_params=None if best is None else dict(best.params),
                best_trial_number=None if best is None else best.number,
                best_overrides=None if best is None else self._trial_overrides(best, space),
            )
        else:
            results["best_trials"] = [
                {
                    "number": t.number,
                    "values": list(t.values),
                    "params": dict(t.params),
                    "overrides": self._trial_overrides(t, space),
                }
                for t in (study.best_trials if complete else [])
            ]
        return results

    def _write_results(self, study: optuna.Study, space: SearchSpace, path: Path) -> dict[str, Any]:
        results = self._results(study, space)
        tmp = path.with_name(path.name + ".tmp")
        OmegaConf.save(OmegaConf.create(results), tmp)
        os.replace(tmp, path)  # readers never see a half-written file
        return results

    @staticmethod
    def _log_summary(results: Mapping[str, Any], results_path: Path) -> None:
        if results["n_complete"] == 0:
            log.warning("Study '%s' has no completed trial", results["study_name"])
        elif "best_value" in results:
            log.info(
                "Best value %s (trial %d): %s",
                results["best_value"],
                results["best_trial_number"],
                " ".join(results["best_overrides"]),
            )
        log.info("Results written to %s", results_path)
