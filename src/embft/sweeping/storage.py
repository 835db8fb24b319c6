"""The study's storage: trial heartbeats, a storage that reconnects when the database restarts, the
n_trials accounting, retrying a dead worker's trial, and the database lock workers ask trials under."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, Trial, TrialState
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)


# Top-level job config node that, when present, receives the trial number and study name.
# System attributes this sweeper puts on its trials.
HEARTBEAT_ATTR = "embft:heartbeat"  # the trial records heartbeats (its worker can be told dead)
DISCARDED_ATTR = "embft:discarded"  # asked past n_trials after a lost database lock, never run
INTERRUPTED_ATTR = "embft:interrupted"  # stopped by Ctrl-C or a kill, enqueued again with its params
RETRY_HISTORY_ATTR = "retry_history"  # Optuna's RetryHeartbeatStaleTrialCallback: the trials retried


# --------------------------------------------------------------------------- heartbeat


class Heartbeat:
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

    def __enter__(self) -> Heartbeat:
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


class NoHeartbeat:
    def __enter__(self) -> NoHeartbeat:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def track(self, trial: Trial) -> None:
        pass

    def untrack(self, trials: Sequence[Trial]) -> None:
        pass


# --------------------------------------------------------------------------- stops


@contextmanager
def stops_deferred(signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Ctrl-C or a kill held back until the block ends, then delivered as usual: a trial asked (or closed)
    in the block is never left RUNNING by a stop that lands halfway, where it would take a slot of n_trials
    in every rerun. Python-level handlers, not a signal mask: any thread may take a masked process signal."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread can set handlers, and only it runs them
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda sig, _frame: caught.append(sig)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            handler = previous[sig]
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), sig)  # the default action (SIGTERM's: the process ends)


# --------------------------------------------------------------------------- reconnecting storage


# What a connection lost mid-statement surfaces as besides OperationalError/InterfaceError: a
# session reused after the failed statement (PendingRollbackError), PostgreSQL's connection and
# shutdown SQLSTATEs (08xxx, 57P0x), and psycopg2's bare DatabaseError when the socket drops while a
# result is read ("... no message from the libpq"); Optuna wraps each in StorageInternalError.
_LOST_SQLSTATES = ("08", "57P")
_LOST_MESSAGES = ("no message from the libpq", "server closed the connection", "connection already closed")


def is_disconnect(err: BaseException) -> bool:
    """Whether ``err`` (or what it was raised from, or raised while handling) says the database
    connection was lost or refused: a server restart or failover, a network blip, SQLite's busy
    file. Optuna wraps SQLAlchemy's errors in ``StorageInternalError``."""
    seen: Optional[BaseException] = err
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, (sqlalchemy.exc.PendingRollbackError, sqlalchemy.exc.DisconnectionError)):
            return True
        if isinstance(seen, sqlalchemy.exc.DBAPIError):
            if seen.connection_invalidated or isinstance(
                seen, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
            ):
                return True
            code = getattr(seen.orig, "pgcode", None) or ""
            if code.startswith(_LOST_SQLSTATES) or any(m in str(seen.orig) for m in _LOST_MESSAGES):
                return True
        seen = seen.__cause__ or seen.__context__
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

# RDBStorage methods that talk to the database (those the Study and _CachedStorage call, private
# ones included: a test checks this list against what the installed _CachedStorage calls).
DB_METHODS = (
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
    "_create_new_trial",
    "get_trial_param",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "get_all_trials",
    "_get_trials",
    "get_best_trial",
    "_get_best_trial_id",
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

    def _set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: Any,
        previous_distribution: Any = None,
    ) -> None:
        # set_trial_param and the cached storage's suggest both land here; a param row is unique
        # per trial, so a retry whose lost attempt's commit landed must not insert it again.
        def call(attempt: int) -> None:
            if attempt > 1 and param_name in RDBStorage.get_trial(self, trial_id).params:
                return
            RDBStorage._set_trial_param(
                self, trial_id, param_name, param_value_internal, distribution, previous_distribution
            )

        self._retry("_set_trial_param", call)


def _retrying(name: str) -> Callable[..., Any]:
    method = getattr(RDBStorage, name)

    @functools.wraps(method)
    def wrapper(self: ReconnectingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self._retry(name, lambda _: method(self, *args, **kwargs))

    return wrapper


for _name in DB_METHODS:
    setattr(ReconnectingRDBStorage, _name, _retrying(_name))


# --------------------------------------------------------------------------- n_trials accounting


def retried_trial_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of the trials that a later trial retries (Optuna's retry callback)."""
    return {t.system_attrs[RETRY_HISTORY_ATTR][-1] for t in trials if t.system_attrs.get(RETRY_HISTORY_ATTR)}


def counts_towards_n_trials(trial: FrozenTrial, use_heartbeat: bool, retried: set[int]) -> bool:
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
        return (
            trial.number not in retried
            and not trial.system_attrs.get(DISCARDED_ATTR)
            and not trial.system_attrs.get(INTERRUPTED_ATTR)
        )
    return use_heartbeat and trial.state == TrialState.RUNNING


def _stale_callback_arg() -> str:
    import inspect

    params = inspect.signature(RDBStorage.__init__).parameters
    return "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"


STALE_CALLBACK_ARG = _stale_callback_arg()  # Optuna 4.9 renamed failed_trial_callback


class RetryOwnStaleTrial:
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


def with_installed_pg_driver(url: Any) -> Any:
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


class AskLock:
    """A held ask lock; :meth:`held` says whether it was held all along."""

    def __init__(self, conn: Optional[sqlalchemy.Connection] = None) -> None:
        self._conn = conn
        self._lost = False

    def held(self) -> bool:
        """False when the database session holding the lock is gone (a server restart): the lock
        went with it, so another worker may have counted the study's trials meanwhile."""
        if self._conn is None or self._lost:
            return self._conn is None
        try:
            self._conn.execute(sqlalchemy.text("SELECT 1"))
            return True
        except (sqlalchemy.exc.DBAPIError, sqlalchemy.exc.PendingRollbackError):
            # SQLAlchemy invalidated the connection; its transaction can only be rolled back now.
            self._lost = True
            return False

    def release(self, release_sql: Optional[str] = None, args: Optional[dict[str, Any]] = None) -> None:
        """Ends the lock's transaction (which releases PostgreSQL's lock) and closes its
        connection; a lost session took its lock with it, so then only the connection goes."""
        if self._conn is None:
            return
        try:
            if not self._lost:
                if release_sql is not None:
                    self._conn.execute(sqlalchemy.text(release_sql), args or {})
                self._conn.commit()
        except (sqlalchemy.exc.DBAPIError, sqlalchemy.exc.PendingRollbackError) as e:
            log.debug("Ask lock released with its lost connection: %s", e)
            self._lost = True
        if self._lost:
            self._conn.invalidate()  # never hand a dead connection back; NullPool closes it
        self._conn.close()


@contextmanager
def ask_lock(storage_url: Optional[str], study_name: str, reconnect_timeout: float = 0.0) -> Iterator[AskLock]:
    """Serializes "count the study's trials, then ask" across the processes sharing a study.

    Without it two workers can both see one trial left and both ask, overshooting n_trials.
    PostgreSQL and MySQL get a database lock (works across machines), a SQLite file a lock
    file beside it; other backends run unlocked (an overshoot of up to n_jobs per concurrent
    worker is then possible). Taking a database lock is retried for ``reconnect_timeout``
    seconds while the server is unreachable.
    """
    if storage_url is None:
        yield AskLock()
        return
    url = make_url(storage_url)
    backend = url.get_backend_name()
    name = _lock_name(study_name)
    if backend == "sqlite":
        database = url.database or ""
        if not database or database == ":memory:" or database.startswith("file:"):
            yield AskLock()
            return
        from filelock import FileLock

        with FileLock(database + ".embft-ask.lock"):
            yield AskLock()
        return
    if backend not in ("postgresql", "mysql", "mariadb"):
        yield AskLock()
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

        lock = AskLock(retry_on_disconnect("taking the ask lock", take, reconnect_timeout))
        try:
            yield lock
        finally:
            lock.release(release_sql, args)
    finally:
        engine.dispose()
