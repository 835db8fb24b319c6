"""experiment=label_budget over all of its cells: which arm wins at which budget on which dataset, and by how much.

Read from the cells' recommendations (`<folder>/<data>_<N>/advise.json`, written by the advise sweeper from
the MLflow runs) and written beside them as report.md and accuracy_vs_per_class.png:

    python -m embft.report.label_budget [experiments/label_budget]

Every arm of a cell was chosen on validation; the plot and the table show test, never chosen on. The deployed
classifier (a logistic regression over the arm's embeddings, fitted on the cell's N labelled texts of every
class) is what a user of the arm serves; the untrained model's row is the same classifier over the base model."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from embft.report.advise import DATA as CELL_FILE
from embft.report.advise import Budget, search_words

MARKDOWN, IMAGE = "report.md", "accuracy_vs_per_class.png"


def load_cells(folder: Path) -> pd.DataFrame:
    """One row per (dataset, per_class, arm) of every cell under `folder`; the cell's recommended arm flagged."""
    rows: list[dict[str, Any]] = []
    for path in sorted(folder.glob(f"*/{CELL_FILE}")):
        cell = json.loads(path.read_text())
        budget = cell["budget"]
        known = Budget(**{k: v for k, v in budget.items() if k in Budget.__dataclass_fields__})
        searched = f"{search_words(known)}, then seeds 1..{known.seeds}." + "".join(
            f" {arm}: `{_short(chosen)}`."
            for arm, chosen in known.chosen.items()
            if chosen and arm not in known.references
        )
        for arm in cell["arms"]:
            rows.append(
                {
                    "data": budget["data"],
                    "per_class": int(budget["per_class"]),
                    "cell": path.parent.name,
                    "recommended": arm["arm"] == cell.get("best_arm"),
                    "sentence": cell.get("sentence", ""),
                    "searched": searched,
                    "paired": cell.get("paired", []),
                    **arm,
                }
            )
    return pd.DataFrame(rows)


def _short(overrides: str) -> str:
    """Searched floats at 3 significant digits (the exact values are in the cell's advise.md)."""
    return re.sub(r"\d+\.\d{4,}(?:e-?\d+)?", lambda m: f"{float(m.group()):.3g}", overrides)


def _fmt(mean: Any, low: Any = math.nan, high: Any = math.nan) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    text = f"{100 * mean:.1f}"
    if low is None or high is None or math.isnan(low):
        return text
    return f"{text} [{100 * low:.1f}, {100 * high:.1f}]"


def _points(pair: dict[str, Any]) -> str:
    return f"{100 * pair['mean']:+.1f} [{100 * pair['low']:+.1f}, {100 * pair['high']:+.1f}]"


def at_a_glance(cells: pd.DataFrame) -> list[str]:
    """One line per cell: the recommended arm against the runner-up (the next arm by validation kNN) and the
    untrained model, paired by seed, as the cell's advise step measured them."""
    lines = [
        "| dataset | per class | recommended | runner-up | difference (val kNN points) | outcome "
        "| training time vs runner-up | over the untrained model |",
        "|---|---:|---|---|---:|---|---:|---:|",
    ]
    for (data, per_class), cell in cells.groupby(["data", "per_class"], sort=True):
        best = cell[cell["recommended"]]
        pairs = {pair["versus"]: pair for pair in cell["paired"].iloc[0]}
        others = cell[~cell["recommended"] & cell["arm"].isin(list(pairs))].sort_values("val", ascending=False)
        runner = pairs[others["arm"].iloc[0]] if len(others) else None
        untrained = pairs.get("untrained model")
        ratio = runner.get("time_ratio") if runner else None
        lines.append(
            f"| {data} | {per_class} | {best['arm'].iloc[0] if len(best) else ''} "
            f"| {runner['versus'] if runner else ''} | {_points(runner) if runner else ''} "
            f"| {runner['outcome'] if runner else ''} | {f'{ratio:.0f}x' if ratio else ''} "
            f"| {_points(untrained) if untrained else ''} |"
        )
    return lines


def markdown(cells: pd.DataFrame, classifier: str = "logreg") -> str:
    lines = [
        "# Label budgets: which arm wins at which budget on which dataset",
        "",
        "Per dataset and budget (labelled texts of every class, strict for every arm): each arm's settings searched",
        "on validation, then trained with seeds 1..S; test accuracy (%) with its 95% t interval over the seeds (clipped to 0-100).",
        f"Deployed = the served classifier ({classifier} over the arm's embeddings, fitted on the same texts).",
        "The recommended arm (**bold**) is chosen on validation kNN, never on test.",
        "",
        "At a glance: the recommended arm against the next arm by validation kNN and against the untrained model",
        "(paired by seed, 95% interval; a tie when the interval spans 0).",
        "",
        *at_a_glance(cells),
        "",
    ]
    for (data, per_class), cell in cells.groupby(["data", "per_class"], sort=True):
        lines += [
            f"## {data}, {per_class} per class",
            "",
            f"{cell['sentence'].iloc[0]}",
            "",
            f"Settings: {cell['searched'].iloc[0]}",
            "",
            "| arm | seeds | test deployed | test kNN | val kNN | train s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for _, r in cell.sort_values("val", ascending=False, na_position="last").iterrows():
            name = f"**{r['arm']}**" if r["recommended"] else r["arm"]
            lines.append(
                f"| {name} | {int(r['n_seeds'])} | {_fmt(r['test_served'], r['test_served_low'], r['test_served_high'])} "
                f"| {_fmt(r['test'], r['test_low'], r['test_high'])} | {_fmt(r['val'])} | {r['train_seconds']:.0f} |"
            )
        lines += ["", f"Untrained model, kNN: test {_fmt(cell['baseline_test'].iloc[0])}.", ""]
    lines += [f"![test accuracy against labelled texts per class]({IMAGE})", ""]
    return "\n".join(lines)


def plot(cells: pd.DataFrame, path: Path, classifier: str = "logreg") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(cells["data"].unique())
    # wide enough for the title and the legend below when one dataset has finished
    fig, axes = plt.subplots(1, len(datasets), figsize=(max(4.2 * len(datasets), 9), 4.6), squeeze=False)
    arms = sorted(cells["arm"].unique())
    colours = {arm: plt.get_cmap("tab10")(i % 10) for i, arm in enumerate(arms)}
    for ax, data in zip(axes[0], datasets):
        mine = cells[cells["data"] == data]
        for arm in arms:
            line = mine[mine["arm"] == arm].sort_values("per_class")
            if line.empty:
                continue
            mean = line["test_served"].to_numpy(dtype=float)
            err = np.vstack(
                [
                    mean - line["test_served_low"].to_numpy(dtype=float),
                    line["test_served_high"].to_numpy(dtype=float) - mean,
                ]
            )
            # each arm a little to the side of the budget (log axis: a factor), so no bar hides another
            nudge = 2 ** (0.05 * (arms.index(arm) - (len(arms) - 1) / 2))
            ax.errorbar(
                line["per_class"].to_numpy(dtype=float) * nudge,
                100 * mean,
                yerr=100 * np.nan_to_num(err),
                label=arm,
                color=colours[arm],
                marker="o",
                capsize=3,
                ls="--" if arm == "untrained" else "-",
            )
        ax.set_xscale("log", base=2)
        ticks = sorted(mine["per_class"].unique())
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("labelled texts per class")
        ax.set_title(data)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"test accuracy, deployed {classifier} (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False)
    fig.suptitle("Each arm at its settings chosen on validation; 95% intervals over training seeds")
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=120, bbox_inches="tight")  # a legend wider than planned widens it, never clipped
    plt.close(fig)
    return path


def write(folder: Path, classifier: str = "logreg") -> Optional[Path]:
    """report.md and the plot under `folder` from its cells; None when no cell has finished."""
    cells = load_cells(folder)
    if cells.empty:
        return None
    (folder / MARKDOWN).write_text(markdown(cells, classifier))
    plot(cells, folder / IMAGE, classifier)
    return folder / MARKDOWN


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embft.report.label_budget", description=__doc__.split("\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, default=Path("experiments/label_budget"))
    args = parser.parse_args(argv)
    written = write(args.folder)
    print(written or f"no {CELL_FILE} under {args.folder}/*/")
    return 0 if written else 1


if __name__ == "__main__":
    raise SystemExit(main())
