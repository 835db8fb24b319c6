"""Samplers: built from the sweeper's sampler node; a grid that ask-and-tell workers share, and a
per-trial seed so that workers never propose the same parameters."""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
)
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


SamplerFactory = Callable[..., optuna.samplers.BaseSampler]


def sampler_factory(sampler: Any) -> functools.partial:
    """The sampler node as a factory: what Hydra's instantiate made of it (`_partial_`), or a mapping
    with `_target_` (a sweeper built without Hydra) instantiated the same way."""
    if not isinstance(sampler, functools.partial):
        from hydra.utils import instantiate

        sampler = instantiate({**_plain(sampler), "_partial_": True})
    # None is "Optuna's default": not passed, so Optuna's deprecated arguments do not warn.
    keywords = {k: v for k, v in sampler.keywords.items() if v is not None}
    return functools.partial(sampler.func, *sampler.args, **keywords)


def split_seed(factory: functools.partial) -> tuple[functools.partial, Optional[int]]:
    """The factory without its ``seed`` argument, and that seed (the official ``sampler.seed``)."""
    keywords = dict(factory.keywords)
    seed = keywords.pop("seed", None)
    return functools.partial(factory.func, *factory.args, **keywords), seed


def seeds_per_trial(factory: functools.partial) -> bool:
    """Samplers whose only state between trials is their RNG (the rest is read from the study), so
    a fresh one per trial, seeded with seed + trial number, proposes the same as one long-lived one
    would, and workers sharing a study never replay one stream. Others get one sampler and the seed."""
    kinds = (optuna.samplers.TPESampler, optuna.samplers.RandomSampler, optuna.samplers.GPSampler)
    return isinstance(factory.func, type) and issubclass(factory.func, kinds)


def is_grid(factory: functools.partial) -> bool:
    return isinstance(factory.func, type) and issubclass(factory.func, optuna.samplers.GridSampler)


def make_sampler(factory: functools.partial, seed: Optional[int], **extra: Any) -> optuna.samplers.BaseSampler:
    """A sampler from its factory, with `seed` where its class takes one."""
    takes_seed = "seed" in inspect.signature(factory.func).parameters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return factory(**extra, **({"seed": seed} if takes_seed else {}))


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
