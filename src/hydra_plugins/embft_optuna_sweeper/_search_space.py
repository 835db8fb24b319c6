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


# Top-level job config node that, when present, receives the trial number and study name.
# System attributes this sweeper puts on its trials.

_INT_LITERAL = re.compile(r"[+-]?\d[\d_]*")


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
