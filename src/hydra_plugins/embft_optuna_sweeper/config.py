"""Structured config of the ``embft_optuna`` sweeper (``hydra/sweeper=embft_optuna``)."""

# No `from __future__ import annotations` here: Hydra executes plugin modules before they
# are in sys.modules, which breaks dataclasses with string annotations (and OmegaConf).

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from hydra.core.config_store import ConfigStore

SWEEPER_TARGET = "hydra_plugins.embft_optuna_sweeper.embft_optuna_sweeper.EmbftOptunaSweeper"


@dataclass
class StorageOptionsConf:
    """How the sweeper talks to its database (``hydra.sweeper.storage_options``).

    - ``engine_kwargs``: passed to SQLAlchemy's ``create_engine`` for the study's storage. For
      non-SQLite URLs ``pool_pre_ping: true`` is added unless set here: a pooled connection that
      a database restart or a firewall dropped is tested and replaced before use.
    - ``reconnect_timeout`` (seconds): how long an operation the database dropped (restart,
      failover, network blip) is retried before the worker gives up; ``0``: never retried.
    """

    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    reconnect_timeout: float = 120.0


# Pruners: a config group, hydra/sweeper/pruner=none|median|successive_halving|hyperband, each
# node instantiated to its optuna.pruners class (fields = that class's arguments and defaults).


@dataclass
class NopPrunerConf:
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class MedianPrunerConf:
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class SuccessiveHalvingPrunerConf:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Union[int, str] = "auto"
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0
    bootstrap_count: int = 0


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Union[int, str] = "auto"
    reduction_factor: int = 3
    bootstrap_count: int = 0


# Samplers: a config group, hydra/sweeper/sampler=tpe|random|grid|cmaes|nsgaii|qmc|gp, the names and
# fields of the official hydra-optuna-sweeper's nodes, each its optuna.samplers class and arguments.
# `_partial_`: Hydra hands the sweeper a factory, which it completes with the seed (sampler.seed, else
# hydra.sweeper.seed; + the trial number for per-trial seeding) and, for a grid, the search space.


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    _partial_: bool = True
    seed: Optional[int] = None  # the official spelling; wins over hydra.sweeper.seed when set
    # null: Optuna's default (not passed: several of these are deprecated in Optuna 4.9+)
    consider_prior: Optional[bool] = None
    prior_weight: Optional[float] = None
    consider_magic_clip: Optional[bool] = None
    consider_endpoints: Optional[bool] = None
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: bool = False
    group: bool = False
    warn_independent_sampling: Optional[bool] = None
    constant_liar: bool = False  # helps when n_jobs > 1 or several workers


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    _partial_: bool = True
    seed: Optional[int] = None


@dataclass
class GridSamplerConf:
    """Every point of the choice()/range() params once, in a seeded order; n_trials capped to the grid."""

    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True
    seed: Optional[int] = None


@dataclass
class CmaEsSamplerConf:
    _target_: str = "optuna.samplers.CmaEsSampler"
    _partial_: bool = True
    seed: Optional[int] = None
    x0: Optional[dict[str, Any]] = None
    sigma0: Optional[float] = None
    n_startup_trials: int = 1
    warn_independent_sampling: Optional[bool] = None
    consider_pruned_trials: bool = False
    popsize: Optional[int] = None
    use_separable_cma: bool = False
    with_margin: bool = False
    lr_adapt: bool = False


@dataclass
class NSGAIISamplerConf:
    _target_: str = "optuna.samplers.NSGAIISampler"
    _partial_: bool = True
    seed: Optional[int] = None
    population_size: int = 50
    mutation_prob: Optional[float] = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5


@dataclass
class QMCSamplerConf:
    _target_: str = "optuna.samplers.QMCSampler"
    _partial_: bool = True
    seed: Optional[int] = None
    qmc_type: str = "sobol"
    scramble: bool = False
    warn_asynchronous_seeding: bool = True
    warn_independent_sampling: bool = True


@dataclass
class GPSamplerConf:
    _target_: str = "optuna.samplers.GPSampler"
    _partial_: bool = True
    seed: Optional[int] = None
    n_startup_trials: int = 10
    deterministic_objective: bool = False
    warn_independent_sampling: bool = True


MOTPE_REMOVED = (
    "hydra/sweeper/sampler=motpe: MOTPESampler was removed in Optuna 4; TPESampler searches several "
    "objectives itself: write hydra/sweeper/sampler=tpe"
)


def motpe_removed(*args: Any, **kwargs: Any) -> Any:
    raise ValueError(MOTPE_REMOVED)


@dataclass
class MOTPESamplerConf:
    """Kept so that a config naming it gets the official plugin's answer instead of Hydra's generic one."""

    _target_: str = "hydra_plugins.embft_optuna_sweeper.config.motpe_removed"
    _partial_: bool = True
    seed: Optional[int] = None


SAMPLERS = {
    "tpe": TPESamplerConf,
    "random": RandomSamplerConf,
    "grid": GridSamplerConf,
    "cmaes": CmaEsSamplerConf,
    "nsgaii": NSGAIISamplerConf,
    "qmc": QMCSamplerConf,
    "gp": GPSamplerConf,
}

PRUNERS = {
    "none": NopPrunerConf,
    "median": MedianPrunerConf,
    "successive_halving": SuccessiveHalvingPrunerConf,
    "hyperband": HyperbandPrunerConf,
}


@dataclass
class EmbftOptunaSweeperConf:
    """Options of the ``embft_optuna`` sweeper (select with ``hydra/sweeper=embft_optuna``).

    - ``direction``: ``"maximize"``/``"minimize"``, or a list of them for a multi-objective
      study (the job must then return a sequence of that many numbers). A list entry may
      also be a mapping ``{metric: NAME, direction: maximize}``: the names become the
      study's metric names (shown by Optuna's plots and dashboard), so an app can point
      ``direction`` at its own list of objectives, e.g. ``direction: ${objectives}``.
    - ``sampler`` (config group ``hydra/sweeper/sampler``: ``tpe`` (default), ``random``,
      ``grid``, ``cmaes``, ``nsgaii``, ``qmc``, ``gp``, the official plugin's nodes; its fields are
      the Optuna class's arguments, e.g. ``hydra.sweeper.sampler.n_startup_trials=5``; any Optuna
      sampler by its ``_target_``). A grid enumerates ``choice()`` and ``range()`` params.
    - ``pruner`` (config group ``hydra/sweeper/pruner``: ``none`` (default), ``median``,
      ``successive_halving``, ``hyperband``; its fields are the Optuna class's arguments,
      e.g. ``hydra/sweeper/pruner=median hydra.sweeper.pruner.n_warmup_steps=2``). Jobs
      report intermediate values to their trial (see :mod:`.reporting`, which rebuilds
      this pruner from the trial's ``pruner`` user attribute); a job that is told to stop
      either raises/returns ``optuna.TrialPruned`` or marks the trial PRUNED itself, and
      the trial ends PRUNED. Pruned trials count towards ``n_trials`` and not as failures.
      Optuna prunes single-objective studies only.
    - ``study_name``: ``None`` uses ``hydra.job.name`` (the task's name). Set it to an
      interpolation such as ``${experiment.name}`` to get one study per experiment.
    - ``storage``: an SQLAlchemy URL. The default keeps the study in ``optuna.db`` in the
      directory the command was started from (``hydra.runtime.cwd``, always absolute), so
      rerunning the same command resumes the study. A relative ``sqlite:///`` path is
      resolved against that directory too, and the parent folder is created. ``null``
      gives an in-memory study that is neither persisted nor shared. Interpolations here
      must not use the ``${hydra:...}`` resolver (directly or through other keys): Hydra
      instantiates the sweeper before that resolver works; use ``${hydra.runtime.cwd}``.
    - ``n_trials``: total trials the study should reach, counting earlier runs and other
      workers sharing the storage (several processes started with the same command on one
      PostgreSQL/MySQL URL or SQLite file). A worker counts the trials and asks new ones
      under a lock (a database advisory lock, or a lock file beside a SQLite file), and
      with heartbeats on (the default) live workers' RUNNING trials count, so the study
      ends at exactly ``n_trials``. With ``heartbeat_interval: null`` only finished trials
      count and concurrent workers may overshoot by their in-flight trials.
    - ``n_jobs``: trials asked per batch, handed to the launcher in one ``launch`` call.
    - ``seed`` (or the official spelling ``sampler.seed``, which wins when set): trial ``n`` of a
      TPE, random, NSGA-II or GP search is sampled with seed ``seed + n``; other samplers get ``seed``. Trial numbers are unique in
      the storage, so workers sharing a study never propose the same random samples, and
      a resumed study does not replay its first trials' samples. ``null``: unseeded.
    - ``max_failure_rate``/``failure_rate_min_trials``: the sweep aborts when more than
      this fraction of the trials it finished failed, once at least that many finished (the
      official plugin checks each batch alone); it re-raises the last failed job's error.
    - ``heartbeat_interval``/``grace_period`` (seconds): RUNNING trials whose heartbeat is
      older than ``grace_period`` are marked FAIL before each batch; ``heartbeat_interval:
      null`` turns this off. ``grace_period: null`` (default) is ``max(2 * heartbeat_interval,
      heartbeat_interval + 120)``, 180 s for the default 60: by then embft's MLflow heartbeat
      (stale after 120 s) says the dead trial's run is dead too, so the retried job closes it. Keep ``grace_period``
      above a database outage you want to ride out (a live trial's beats stop meanwhile).
    - ``stale_trial_retries``: a trial of this sweeper failed that way (its worker died:
      kill -9, a lost machine) is queued again with the same params (Optuna's
      ``RetryHeartbeatStaleTrialCallback``, system attributes ``failed_trial`` and
      ``retry_history``) up to this many times; the retry takes the failed trial's place in
      ``n_trials``. ``0``: only failed (and counted); ``null``: retried without limit.
    - ``wait_for_running``: a worker that finds the study full waits while other workers'
      trials run, so that one whose worker dies is still retried (``false``: leave at once;
      the next run of the command retries it).
    - ``storage_options``: ``engine_kwargs`` and ``reconnect_timeout`` (:class:`StorageOptionsConf`).
    - ``custom_search_space``: dotted path of a function ``(cfg, trial)`` called for each trial
      after the params are suggested; it may suggest more params on the Optuna trial (each
      becomes an override ``name=value``; name a new key ``+name``) and return ``None`` or a
      mapping of further fixed overrides. A leading ``.`` names a module beside the app's script.
    - ``search_space`` (deprecated in the official plugin, accepted): ``{name: {type: int|float|
      categorical, low, high, step, log, choices}}``; ``params`` wins where both name a key.
    - ``params``: search space as Hydra override values, e.g.
      ``{lr: "tag(log, interval(1e-5, 1e-3))", batch_size: "choice(16, 32)"}``.
      Sweep overrides given on the command line are added and win over these.
    - ``enqueue_trials``: points the study runs first, before the sampler proposes any (Optuna's
      ``study.enqueue_trial``), e.g. ``[{lr: 3e-4, batch_size: 32}]`` to make a known recipe a trial;
      a searched param left out is sampled. Each value must lie in its param's search space (refused
      in one line otherwise); a point the study already holds is not queued again, so a rerun adds none.
    """

    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"pruner": "none"}, {"sampler": "tpe"}])
    _target_: str = SWEEPER_TARGET
    direction: Any = "maximize"
    study_name: Optional[str] = None
    storage: Optional[str] = "sqlite:///${hydra.runtime.cwd}/optuna.db"
    n_trials: int = 20
    n_jobs: int = 1
    seed: Optional[int] = 42
    # Chosen by the defaults list (hydra/sweeper/sampler=NAME). Typed Any so that a bare string
    # (hydra.sweeper.sampler=tpe) composes and reaches the sweeper's check (checks.py), which says
    # to write hydra/sweeper/sampler=tpe instead.
    sampler: Any = None
    max_failure_rate: float = 0.5
    failure_rate_min_trials: int = 5
    heartbeat_interval: Optional[int] = 60
    grace_period: Optional[int] = None
    stale_trial_retries: Optional[int] = 1
    wait_for_running: bool = True
    storage_options: StorageOptionsConf = field(default_factory=StorageOptionsConf)
    params: Optional[dict[str, str]] = None
    custom_search_space: Optional[str] = None
    search_space: Any = None  # Any: OmegaConf cannot merge a mapping override into a None typed Dict
    enqueue_trials: list[dict[str, Any]] = field(default_factory=list)
    pruner: Any = None  # chosen by the defaults list above


for _name, _node in PRUNERS.items():
    ConfigStore.instance().store(group="hydra/sweeper/pruner", name=_name, node=_node, provider="embft")
for _name, _node in {**SAMPLERS, "motpe": MOTPESamplerConf}.items():
    ConfigStore.instance().store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="embft")

ConfigStore.instance().store(
    group="hydra/sweeper",
    name="embft_optuna",
    node=EmbftOptunaSweeperConf,
    provider="embft",
)
