"""The advise recommendation (experiment=advise): per arm, at its settings chosen on validation and trained
with seeds 1..S, the validation kNN score and the deployed classifiers (test beside, never chosen on), the
paired difference by seed of the best arm against every other arm and against the untrained model (95% t
interval), training seconds, the served classifier's speed where logged, the budget; and one sentence.

Written as advise.md, advise.png and advise.json; the sweeper logs them to the advise parent run."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from embft import names
from embft.report.datasets import outcome
from embft.report.summary import t_interval

MARKDOWN, IMAGE, DATA = "advise.md", "advise.png", "advise.json"
ACCURACIES = ("val", "test", "val_served", "test_served")  # summarize's keys of scores in [0, 1]
UNTRAINED = "untrained"  # train.backend of the reference arm that is the untrained model
SPEED_PREFIX = "serve_texts_per_second"


@dataclass
class Budget:
    data: str
    per_class: int
    trials_per_arm: int
    seeds: int
    arms: list[str]
    chosen: dict[str, str] = field(default_factory=dict)  # arm -> the overrides its search chose
    references: list[str] = field(default_factory=list)  # arms confirmed with no search (the untrained model)
    recipe_trial: bool = False  # each search's first trial was the arm's own recipe (advise.recipe_trial)


def search_words(budget: Budget) -> str:
    """How each arm's settings were searched, in words a report can quote."""
    first = ", the first at the arm's own recipe where its space allows" if budget.recipe_trial else ""
    return f"{budget.trials_per_arm} search trials per arm on validation{first} (pruned)"


@dataclass
class Result:
    sentence: str
    best_arm: Optional[str]
    markdown: Path
    files: list[Path]
    arms: pd.DataFrame  # one row per arm
    paired: pd.DataFrame  # best arm minus each other arm (and the untrained model), by seed


def load(client: Any, experiment_id: str, studies: dict[str, str]) -> pd.DataFrame:
    """One row per FINISHED confirmation run: arm, seed and its metrics (a seed's newest run where a
    force=true rerun left two)."""
    rows = []
    for arm, study in studies.items():
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{names.OPTUNA_STUDY}` = '{study}' and attributes.status = 'FINISHED'",
            max_results=1000,
        )
        for run in sorted(found, key=lambda r: r.info.start_time):
            if run.data.tags.get(names.ROLE) != names.ROLE_FINETUNE:
                continue
            rows.append(
                {
                    "arm": arm,
                    "seed": run.data.params.get("train.seed"),
                    "backend": run.data.params.get("train.backend"),
                    "run_id": run.info.run_id,
                    **run.data.metrics,
                }
            )
    frame = pd.DataFrame(rows)
    return frame.drop_duplicates(["arm", "seed"], keep="last").reset_index(drop=True) if len(frame) else frame


def _col(frame: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(frame[name], errors="coerce") if name in frame else pd.Series(np.nan, frame.index)


def _interval(values: pd.Series) -> tuple[float, float, float]:
    low, high = t_interval(values)
    return float(values.mean()) if len(values) else math.nan, low, high


def summarize(runs: pd.DataFrame, metric: str, classifier: str) -> pd.DataFrame:
    """Per arm: means with 95% t intervals over seeds (an accuracy's clipped to [0, 1]); sorted by the
    validation score (the choice)."""
    test_metric = metric.removeprefix(names.VALIDATION_PREFIX)
    columns = {
        "val": metric,
        "test": test_metric,
        "val_served": names.validation(names.served_accuracy(classifier)),
        "test_served": names.served_accuracy(classifier),
        "val_delta": names.delta(metric),
        "train_seconds": names.TRAIN_SECONDS,
        "labelled_texts": names.TRAIN_LABELLED_TEXTS,
    }
    speeds = sorted({c for c in runs.columns if c.startswith(SPEED_PREFIX)})
    rows = []
    for arm, group in runs.groupby("arm", sort=False):
        row: dict[str, Any] = {"arm": arm, "n_seeds": len(group)}
        for key, name in columns.items():
            mean, low, high = _interval(_col(group, name).dropna())
            if key in ACCURACIES:  # a t interval over 3 seeds can pass 1: an accuracy cannot
                low, high = max(low, 0.0), min(high, 1.0)
            row.update({key: mean, f"{key}_low": low, f"{key}_high": high})
        for name in speeds:
            row[name] = float(_col(group, name).mean())
        row["baseline_val"] = float((_col(group, metric) - _col(group, names.delta(metric))).mean())
        row["baseline_test"] = float((_col(group, test_metric) - _col(group, names.delta(test_metric))).mean())
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return table.sort_values("val", ascending=False, kind="stable", na_position="last").reset_index(drop=True)


def paired(runs: pd.DataFrame, best: str, metric: str) -> pd.DataFrame:
    """`best`'s validation score minus each other arm's, paired by training seed (the seeds both ran), and
    minus the untrained model's (its delta): mean, 95% t interval, outcome, training-time ratio."""
    by_seed = runs.assign(_v=_col(runs, metric), _s=_col(runs, names.TRAIN_SECONDS))
    mine = by_seed[by_seed["arm"] == best].set_index("seed")
    rows = []
    # The untrained model is compared once, by the delta row below; an arm that is it repeats that row.
    the_untrained = set(by_seed.loc[by_seed["backend"] == UNTRAINED, "arm"]) if "backend" in by_seed else set()
    for arm in [a for a in by_seed["arm"].unique() if a != best and a not in the_untrained]:
        other = by_seed[by_seed["arm"] == arm].set_index("seed")
        diff = (mine["_v"] - other["_v"]).dropna()
        mean, low, high = _interval(diff)
        ratio = float(mine["_s"].mean() / other["_s"].mean()) if other["_s"].mean() else math.nan
        rows.append({"versus": arm, "n_seeds": len(diff), "mean": mean, "low": low, "high": high, "time_ratio": ratio})
    delta = _col(mine.reset_index(), names.delta(metric)).dropna()
    mean, low, high = _interval(delta)
    rows.append({"versus": "untrained model", "n_seeds": len(delta), "mean": mean, "low": low, "high": high})
    table = pd.DataFrame(rows)
    table["outcome"] = [outcome(lo, hi) for lo, hi in zip(table["low"], table["high"])]
    return table


def _points(mean: float, low: float, high: float) -> str:
    if math.isnan(mean):
        return "n/a"
    text = f"{100 * mean:+.1f}"
    return text + ("" if math.isnan(low) else f" [{100 * low:+.1f}, {100 * high:+.1f}]")


def sentence(budget: Budget, best: Optional[str], pairs: pd.DataFrame) -> str:
    if best is None:
        return f"For {budget.data} at {budget.per_class} per class: no arm finished its confirmation runs; no advice."
    others = pairs[pairs["versus"] != "untrained model"]
    untrained = pairs[pairs["versus"] == "untrained model"].iloc[0]
    if others.empty:
        return (
            f"For this data ({budget.data}) at {budget.per_class} per class, use {best}: "
            f"{_points(untrained['mean'], untrained['low'], untrained['high'])} points over the untrained model "
            "(validation, paired by seed, 95% interval)."
        )
    runner = others.sort_values("mean").iloc[0]  # the closest arm: the difference that matters most
    if best in budget.references:
        return (
            f"For this data ({budget.data}) at {budget.per_class} per class, no fine-tuning beat {best}: it leads "
            f"{runner['versus']} by {_points(runner['mean'], runner['low'], runner['high'])} points (validation kNN, "
            "paired by seed, 95% interval)."
        )
    ratio = runner["time_ratio"]
    cost = "while it trains none" if not math.isfinite(ratio) else f"at {ratio:.2g} times its training time"
    return (
        f"For this data ({budget.data}) at {budget.per_class} per class, use {best}: "
        f"{_points(runner['mean'], runner['low'], runner['high'])} points over {runner['versus']}, {cost} "
        f"({_points(untrained['mean'], untrained['low'], untrained['high'])} "
        "over the untrained model; validation kNN, paired by seed, 95% interval)"
        + (
            f"; the interval spans 0: {best} is not clearly better than {runner['versus']} at {budget.seeds} seeds."
            if runner["outcome"] != "win"
            else "."
        )
    )


def _fmt(value: Any, digits: int = 4) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _markdown(budget: Budget, table: pd.DataFrame, pairs: pd.DataFrame, text: str, metric: str, classifier: str) -> str:
    speeds = [c for c in table.columns if c.startswith(SPEED_PREFIX)]
    lines = [
        f"# Advise: {budget.data} at {budget.per_class} labelled texts per class",
        "",
        f"**{text}**",
        "",
        f"Budget: {budget.per_class} texts of every class (strict: every arm, its served classifier's support set "
        f"included, read only those labels); {search_words(budget)}, "
        f"then the chosen settings trained with seeds 1..{budget.seeds}. Chosen on `{metric}` (validation); test "
        "beside it, never chosen on. Intervals: 95% t over the seeds, an accuracy's clipped to [0, 1].",
        "",
        f"| arm | seeds | val kNN | val deployed ({classifier}) | test kNN | test deployed | train s | labelled texts"
        + "".join(f" | {s}" for s in speeds)
        + " |",
        "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(speeds),
    ]
    for _, r in table.iterrows():
        cells = [
            f"`{r['arm']}`",
            str(int(r["n_seeds"])),
            _interval_text(r, "val"),
            _interval_text(r, "val_served"),
            _interval_text(r, "test"),
            _interval_text(r, "test_served"),
            _fmt(r["train_seconds"], 1),
            _fmt(r["labelled_texts"], 0),
            *[_fmt(r[s], 1) for s in speeds],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if len(table):
        lines += [
            "",
            f"Untrained model: validation {_fmt(table['baseline_val'].iloc[0])}, test {_fmt(table['baseline_test'].iloc[0])}.",
        ]
    if len(pairs):
        lines += [
            "",
            f"## `{table['arm'].iloc[0]}` against the others (validation kNN, paired by seed, points)",
            "",
            "| versus | seeds | difference [95% interval] | outcome | training-time ratio |",
            "|---|---:|---:|---|---:|",
        ]
        for _, p in pairs.iterrows():
            ratio = p.get("time_ratio", math.nan)
            lines.append(
                f"| {p['versus']} | {int(p['n_seeds'])} | {_points(p['mean'], p['low'], p['high'])} | {p['outcome']} | "
                f"{_fmt(ratio, 2)} |"
            )
    lines += ["", "## Chosen settings (search on validation)", ""]
    lines += [f"- `{arm}`: `{o}`" for arm, o in budget.chosen.items() if arm not in budget.references] or ["- none"]
    lines += [f"- `{arm}`: reference, no search" for arm in budget.references]
    missing = [a for a in [*budget.arms, *budget.references] if a not in set(table["arm"] if len(table) else [])]
    if missing:
        lines += ["", f"Not confirmed (no completed trial or no finished seed): {', '.join(missing)}."]
    lines += ["", f"![accuracy by arm]({IMAGE})", ""]
    return "\n".join(lines)


def _interval_text(row: pd.Series, key: str) -> str:
    mean, low, high = row[key], row[f"{key}_low"], row[f"{key}_high"]
    if isinstance(mean, float) and math.isnan(mean):
        return ""
    return f"{mean:.4f}" + ("" if math.isnan(low) else f" [{low:.4f}, {high:.4f}]")


def _plot(table: pd.DataFrame, budget: Budget, path: Path, classifier: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.6 * max(len(table), 2) + 1.5))
    y = np.arange(len(table))
    for offset, key, label in (
        (-0.18, "val", "validation kNN"),
        (0.18, "val_served", f"validation deployed ({classifier})"),
    ):
        mean = table[key].to_numpy(dtype=float)
        err = np.vstack(
            [mean - table[f"{key}_low"].to_numpy(dtype=float), table[f"{key}_high"].to_numpy(dtype=float) - mean]
        )
        ax.barh(y + offset, mean, height=0.34, xerr=np.nan_to_num(err), label=label, capsize=3)
    if len(table):
        ax.axvline(float(table["baseline_val"].iloc[0]), color="k", ls="--", lw=1, label="untrained (validation kNN)")
    ax.set_xlim(0, 1)  # accuracy; a t interval over 2-3 seeds can pass its bounds
    ax.set_yticks(y, table["arm"])
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (mean over seeds, 95% t interval)")
    ax.set_title(f"{budget.data}, {budget.per_class} labelled texts per class")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(runs: pd.DataFrame, budget: Budget, out_dir: Path, metric: str, classifier: str = "logreg") -> Result:
    """advise.md, advise.png and advise.json under out_dir; the recommendation."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = summarize(runs, metric, classifier) if len(runs) else pd.DataFrame()
    best = None if table.empty or table["val"].isna().all() else str(table["arm"].iloc[0])
    pairs = paired(runs, best, metric) if best else pd.DataFrame()
    text = sentence(budget, best, pairs)
    md = out_dir / MARKDOWN
    md.write_text(_markdown(budget, table, pairs, text, metric, classifier))
    files = [md]
    if len(table):
        files.append(_plot(table, budget, out_dir / IMAGE, classifier))
    data = {
        "sentence": text,
        "best_arm": best,
        "budget": asdict(budget),
        "arms": json.loads(table.to_json(orient="records")) if len(table) else [],
        "paired": json.loads(pairs.to_json(orient="records")) if len(pairs) else [],
    }
    (out_dir / DATA).write_text(json.dumps(data, indent=2))
    files.append(out_dir / DATA)
    return Result(text, best, md, files, table, pairs)
