"""How a plot names what it shows: a configuration by its arm (conf/arm/<name>.yaml), else by its backend
and loss; labels short enough to read, placed so none sits on another; twin rows shown once."""

from __future__ import annotations

import itertools
import math
import re
import textwrap
from collections.abc import Mapping
from typing import Any

import pandas as pd

from embft.report.summary import DATA_PARAM, config_label

# Hydra's override_dirname is the run name: "arm=fe_fast,train.seed=1" names the arm of a run logged
# before runs carried the embft.arm tag.
_ARM_IN_RUN_NAME = re.compile(r"(?:^|,)arm=([^,]+)")
_BACKEND_SHORT = {"flagembedding": "fe", "sentence_transformers": "", "setfit": "setfit", "model2vec": "model2vec"}
_DEFAULT_LOSS = {"flagembedding": "stock", "setfit": "cosine_similarity"}
WRAP = 28  # characters per line of a row label


def _value(params: Mapping[str, Any], key: str) -> str | None:
    v = params.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)) or str(v) in ("", "None", "(unset)"):
        return None
    return str(v)


def arm_from_run_name(run_name: str | None) -> str | None:
    hit = _ARM_IN_RUN_NAME.search(run_name or "")
    return hit.group(1) if hit else None


def derived_arm(params: Mapping[str, Any]) -> str:
    """A name for a run that names no arm, from its backend and loss (FlagEmbedding: `fe`, its loss
    where not the stock one, and its variant), e.g. `supcon`, `setfit`, `fe same`, `fe groupwise same_nib`.
    Runs from before `train.backend` existed are FlagEmbedding's."""
    backend = _value(params, "train.backend") or "flagembedding"
    loss, variant = _value(params, "train.loss"), _value(params, "variant.name")
    parts = [_BACKEND_SHORT.get(backend, backend)]
    if loss and loss != _DEFAULT_LOSS.get(backend):
        parts.append(loss)
    if backend == "flagembedding" and variant:
        parts.append(variant)
    return " ".join(p for p in parts if p) or backend


def run_arm(tag: str | None, run_name: str | None, params: Mapping[str, Any]) -> str:
    """The arm a run trained: its embft.arm tag, else the arm in its run name, else derived_arm."""
    return tag or arm_from_run_name(run_name) or derived_arm(params)


def distinct_settings(frame: pd.DataFrame, settings: list[str], by: str) -> list[str]:
    """The fewest settings (one or two, first in order) whose values tell every `by` group apart,
    e.g. [`train.loss`], so points can be labelled legibly; all of `settings` where none do."""
    n = frame[by].nunique()
    for size in (1, 2):
        for keep in itertools.combinations(settings, size):
            if (
                n > 1
                and len(frame.drop_duplicates([by, *keep])) == n
                and frame[list(keep)].drop_duplicates().shape[0] == n
            ):
                return list(keep)
    return settings


def arm_labels(runs: pd.DataFrame, settings: list[str], by: str = "configuration") -> dict[str, str]:
    """{configuration: display name}: its arm, and where several configurations share an arm, the
    fewest settings that tell them apart (`supcon, learning_rate=0.0003`). Always distinct."""
    runs = runs.assign(arm=runs["arm"].fillna("(no arm)")) if "arm" in runs else runs.assign(arm=runs[by])
    arm = runs.groupby(by, sort=False)["arm"].agg(lambda a: a.mode().iloc[0])
    labels = {}
    for name, configs in arm.groupby(arm, sort=False):
        if len(configs) == 1:
            labels[configs.index[0]] = str(name)
            continue
        sub = runs[runs[by].isin(configs.index)]
        varying = [k for k in settings if k in sub and sub[k].nunique() > 1]
        # The dataset first, then the settings with the shortest values: the label stays readable.
        varying.sort(key=lambda k: (k != DATA_PARAM, sub[k].astype(str).str.len().max()))
        keys = distinct_settings(sub, varying, by)
        for config, group in sub.groupby(by, sort=False):
            labels[config] = f"{name}, {config_label({k: group[k].iloc[0] for k in keys})}" if keys else str(name)
    if len(set(labels.values())) < len(labels):  # the last resort: the whole configuration
        labels = {c: f"{lab} ({c})" if list(labels.values()).count(lab) > 1 else lab for c, lab in labels.items()}
    return labels


def twins_of(runs: pd.DataFrame, by: str = "configuration") -> dict[str, str]:
    """{configuration: the configuration it took its training from}: every run of it took a twin's
    training (train.reuse_twin, embft.trained_as) and those twins are all runs of one other configuration,
    so its scores are that configuration's and its row would repeat it."""
    if "trained_as" not in runs or "run_id" not in runs:
        return {}
    config_of = dict(zip(runs["run_id"], runs[by]))
    out = {}
    for config, group in runs.groupby(by, sort=False):
        sources = {config_of.get(r) for r in group["trained_as"]}
        if len(sources) == 1 and None not in sources and sources != {config}:
            out[config] = sources.pop()
    return {c: t for c, t in out.items() if t not in out}  # never collapse onto a row that is collapsed itself


def with_twins(label: str, twins: list[str]) -> str:
    """`fe same (also fe same_nib, which took its training)`; of a twin's name, only what differs from `label`."""
    mine = set(label.split(", "))
    short = [", ".join(p for p in t.split(", ") if p not in mine) or t for t in twins]
    return label if not twins else f"{label} (also {', '.join(short)}, which took its training)"


def wrap(label: str, width: int = WRAP) -> str:
    """Lines of at most `width` characters, broken between words only (`batch_hard_triplet` stays whole)."""
    return "\n".join(textwrap.wrap(label, width, break_long_words=False, break_on_hyphens=False)) or label


def baseline_legend(label: str) -> str:
    """A baseline's legend entry by its dataset where it names one: its label lists every dataset setting
    (label names, hub revision, ...), which no legend can hold."""
    hit = re.search(r"\bdata=([^,)]+)", label)
    return f"baseline ({hit.group(1)})" if hit else label


# Offsets (points) tried for a point's label, nearest first: right, left, above, below, then diagonals,
# in growing rings; a label further out than the first ring gets a leader line to its point.
_DIRECTIONS = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)]
_DIRECTIONS += [(2, 1), (2, -1), (-2, 1), (-2, -1), (1, 2), (1, -2), (-1, 2), (-1, -2)]
_RINGS = (6, 16, 28, 42, 58, 78, 100, 126, 160, 200, 250)


def place_labels(
    ax, points: list[tuple[float, float]], texts: list[str], fontsize: float = 8, bars: list[tuple] | None = None
) -> bool:
    """Annotate each point with its text inside the axes where it overlaps no label placed before it, no
    point and no error bar (`bars`: each point's (x_low, x_high, y_low, y_high) in data units). All or none:
    where one label finds no such spot, none is left and False is returned, for the caller to name the points
    otherwise. Call after the figure's layout is final: offsets are screen distances. (matplotlib has no label
    placement of its own; adjustText is one more dependency for a dozen labels.)"""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    # every point's marker is an obstacle too, so no label covers another arm's point
    boxes = [Bbox.from_bounds(px - 5, py - 5, 10, 10) for px, py in ax.transData.transform(points)] if points else []
    for (x, y), (x_low, x_high, y_low, y_high) in zip(points, bars or []):  # each bar a thin box
        (left, low), (right, high) = ax.transData.transform([(x_low, y_low), (x_high, y_high)])
        ((px, py),) = ax.transData.transform([(x, y)])
        boxes += [Bbox([[left, py - 3], [right, py + 3]]), Bbox([[px - 3, low], [px + 3, high]])]
    placed = []
    for (x, y), text in zip(points, texts):
        for ring, (dx, dy) in itertools.product(_RINGS, _DIRECTIONS):
            ann = _annotate(ax, text, (x, y), (dx * ring, dy * ring), fontsize, leader=ring > _RINGS[0])
            box = ann.get_window_extent(renderer)
            if _within(box, inside) and not any(box.overlaps(b) for b in boxes):
                placed.append(ann)
                boxes.append(box)
                break
            ann.remove()
        else:
            for ann in placed:
                ann.remove()
            return False
    return True


def _annotate(ax, text, xy, offset, fontsize, leader):
    dx, dy = offset
    return ax.annotate(
        text,
        xy,
        xytext=offset,
        textcoords="offset points",
        ha="left" if dx > 0 else "right" if dx < 0 else "center",
        va="bottom" if dy > 0 else "top" if dy < 0 else "center",
        fontsize=fontsize,
        arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6} if leader else None,
    )


def _within(box, outer) -> bool:
    return box.x0 >= outer.x0 and box.y0 >= outer.y0 and box.x1 <= outer.x1 and box.y1 <= outer.y1
