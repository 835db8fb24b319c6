"""The search space: Hydra override grammar (choice, range, interval, tag(log, ...)) as Optuna distributions."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    QuotedString,
    RangeSweep,
    Transformer,
)
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- search space


class SearchSpaceError(ValueError):
    """A search-space entry Optuna cannot search; the message is one line naming the parameter."""


@dataclass(frozen=True)
class SearchParam:
    """One searched parameter: the override key and its Optuna distribution."""

    key: str  # override key element, including a "+"/"++" prefix if one was given
    distribution: BaseDistribution
    choice_texts: tuple[str, ...] = ()  # override text of each categorical choice
    grid: Optional[tuple[Any, ...]] = None  # the points a grid sampler visits (choice and range only)

    def override(self, value: Any) -> str:
        if isinstance(self.distribution, CategoricalDistribution) and self.choice_texts:
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
        """Job overrides for one trial: the fixed ones, one per searched parameter, then one per
        parameter a custom_search_space function added (named as it suggested them)."""
        extra = [f"{n}={format_value(v)}" for n, v in values.items() if n not in self.params]
        return [*self.fixed.values(), *(p.override(values[n]) for n, p in self.params.items()), *extra]

    def check_point(self, point: Mapping[str, Any], where: str) -> None:
        """A point to enqueue: every key a searched param, every value inside its distribution."""
        for name, value in point.items():
            param = self.params.get(name)
            if param is None:
                raise SearchSpaceError(
                    f"{where}.{name}: not a searched param; searched: {', '.join(self.params) or 'none'}"
                )
            try:
                inside = param.distribution._contains(param.distribution.to_internal_repr(value))  # no public test
            except (ValueError, TypeError):
                inside = False
            if not inside:
                raise SearchSpaceError(f"{where}.{name}={value!r}: outside its search space {param.distribution}")

    def grid(self) -> dict[str, list[Any]]:
        """The grid sampler's search space; an interval() param has no points: refused in one line."""
        continuous = [n for n, p in self.params.items() if p.grid is None]
        if continuous:
            raise SearchSpaceError(
                f"hydra/sweeper/sampler=grid visits choice(...) and range(...) params only; "
                f"{', '.join(continuous)} is an interval: write it as range(start, stop, step) or choice(a, b, ...)"
            )
        return {n: list(p.grid) for n, p in self.params.items()}  # type: ignore[arg-type]


def parse_search_space(
    params: Optional[Mapping[str, Any]],
    arguments: Sequence[str] = (),
    config_loader: Any = None,
    search_space: Optional[Mapping[str, Any]] = None,
) -> SearchSpace:
    """Build the search space from ``hydra.sweeper.params`` and command-line overrides.

    The mapping follows the official hydra-optuna-sweeper: ``choice(...)``/``a,b``/``glob(...)``
    and ``shuffle(range(...))`` are categorical; ``range(start, stop, step)`` is a stepped int
    distribution from ``start`` to ``stop`` (a float one when any of them is a float);
    ``interval(a, b)`` is a float distribution (Hydra's grammar makes its bounds floats),
    ``int(interval(a, b))`` an int one; ``tag(log, ...)`` makes it log-scaled. Plain overrides
    are kept as fixed overrides. A command-line override replaces a config entry of the same
    key, and ``params`` entries replace the (deprecated) ``search_space`` entries.
    An entry Optuna cannot search raises :class:`SearchSpaceError` naming it.
    """
    space = SearchSpace()
    for name, spec in (search_space or {}).items():
        space.params[str(name)] = SearchParam(str(name), _distribution_from_spec(str(name), spec))
    lines = [f"{k}={'null' if v is None else v}" for k, v in (params or {}).items()]
    lines.extend(arguments)
    for override in OverridesParser.create(config_loader=config_loader).parse_overrides(lines):
        name = _param_name(override)
        space.params.pop(name, None)
        space.fixed.pop(name, None)
        if override.is_sweep_override():
            try:
                space.params[name] = _search_param(override)
            except ValueError as err:  # Optuna's own check of the bounds, or ours
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise SearchSpaceError(f"search parameter {name}: {override.input_line}: {reason}") from err
        else:
            assert override.input_line is not None
            space.fixed[name] = override.input_line
    return space


def _distribution_from_spec(name: str, spec: Any) -> BaseDistribution:
    """A distribution from the official plugin's deprecated ``search_space`` entry."""
    spec = dict(spec)
    kind = str(spec.get("type", "")).rsplit(".", 1)[-1]
    try:
        if kind == "categorical":
            return CategoricalDistribution(tuple(spec["choices"]))
        low, high, step, log_scale = spec.get("low"), spec.get("high"), spec.get("step"), bool(spec.get("log", False))
        if kind == "int":
            return IntDistribution(int(low), int(high), log=log_scale, step=int(step) if step is not None else 1)
        if kind == "float":
            return FloatDistribution(float(low), float(high), log=log_scale, step=step)
    except (KeyError, TypeError, ValueError) as err:
        raise SearchSpaceError(f"hydra.sweeper.search_space.{name}: {type(err).__name__}: {err}") from err
    raise SearchSpaceError(f"hydra.sweeper.search_space.{name}.type={kind!r}: write int, float or categorical")


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
            raise ValueError("a log scale needs interval(...) or range(...)")
        if isinstance(value, ChoiceSweep):
            elements = list(value.list)
        else:  # glob(...) over config group options
            elements = list(override.sweep_iterator())
        return _categorical(key, elements)

    if override.is_range_sweep():
        assert isinstance(value, RangeSweep)
        points = _range_points(value)
        if value.shuffle:  # the official plugin: a categorical over the range's values
            return _categorical(key, points)
        return SearchParam(key, _range_distribution(value, log_scale), grid=tuple(points))

    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        assert value.start is not None and value.end is not None
        # Hydra's grammar makes interval bounds floats; int(interval(...)) casts them to ints.
        if isinstance(value.start, int) and isinstance(value.end, int):
            return SearchParam(key, IntDistribution(value.start, value.end, log=log_scale))
        return SearchParam(key, FloatDistribution(float(value.start), float(value.end), log=log_scale))

    raise ValueError(f"unsupported sweep type {override.value_type}")


def _categorical(key: str, elements: Sequence[Any]) -> SearchParam:
    texts = tuple(format_value(e) for e in elements)
    choices = tuple(_categorical_choice(e) for e in elements)
    return SearchParam(key, CategoricalDistribution(choices), texts, grid=choices)


def _categorical_choice(element: Any) -> Any:
    if isinstance(element, QuotedString):
        return element.text
    if element is None or isinstance(element, (bool, int, float, str)):
        return element
    return Transformer.str(element)  # lists/dicts: Optuna stores them as their text


def _is_int_range(value: RangeSweep) -> bool:
    return all(isinstance(x, int) for x in (value.start, value.stop, value.step))


def _range_points(value: RangeSweep) -> list[Any]:
    """The values Hydra's basic sweeper would visit (``stop`` excluded): a grid's points."""
    start, stop, step = value.start, value.stop, value.step
    assert start is not None and stop is not None
    if step == 0:
        raise ValueError("range step must not be 0")
    if _is_int_range(value):
        points: list[Any] = list(range(int(start), int(stop), int(step)))
    else:  # Decimal: 0.1 steps without 0.30000000000000004
        d_start, d_stop, d_step = (Decimal(str(x)) for x in (start, stop, step))
        count = int(((d_stop - d_start) / d_step).to_integral_value(rounding=ROUND_CEILING))
        points = [float(d_start + i * d_step) for i in range(max(count, 0))]
    if not points:
        raise ValueError(f"empty range from {start} to {stop} by {step}")
    return points


def _range_distribution(value: RangeSweep, log_scale: bool) -> BaseDistribution:
    """As the official plugin: from ``start`` to ``stop`` by ``step`` (Optuna lowers ``stop`` to
    the last step it reaches), ints unless one of them is a float."""
    start, stop, step = value.start, value.stop, value.step
    assert start is not None and stop is not None
    low, high = sorted((start, stop))
    if _is_int_range(value):
        if log_scale and abs(int(step)) != 1:
            raise ValueError("a log-scaled int range needs step 1")
        n_steps = (int(high) - int(low)) // abs(int(step))  # Optuna would warn and do the same
        return IntDistribution(int(low), int(low) + n_steps * abs(int(step)), log=log_scale, step=abs(int(step)))
    if log_scale:
        raise ValueError("a log-scaled float needs tag(log, interval(a, b)) (Optuna has no stepped log floats)")
    d_low, d_high, d_step = (Decimal(str(x)) for x in (low, high, abs(step)))
    return FloatDistribution(float(d_low), float(d_low + ((d_high - d_low) // d_step) * d_step), step=float(d_step))


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
