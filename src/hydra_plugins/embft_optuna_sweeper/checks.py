"""Shape checks of the sweeper's nodes (pruner, sampler, direction), with a one-line fix each.

Hydra builds the sweeper only after the ``on_multirun_start`` callbacks ran, and a node of the
wrong shape (``hydra.sweeper.pruner=median``, a string where the pruner config group's mapping
belongs) then fails deep inside instantiation. An app whose callbacks create things at the start
of a multirun (e.g. MLflow runs) calls :func:`exit_on_bad_sweeper_config` first; the sweeper runs
the same checks when it is built, for apps that don't.

Light on purpose: Hydra imports this module when it scans for plugins (Optuna is imported only to
build the pruner, once its shape is right).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .config import MOTPE_REMOVED, PRUNERS, SAMPLERS, SWEEPER_TARGET

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")
NOP_PRUNER = "optuna.pruners.NopPruner"


class SweeperConfigError(ValueError):
    """A sweeper node of the wrong shape; the message is one line that says what to write."""


def _first_line(err: BaseException) -> str:
    """The root cause's message, first line (Hydra's instantiate wraps the class's own error)."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _choices(names: Any, sep: str = "|") -> str:
    return sep.join(names)


def check_pruner(pruner: Any) -> Optional[dict[str, Any]]:
    """The pruner node as plain data (None for no pruner), or a :class:`SweeperConfigError`."""
    if pruner is None:
        return None
    if isinstance(pruner, DictConfig):
        pruner = OmegaConf.to_container(pruner, resolve=True)
    group = f"hydra/sweeper/pruner={_choices(PRUNERS)}"
    if isinstance(pruner, str):
        if pruner in PRUNERS:
            raise SweeperConfigError(
                f"hydra.sweeper.pruner={pruner} sets the pruner to a string; the pruner is a config group: "
                f"write hydra/sweeper/pruner={pruner} (choices: {_choices(PRUNERS, ', ')}; its arguments then "
                "as e.g. hydra.sweeper.pruner.n_startup_trials=3)"
            )
        raise SweeperConfigError(f"hydra.sweeper.pruner={pruner} is not a pruner: choose one with {group}")
    if not isinstance(pruner, Mapping):
        raise SweeperConfigError(f"hydra.sweeper.pruner={pruner!r} is not a pruner: choose one with {group}")
    target = pruner.get("_target_")
    if not isinstance(target, str) or not target:
        raise SweeperConfigError(f"hydra.sweeper.pruner has no _target_: choose a pruner with {group}")
    spec = dict(pruner)
    from embft.sweeping.trial_reporter import make_pruner

    try:
        make_pruner(spec)
    except Exception as e:
        raise SweeperConfigError(f"hydra.sweeper.pruner ({target}): {_first_line(e)}") from e
    return spec


def check_sampler(sampler: Any) -> Any:
    """The sampler node (a mapping with `_target_`, or the factory Hydra instantiated from one), or a
    :class:`SweeperConfigError` saying what to write."""
    import functools

    if isinstance(sampler, DictConfig):
        sampler = OmegaConf.to_container(sampler, resolve=True)
    names = _choices(SAMPLERS, ", ")
    if sampler is None:  # a sweeper built without Hydra's defaults list: TPE with Optuna's defaults
        sampler = {"_target_": "optuna.samplers.TPESampler"}
    if isinstance(sampler, str):
        name = sampler if sampler.lower() in SAMPLERS else "tpe"
        raise SweeperConfigError(
            f"hydra.sweeper.sampler={sampler} sets the sampler to a string; the sampler is a config group: "
            f"write hydra/sweeper/sampler={name} (choices: {names}; its arguments then as e.g. "
            "hydra.sweeper.sampler.n_startup_trials=5)"
        )
    if not isinstance(sampler, functools.partial) and (not isinstance(sampler, Mapping) or "_target_" not in sampler):
        name = str(sampler.get("name", "")) if isinstance(sampler, Mapping) else ""
        hint = f"hydra/sweeper/sampler={name}" if name in SAMPLERS else f"hydra/sweeper/sampler=NAME ({names})"
        raise SweeperConfigError(f"hydra.sweeper.sampler={sampler!r} is not a sampler node (no _target_): write {hint}")
    from ._samplers import is_grid, make_sampler, sampler_factory

    target = getattr(getattr(sampler, "func", None), "__name__", None) or (
        sampler.get("_target_") if isinstance(sampler, Mapping) else "?"
    )
    if str(target).endswith("motpe_removed"):
        raise SweeperConfigError(MOTPE_REMOVED)
    try:
        factory = sampler_factory(sampler)
        if getattr(factory.func, "__name__", "") == "CmaEsSampler":  # it imports cmaes only when it samples
            import importlib.util

            if importlib.util.find_spec("cmaes") is None:
                raise ImportError("CmaEsSampler needs the cmaes package")
        if not is_grid(factory):  # built once, so a bad argument fails here (a grid needs the search space)
            make_sampler(factory, 0)
    except ImportError as err:  # e.g. CmaEsSampler without the cmaes package
        raise SweeperConfigError(
            f"hydra.sweeper.sampler._target_={target}: {_first_line(err)} (install the package it names, "
            "e.g. pip install cmaes, or choose another sampler)"
        ) from err
    except Exception as err:
        raise SweeperConfigError(
            f"hydra.sweeper.sampler._target_={target}: {_first_line(err)} (choices: {names}, or any optuna.samplers class)"
        ) from err
    return sampler


def _as_text(value: Any) -> Any:
    return str(value) if isinstance(value, str) else value  # a StrEnum (e.g. embft's Direction) -> str


def parse_directions(direction: Any) -> tuple[list[str], Optional[list[str]]]:
    """Directions, and metric names when given as ``{metric, direction}`` entries."""
    if isinstance(direction, DictConfig) or OmegaConf.is_list(direction):
        direction = OmegaConf.to_container(direction, resolve=True, enum_to_str=True)
    hint = (
        "write maximize or minimize, a list of them, or a list of {metric: NAME, direction: maximize|minimize} "
        "(e.g. hydra.sweeper.direction: ${objectives})"
    )
    if isinstance(direction, (str, Mapping)):
        entries = [direction]
    elif isinstance(direction, (list, tuple)):
        entries = list(direction)
    else:
        raise SweeperConfigError(f"hydra.sweeper.direction={direction!r}: {hint}")
    if not entries:
        raise SweeperConfigError(f"hydra.sweeper.direction is empty: {hint}")
    directions: list[str] = []
    names: list[Optional[str]] = []
    for entry in entries:
        if isinstance(entry, Mapping):
            unknown = sorted(set(map(str, entry)) - {"metric", "direction"})
            metric = entry.get("metric")
            if unknown or not isinstance(metric, str) or not metric:
                raise SweeperConfigError(f"hydra.sweeper.direction entry {entry!r}: {hint}")
            directions.append(_as_text(entry.get("direction", "maximize")))
            names.append(metric)
        else:
            directions.append(_as_text(entry))
            names.append(None)
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad:
        raise SweeperConfigError(f"hydra.sweeper.direction: {bad[0]!r} is not maximize or minimize; {hint}")
    if all(n is None for n in names):
        return directions, None
    if any(n is None for n in names):
        raise SweeperConfigError(f"hydra.sweeper.direction: name every objective or none, got {direction!r}")
    return directions, [str(n) for n in names]


def load_custom_search_space(path: Optional[str]) -> Optional[Callable[..., Any]]:
    """The ``custom_search_space`` function (the official plugin's hook); a leading ``.`` names a
    module beside the app's script (``.my_app.configure``), as the official examples write it."""
    if not path:
        return None
    hint = "a dotted path to a function (cfg, trial), e.g. my_module.configure or .my_app.configure"
    try:
        if str(path).startswith("."):
            function = _beside_the_script(str(path)[1:])
        else:
            from hydra.utils import get_method

            function = get_method(str(path))
    except Exception as err:
        raise SweeperConfigError(f"hydra.sweeper.custom_search_space={path}: {_first_line(err)} ({hint})") from err
    if not callable(function):
        raise SweeperConfigError(f"hydra.sweeper.custom_search_space={path} is not callable ({hint})")
    return function


def _beside_the_script(dotted: str) -> Any:
    import importlib.util

    module_name, _, name = dotted.rpartition(".")
    main = sys.modules.get("__main__")
    script = Path(getattr(main, "__file__", "") or "")
    if module_name == script.stem:  # the app itself (its file name may hold '-': no import by name)
        return getattr(main, name)
    spec = importlib.util.spec_from_file_location(module_name, script.parent / f"{module_name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"no module {module_name} beside {script}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def check_search_space(sweeper: Any, arguments: Sequence[str]) -> None:
    """A search range Optuna cannot search (``interval(5, 1)``, ``tag(log, interval(0, 1))``) or a
    grid over an interval, refused in one line naming the parameter, before any store is opened."""
    from ._samplers import is_grid, sampler_factory
    from ._search_space import SearchSpaceError, parse_search_space

    def plain(key: str) -> Any:
        value = sweeper.get(key) if isinstance(sweeper, Mapping) else None
        return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value

    try:
        space = parse_search_space(plain("params"), list(arguments), search_space=plain("search_space"))
        sampler = plain("sampler")
        if isinstance(sampler, Mapping) and "_target_" in sampler and is_grid(sampler_factory(sampler)):
            space.grid()
    except SearchSpaceError as err:
        raise SweeperConfigError(str(err)) from err
    except Exception:  # e.g. glob(...) needs Hydra's config loader: the sweeper checks it itself
        return


def check_sweeper_node(sweeper: Any, arguments: Optional[Sequence[str]] = None) -> None:
    """Check the pruner, sampler, direction, custom_search_space and (given the command line's
    overrides) the search space of an ``embft_optuna`` sweeper node."""
    checked: dict[str, Any] = {}
    for key, check in (("pruner", check_pruner), ("sampler", check_sampler), ("direction", parse_directions)):
        try:
            value = sweeper.get(key) if isinstance(sweeper, Mapping) else None
            if isinstance(value, DictConfig) or OmegaConf.is_list(value):
                value = OmegaConf.to_container(value, resolve=True, enum_to_str=True)
        except Exception as e:  # e.g. an interpolation that does not resolve
            raise SweeperConfigError(f"hydra.sweeper.{key}: {_first_line(e)}") from e
        checked[key] = None if key == "direction" and value is None else check(value)
    pruner, directions = checked["pruner"], checked["direction"]
    if pruner and pruner.get("_target_") != NOP_PRUNER and directions and len(directions[0]) > 1:
        raise SweeperConfigError(
            "hydra.sweeper.pruner: Optuna prunes single-objective studies only; "
            "use hydra/sweeper/pruner=none with several directions"
        )
    if isinstance(sweeper, Mapping):
        load_custom_search_space(sweeper.get("custom_search_space"))
    if arguments is not None:
        check_search_space(sweeper, arguments)


def exit_on_bad_sweeper_config(config: DictConfig) -> None:
    """For an app's ``on_multirun_start``, before it creates anything: when the sweeper is
    ``embft_optuna`` and one of its nodes has the wrong shape, log one line and exit 1."""
    sweeper = OmegaConf.select(config, "hydra.sweeper")
    if not isinstance(sweeper, DictConfig) or sweeper.get("_target_") != SWEEPER_TARGET:
        return
    arguments = OmegaConf.select(config, "hydra.overrides.task", default=None) or []
    try:
        check_sweeper_node(sweeper, [str(a) for a in arguments])
    except SweeperConfigError as e:
        log.error("%s", e)
        raise SystemExit(1) from None


class SweeperConfigCheck(Callback):
    """The app's first multirun callback (conf/config.yaml): a bad sweeper node is one line before any
    store or run is created, since Hydra builds the sweeper only after ``on_multirun_start``."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        exit_on_bad_sweeper_config(config)
