"""The report of a study across datasets: a matrix of configurations x datasets, each cell the delta
against that dataset's own untrained baseline with its interval over seeds, a win/tie/lose summary
per configuration, whether the study's conclusion holds on every dataset, and a heatmap.

A study is cross-dataset when its runs have more than one `data.name`. Settings that only follow the
dataset (its folder, columns, label names) are the dataset's, not a configuration's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from embft import names
from embft.report.labels import wrap
from embft.report.rendering import display, format_table, save
from embft.report.summary import DATA_PARAM, StudyInfo, config_label, t_interval

IMAGE = "report_datasets.png"
OUTCOMES = ("win", "tie", "loss")


@dataclass
class DatasetMatrix:
    metric: str  # the test score; cells are deltas of val_<metric> with the test delta beside
    datasets: list[str]
    settings: list[str]  # the configuration axes: varying settings other than the dataset's own
    cells: pd.DataFrame  # one row per (configuration, dataset), see _cell
    summary: pd.DataFrame  # one row per configuration, best mean validation delta first
    baselines: dict[str, tuple[float, float]]  # dataset -> untrained (validation, test) score
    conclusion: str
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)  # the used runs, with their `configuration`


def is_cross_dataset(info: StudyInfo) -> bool:
    return not info.runs.empty and info.runs["dataset"].nunique() > 1


def _follows_dataset(runs: pd.DataFrame, key: str) -> bool:
    """One value per dataset: a setting of the dataset (its folder, label names), not an axis."""
    return bool((runs.groupby("dataset")[key].nunique() <= 1).all())


def outcome(low: float, high: float) -> str:
    """win: the interval lies above 0; loss: below 0; tie: it spans 0, or there is none (one seed)."""
    if low > 0:
        return "win"
    if high < 0:
        return "loss"
    return "tie"


def _cell(group: pd.DataFrame) -> dict:
    val_low, val_high = t_interval(group["val_delta"])
    low, high = t_interval(group["delta"])
    return {
        "n_seeds": len(group),
        "val_delta_mean": group["val_delta"].mean(),
        "val_delta_ci95_low": val_low,
        "val_delta_ci95_high": val_high,
        "delta_mean": group["delta"].mean(),
        "delta_ci95_low": low,
        "delta_ci95_high": high,
        "outcome": outcome(val_low, val_high),
    }


def dataset_matrix(info: StudyInfo, compare: tuple[str, str] | None = None) -> DatasetMatrix:
    """The matrix of a cross-dataset study; `compare` (two configuration labels) names the
    comparison the conclusion checks, else it checks the best configuration on validation."""
    runs = info.runs
    settings = [s for s in info.settings if s != DATA_PARAM and not _follows_dataset(runs, s)]
    runs = runs.assign(configuration=[config_label(dict(zip(settings, v))) for v in runs[settings].values])
    datasets = sorted(runs["dataset"].unique())
    cells = pd.DataFrame(
        [
            {"configuration": label, "dataset": data, **_cell(group)}
            for (label, data), group in runs.groupby(["configuration", "dataset"], sort=False)
        ]
    )
    rows = []
    for label, group in cells.groupby("configuration", sort=False):
        counts = group["outcome"].value_counts()
        rows.append(
            {
                "configuration": label,
                "n_datasets": len(group),
                "val_delta_mean": group["val_delta_mean"].mean(),
                "delta_mean": group["delta_mean"].mean(),
                **{o: int(counts.get(o, 0)) for o in OUTCOMES},
            }
        )
    summary = pd.DataFrame(rows).sort_values("val_delta_mean", ascending=False, kind="stable", na_position="last")
    summary = summary.reset_index(drop=True)
    baselines = {
        data: (float((g["val_accuracy"] - g["val_delta"]).mean()), float((g["accuracy"] - g["delta"]).mean()))
        for data, g in runs.groupby("dataset")
    }
    matrix = DatasetMatrix(info.metric, datasets, settings, cells, summary, baselines, "", runs)
    matrix.conclusion = _compare_sentence(matrix, *compare) if compare else _best_sentence(matrix)
    return matrix


def _value(matrix: DatasetMatrix, label: str, data: str, column: str = "val_delta_mean") -> float:
    hit = matrix.cells[(matrix.cells["configuration"] == label) & (matrix.cells["dataset"] == data)]
    return float(hit[column].iloc[0]) if len(hit) else math.nan


def _best_sentence(matrix: DatasetMatrix) -> str:
    """Whether the configuration with the best mean validation delta is the best on each dataset
    (a tie for the best counts as best: twins have the same scores)."""
    summary = matrix.summary
    complete = summary[summary["n_datasets"] == len(matrix.datasets)]
    pool = complete if len(complete) else summary
    if pool["val_delta_mean"].isna().all():
        return "No conclusion: no run has a validation score, and choices are made on validation."
    best = str(pool.iloc[0]["configuration"])
    text = (
        f"The best configuration on validation, `{best}` (mean delta {pool.iloc[0]['val_delta_mean']:+.4f} "
        f"over {len(matrix.datasets)} datasets), "
    )
    misses = []
    for data in matrix.datasets:
        here = matrix.cells[matrix.cells["dataset"] == data]
        top = here.loc[here["val_delta_mean"].idxmax()] if here["val_delta_mean"].notna().any() else None
        mine = _value(matrix, best, data)
        if top is not None and not mine >= float(top["val_delta_mean"]) - 1e-12:
            misses.append(f"{data} (`{top['configuration']}` {top['val_delta_mean']:+.4f} vs {mine:+.4f})")
    if not misses:
        return text + "is also the best on every dataset: the conclusion holds on each."
    held = len(matrix.datasets) - len(misses)
    return text + f"is the best on {held} of {len(matrix.datasets)} datasets: not on " + ", ".join(misses) + "."


def paired_differences(matrix: DatasetMatrix, first: str, second: str) -> pd.DataFrame:
    """Per dataset, `first`'s validation score minus `second`'s, paired by training seed (the seeds
    both ran): mean, 95% t interval and outcome. Pairing removes what a seed does to both sides."""
    rows = []
    for data in matrix.datasets:
        here = matrix.runs[matrix.runs["dataset"] == data]
        a, b = (here[here["configuration"] == c].groupby("seed")["val_accuracy"].mean() for c in (first, second))
        diff = (a - b).dropna()
        low, high = t_interval(diff)
        rows.append(
            {
                "dataset": data,
                "n_seeds": len(diff),
                "mean": diff.mean() if len(diff) else math.nan,
                "ci95_low": low,
                "ci95_high": high,
                "outcome": outcome(low, high),
            }
        )
    return pd.DataFrame(rows)


def _compare_sentence(matrix: DatasetMatrix, first: str, second: str) -> str:
    """Whether `first` has the higher mean validation delta than `second` on each dataset, and by how
    much, paired by seed."""
    known = set(matrix.cells["configuration"])
    for label in (first, second):
        if label not in known:
            return f"No comparison: no configuration `{label}` (configurations: {', '.join(sorted(known))})."
    n = len(matrix.datasets)
    lost = [d for d in matrix.datasets if not _value(matrix, first, d) > _value(matrix, second, d)]
    paired = paired_differences(matrix, first, second)
    unsure = [r.dataset for r in paired.itertuples() if r.outcome != "win"]
    text = f"`{first}` beats `{second}` on validation "
    if not lost and not unsure:
        text += f"on every dataset ({n}), each paired interval above 0: the conclusion holds on each."
    elif not lost:
        text += (
            f"on mean on every dataset ({n}), but the paired interval spans or lies below 0 on "
            + ", ".join(unsure)
            + ": the conclusion holds there only as a trend."
        )
    else:
        text += f"on {n - len(lost)} of {n} datasets: not on " + ", ".join(lost) + "."
    pairs = "; ".join(
        f"{r.dataset} {_interval(r.mean, r.ci95_low, r.ci95_high)} {r.outcome}" for r in paired.itertuples()
    )
    return text + f" Paired by seed, validation difference (95% interval, outcome): {pairs}."


def _interval(mean: float, low: float, high: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:+.4f}" + ("" if math.isnan(low) else f" [{low:+.4f}, {high:+.4f}]")


def format_matrix(matrix: DatasetMatrix) -> str:
    """The matrix as a markdown table: configurations by mean validation delta, datasets as columns."""
    header = ["configuration", *matrix.datasets, "mean val delta", "wins / ties / losses", "mean test delta"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for _, row in matrix.summary.iterrows():
        cells = [f"`{row['configuration']}`"]
        for data in matrix.datasets:
            hit = matrix.cells[
                (matrix.cells["configuration"] == row["configuration"]) & (matrix.cells["dataset"] == data)
            ]
            if hit.empty:
                cells.append("-")
                continue
            c = hit.iloc[0]
            val = _interval(c["val_delta_mean"], c["val_delta_ci95_low"], c["val_delta_ci95_high"])
            test = "n/a" if math.isnan(c["delta_mean"]) else f"{c['delta_mean']:+.4f}"
            cells.append(f"{val}; test {test}")
        cells += [
            "n/a" if math.isnan(row["val_delta_mean"]) else f"{row['val_delta_mean']:+.4f}",
            f"{row['win']} / {row['tie']} / {row['loss']}",
            "n/a" if math.isnan(row["delta_mean"]) else f"{row['delta_mean']:+.4f}",
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    untrained = [f"{v:.4f} / {t:.4f}" for v, t in (matrix.baselines[d] for d in matrix.datasets)]
    lines.append("| untrained (validation / test) | " + " | ".join(untrained) + " |  |  |  |")
    return "\n".join(lines)


def markdown(matrix: DatasetMatrix, table: pd.DataFrame, info: StudyInfo, image: str = IMAGE) -> str:
    """The cross-dataset section: matrix, conclusion, heatmap, then today's table per dataset."""
    val = names.validation(matrix.metric)
    parts = [
        "## Across datasets",
        "",
        f"Each cell: the delta of `{val}` against that dataset's own untrained model, mean over seeds with "
        "its 95% t interval, and the test delta (`" + names.delta(matrix.metric) + "`) after it. "
        "wins / ties / losses count the datasets whose validation interval lies above 0 / spans 0 (or "
        "there is one seed) / lies below 0. Configurations: "
        + (", ".join(f"`{s}`" for s in matrix.settings) or "one")
        + ".",
        "",
        format_matrix(matrix),
        "",
        f"**Conclusion:** {matrix.conclusion}",
        "",
        f"![validation delta per configuration and dataset]({image})",
    ]
    if DATA_PARAM not in table:  # runs naming their dataset by tag only: one table, as logged
        return "\n".join([*parts, "", "### All runs", "", format_table(table, info.settings, info.baselines)]) + "\n"
    for data in matrix.datasets:
        rows = table[table[DATA_PARAM] == data]
        if len(rows):
            parts += ["", f"### {data}", "", format_table(rows, matrix.settings, info.baselines)]
    return "\n".join(parts) + "\n"


def heatmap_figure(matrix: DatasetMatrix, name: str):
    """Heatmap of validation deltas (red below 0, blue above), interval and test delta in each cell; rows
    named by their arm, a twin row (its runs took another row's training: the same scores) shown once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs, shown = display(matrix.runs, matrix.settings, list(matrix.summary["configuration"]))
    labels = [wrap(shown[c]) for c in configs]
    grid = np.array([[_value(matrix, c, d) for d in matrix.datasets] for c in configs])
    limit = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    limit = limit or 1.0
    longest = max((len(line) for lab in labels for line in lab.split("\n")), default=0)
    lines = max((lab.count("\n") + 1 for lab in labels), default=1)
    width = 2.3 * len(matrix.datasets) + 3.0 + 0.075 * longest  # the row labels' own width beside the cells
    fig, ax = plt.subplots(figsize=(max(6.0, width), max(3.0, max(0.9, 0.2 * lines) * len(labels) + 1.8)))
    image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    for i, label in enumerate(configs):
        for j, data in enumerate(matrix.datasets):
            if math.isnan(grid[i, j]):
                continue
            low, high = (
                _value(matrix, label, data, "val_delta_ci95_low"),
                _value(matrix, label, data, "val_delta_ci95_high"),
            )
            test = _value(matrix, label, data, "delta_mean")
            text = f"{grid[i, j]:+.3f} ({outcome(low, high)})\n"
            text += "" if math.isnan(low) else f"[{low:+.3f}, {high:+.3f}]\n"
            text += f"test {test:+.3f}"
            dark = abs(grid[i, j]) > 0.6 * limit  # white text where the colour is deep
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(matrix.datasets)), matrix.datasets)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title(wrap(f"{name}: delta of {names.validation(matrix.metric)} vs each dataset's untrained model", 70))
    fig.colorbar(image, ax=ax, label="validation delta (mean over seeds)")
    fig.tight_layout()
    return fig


def plot(matrix: DatasetMatrix, name: str, path: Path) -> Path:
    return save(heatmap_figure(matrix, name), path)
