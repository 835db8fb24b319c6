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
from collections.abc import Mapping
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from .config import PRUNERS, SAMPLERS, SWEEPER_TARGET

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
    from .reporting import make_pruner

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
    try:
        factory = sampler_factory(sampler)
        if not is_grid(factory):  # built once, so a bad argument fails here (a grid needs the search space)
            make_sampler(factory, 0)
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


def check_sweeper_node(sweeper: Any) -> None:
    """Check the pruner, sampler and direction of an ``embft_optuna`` sweeper node."""
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


def exit_on_bad_sweeper_config(config: DictConfig) -> None:
    """For an app's ``on_multirun_start``, before it creates anything: when the sweeper is
    ``embft_optuna`` and one of its nodes has the wrong shape, log one line and exit 1."""
    sweeper = OmegaConf.select(config, "hydra.sweeper")
    if not isinstance(sweeper, DictConfig) or sweeper.get("_target_") != SWEEPER_TARGET:
        return
    try:
        check_sweeper_node(sweeper)
    except SweeperConfigError as e:
        log.error("%s", e)
        raise SystemExit(1) from None
