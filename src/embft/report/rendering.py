"""A study summary written out: the markdown report and its plot."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embft import names
from embft.report.labels import arm_labels, baseline_legend, place_labels, twins_of, with_twins, wrap
from embft.report.summary import (
    EXTRA_SCORES,
    LABELLED_TEXTS,
    PATH_VALUE,
    StudyInfo,
    config_label,
    ranked_line,
    seeds_text,
    t_interval,
    used_sentence,
)

SECONDS_IMAGE = "accuracy_vs_train_seconds.png"
SERVING_IMAGE = "accuracy_vs_serve_texts_per_second.png"  # the serving axis: serve_texts_per_second_1
# The x axes of the accuracy plots: run column -> (axis label, what the figure's title calls it)
X_AXES = {
    "train_seconds": ("train_seconds (mean over seeds; bars: the seeds' range)", "training time"),
    "serve_texts_per_second_1": (
        "served texts per second, one text a call (mean over seeds; bars: the seeds' range)",
        "serving speed",
    ),
}
# Column headers of the scores some trainers log (summary.EXTRA_SCORES).
EXTRA_HEADERS = {
    "val_served_accuracy_knn": "validation served kNN",
    "served_accuracy_knn": "test served kNN",
    "val_served_accuracy_logreg": "validation served logreg",
    "served_accuracy_logreg": "test served logreg",
    "val_setfit_head_accuracy": "validation SetFit head",
    "setfit_head_accuracy": "test SetFit head",
    "val_served_fp32_accuracy_knn": "validation served kNN, torch fp32",
    "serve_texts_per_second_1": "served texts/s, 1 a call",
    "serve_texts_per_second_64": "served texts/s, 64 a call",
}


def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _with_interval(r: pd.Series, score: str) -> str:
    mean, low = r[f"{score}_mean"], r[f"{score}_ci95_low"]
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.4f}" + ("" if math.isnan(low) else f" [{low:.4f}, {r[f'{score}_ci95_high']:.4f}]")


def format_table(table: pd.DataFrame, settings: list[str], baselines=()) -> str:
    """The summary table as a markdown pipe table; rows labelled in `baselines` get no deltas, rows
    without a validation score no rank (a rank would be a choice made on test). The scores of
    summary.EXTRA_SCORES and the labelled texts read are columns where the table has them."""
    extra = [m for m in EXTRA_SCORES if f"{m}_mean" in table]
    texts = f"{LABELLED_TEXTS}_mean" in table
    header = [
        "rank",
        *settings,
        "n seeds",
        "validation mean",
        "test accuracy mean",
        "accuracy std (seeds)",
        "MTEB std (mean)",
        "delta vs baseline",
        "delta 95% CI",
        "train min",
        *(["labelled texts"] if texts else []),
        "train q/s",
        *(EXTRA_HEADERS[m] for m in extra),
    ]
    align = ["---"] * (1 + len(settings)) + ["---:"] * (len(header) - 1 - len(settings))
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    rank = 0
    for _, r in table.iterrows():
        baseline = r["configuration"] in baselines
        ranked = not baseline and not math.isnan(r["val_accuracy_mean"])
        rank += ranked
        if baseline:
            ci = ""
        elif r["n_seeds"] < 2 or math.isnan(r["delta_ci95_low"]):
            ci = "n/a"
        else:
            ci = f"[{r['delta_ci95_low']:+.4f}, {r['delta_ci95_high']:+.4f}]"
        delta = "n/a" if math.isnan(r["delta_mean"]) else f"{r['delta_mean']:+.4f}"
        cells = [
            f"**{r['configuration']}**" if baseline else (str(rank) if ranked else "-"),
            *(str(r[k]) for k in settings),
            str(r["n_seeds"]) if not baseline or r["n_seeds"] else "(logged)",
            _fmt(r["val_accuracy_mean"], 4),
            _fmt(r["accuracy_mean"], 4),
            "" if baseline else _fmt(r["accuracy_std_seeds"], 4),
            _fmt(r["mteb_std_mean"], 4),
            "" if baseline else delta,
            ci,
            "" if baseline else _fmt(r["train_minutes"], 2),
            *([("" if baseline else _fmt(r[f"{LABELLED_TEXTS}_mean"], 0))] if texts else []),
            "" if baseline else _fmt(r["train_qps"], 2),
            *("" if baseline else _with_interval(r, m) for m in extra),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def fixed_block(fixed_settings: dict[str, str]) -> str:
    """The settings every run shares as a table a person can scan, collapsed: there are ~60."""
    shown = {k: v for k, v in fixed_settings.items() if not PATH_VALUE.match(str(v))}  # per-machine folders
    if not shown:
        return "- Fixed settings: none\n"
    rows = "".join("| `" + k + "` | " + str(v).replace("|", "\\|") + " |\n" for k, v in shown.items())
    return (
        f"\n<details><summary>Fixed settings ({len(shown)})</summary>\n\n"
        f"| setting | value |\n| --- | --- |\n{rows}\n</details>\n"
    )


def write_markdown(
    table: pd.DataFrame,
    info: StudyInfo,
    name: str,
    path: Path,
    image: str = "report.png",
    body: str | None = None,
    seconds_image: str | None = None,
) -> Path:
    """Write the report: what/when, used/skipped runs, table (or `body`: the cross-dataset section),
    interval note, plot links."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    when = f"{info.first_start} to {info.last_start}" if info.first_start else "unknown"
    baseline_note = {
        "runs": "the baseline runs (untrained model) with the same `embft.baseline_key`",
        "metric": f"the `{names.baseline(info.metric)}` metric logged by the fine-tune runs",
    }
    source = " / ".join(baseline_note.get(s, s) for s in info.baseline_source.split(" and "))
    metric = info.metric
    twin_lines = "".join(
        f"- `{label}`: {note}: the same weights, so the same scores and training time (train.reuse_twin=false trains)\n"
        for label, note in info.twins.items()
    )
    text = f"""# Study report: {name}

- Experiment(s): {", ".join(info.experiments)}
- Sweep(s): {", ".join(info.sweeps) or "none tagged"}
- Runs started: {when}
- Generated: {now}
- Runs: {used_sentence(info)}; usable = FINISHED fine-tune runs with `{metric}`.
- Ranked by: {ranked_line(info)}
- Varying settings: {", ".join(f"`{s}`" for s in info.settings) or "none (one configuration)"}
{twin_lines}{fixed_block(info.fixed_settings)}
{body or format_table(table, info.settings, info.baselines)}

Notes: accuracy is MTEB classification (`{metric}` on the test split, "validation mean" is
`{names.validation(metric)}` on the rows held out of train). "accuracy std (seeds)" is the
sample standard deviation over training seeds; "MTEB std (mean)" is the mean over runs of the
spread across MTEB's evaluation experiments. "delta vs baseline" is the mean over seeds of each
run's accuracy minus the baseline, taken from {source}. "delta 95% CI" is a t interval over
training seeds, mean ± t(0.975, n-1) · sd / sqrt(n); with a single seed there is no interval
("n/a"). A baseline row's "n seeds" counts its baseline runs ("(logged)": no baseline run was
found, so the `{names.baseline(metric)}` metric of the fine-tune runs is used).

![accuracy per configuration]({image})
"""
    if info.extra_scores or info.has_labelled_texts:
        text += (
            '\n"served" columns are the deployed classifier\'s end-to-end accuracy and "SetFit head" SetFit\'s '
            "own head, each the mean over seeds with its 95% t interval, never mixed into the MTEB score; "
            '"labelled texts" is the mean number of labelled texts the trainer read.\n'
        )
    if seconds_image:
        text += f"\n![validation accuracy against training seconds]({seconds_image})\n"
    path.write_text(text, encoding="utf-8")
    return path


def display(info_runs: pd.DataFrame, settings: list[str], configs: list[str], by: str = "configuration"):
    """The configurations a plot shows, each once: (kept configurations, {configuration: label}). A twin
    row (it took another row's training, so its scores are that row's) is left out and named in its
    twin's label."""
    if info_runs.empty or by not in info_runs:
        return configs, {c: c for c in configs}
    names_ = arm_labels(info_runs, settings, by)
    twins = twins_of(info_runs, by)
    kept = [c for c in configs if c not in twins]
    labels = {c: with_twins(names_.get(c, c), [names_.get(t, t) for t in configs if twins.get(t) == c]) for c in kept}
    return kept, labels


def accuracy_figure(table: pd.DataFrame, info: StudyInfo, name: str):
    """Accuracy per configuration: mean ± std over seeds, seed points, dashed baseline line(s). Side by side
    where the labels fit a 16-inch figure, else a row per configuration (rotated labels of several lines
    print over each other)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = table[~table["configuration"].isin(list(info.baselines))]
    kept, shown = display(info.runs, info.settings, list(configs["configuration"]))
    configs = configs[configs["configuration"].isin(kept)].reset_index(drop=True)
    labels = [wrap(shown[c], 22) for c in configs["configuration"]]
    longest = max((len(line) for lab in labels for line in lab.split("\n")), default=0)
    # ~0.09 in per character at this font size, plus room for the legend
    width = len(labels) * max(1.2, 0.09 * longest) + 4.5
    rows = width > 16
    if rows:
        labels = [wrap(shown[c], 70) for c in configs["configuration"]]
        lines = sum(lab.count("\n") + 1 for lab in labels)
        longest = max((len(line) for lab in labels for line in lab.split("\n")), default=0)
        fig, ax = plt.subplots(figsize=(min(8 + 0.075 * longest, 16), 1.8 + 0.16 * lines + 0.2 * len(labels)))
    else:
        fig, ax = plt.subplots(figsize=(max(width, 7.0), 5))
    at = np.arange(len(configs))[::-1] if rows else np.arange(len(configs))  # the best on top / on the left
    means, spread = configs["accuracy_mean"], configs["accuracy_std_seeds"].fillna(0)
    ax.errorbar(
        *((means, at) if rows else (at, means)),
        **({"xerr": spread} if rows else {"yerr": spread}),
        fmt="o",
        markersize=8,
        capsize=6,
        color="tab:blue",
        label="mean ± std over seeds",
        zorder=3,
    )
    rng = np.random.default_rng(0)  # fixed jitter so reruns give the same picture
    for i, row in configs.iterrows():
        pts = info.accuracies[row["configuration"]]
        jittered = at[i] + rng.uniform(-0.12, 0.12, len(pts))
        ax.scatter(
            *((pts, jittered) if rows else (jittered, pts)),
            s=18,
            color="gray",
            alpha=0.7,
            zorder=2,
            label="individual seeds" if i == 0 else None,
        )
    for j, (label, value) in enumerate(info.baselines.items()):
        (ax.axvline if rows else ax.axhline)(
            value, linestyle="--", color=f"C{(j + 1) % 10}", label=wrap(f"{baseline_legend(label)} ({value:.4f})", 40)
        )
    if rows:
        ax.set_yticks(at, labels)
        ax.set_ylim(-0.6, len(configs) - 0.4)
        ax.set_xlabel(f"{info.metric} (test)")
        ax.grid(axis="x", alpha=0.3)
    else:
        ax.set_xticks(at, labels)
        ax.set_xlim(-0.6, len(configs) - 0.4)
        ax.set_ylabel(f"{info.metric} (test)")
        ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{name}: accuracy per configuration ({seeds_text(info)})")
    # Outside the axes so it never hides seed points.
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    return fig


def save(fig, path: Path) -> Path:
    """Write the figure with everything on it (a label wider than planned widens the picture, never clipped)."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path


def plot(table: pd.DataFrame, info: StudyInfo, name: str, path: Path) -> Path:
    return save(accuracy_figure(table, info, name), path)


MARKERS = "osD^v<>"


def setting_styles(runs: pd.DataFrame, settings: list[str], kept: list[str]):
    """Where configurations outnumber the colours one can tell apart (a search's grid), a point is named
    by its style: colour by the setting with the most values (at most 10), marker by the next (at most
    7), hollow or filled by a third (2 values). ({label: errorbar keywords}, [(legend handle, text)]), or
    None where the varying settings do not fit that."""
    from matplotlib.lines import Line2D

    sub = runs[runs["_label"].isin(kept)]
    varying = sorted((k for k in settings if k in sub and sub[k].nunique() > 1), key=lambda k: -sub[k].nunique())
    limits = (10, len(MARKERS), 2)
    if not 1 <= len(varying) <= 3 or any(sub[k].nunique() > n for k, n in zip(varying, limits)):
        return None
    values = [sorted(sub[k].dropna().unique(), key=str) for k in varying]
    styles = {}
    for label, group in sub.groupby("_label", sort=False):
        at = [vals.index(group[k].iloc[0]) for k, vals in zip(varying, values)] + [0, 0]
        colour = f"C{at[0]}"
        styles[label] = {"color": colour, "fmt": MARKERS[at[1]], "markerfacecolor": "white" if at[2] else colour}
    legend = []
    for i, (key, vals) in enumerate(zip(varying, values)):
        for j, value in enumerate(vals):
            look = [
                {"color": f"C{j}", "marker": "o"},
                {"color": "0.35", "marker": MARKERS[j]},
                {"color": "0.35", "marker": "o", "markerfacecolor": "white" if j else "0.35"},
            ][i]
            legend.append((Line2D([], [], linestyle="", **look), f"{key.split('.')[-1]}={value}"))
    return styles, legend


def seconds_figure(info: StudyInfo, name: str, x_column: str = "train_seconds"):
    """Validation score against training seconds, a point per configuration (means over seeds;
    vertical bars the score's t interval, horizontal ones the seeds' range of seconds, which cannot
    go below 0 as a t interval would), labelled by its arm (placed so no two labels overlap), one panel
    per dataset; a log axis when the values span more than 5x (symlog where an arm has 0 s). None when seconds
    or scores do not vary."""
    runs = info.runs
    if x_column not in runs or runs.empty or runs[x_column].nunique() < 2 or runs["val_accuracy"].notna().sum() == 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter

    # The dataset is the panel, so its own settings (folder, label names, ...) label nothing.
    settings = [k for k in info.settings if not k.startswith("data.")]
    runs = runs.assign(_label=[config_label({k: r[k] for k in settings}) for _, r in runs.iterrows()])
    kept, shown = display(runs, settings, list(dict.fromkeys(runs["_label"])), by="_label")
    palette = [f"C{i}" for i in range(10)] if len(kept) <= 10 else [plt.cm.tab20(i) for i in range(20)]
    colour = {c: palette[i % len(palette)] for i, c in enumerate(kept)}
    styled = setting_styles(runs, settings, kept) if len(kept) > len(palette) else None
    datasets = sorted(runs["dataset"].unique())
    cols = min(len(datasets), 2)
    rows = math.ceil(len(datasets) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(9 * cols, 5.5 * rows), squeeze=False)
    for ax in axes.flat[len(datasets) :]:
        ax.set_visible(False)
    to_label = []
    for ax, dataset in zip(axes.flat, datasets):
        points, texts, handles, bars = [], [], [], []
        for label, group in runs[runs["dataset"] == dataset].groupby("_label", sort=False):
            secs, y = group[x_column].to_numpy(float), group["val_accuracy"].to_numpy(float)
            if label not in colour or np.isnan(y).all() or np.isnan(secs).all():
                continue
            x, (y_low, y_high) = np.nanmean(secs), t_interval(y)
            yerr = None if math.isnan(y_low) else [[np.nanmean(y) - y_low], [y_high - np.nanmean(y)]]
            xerr = [[max(0.0, x - np.nanmin(secs))], [max(0.0, np.nanmax(secs) - x)]]  # never -1e-16
            look = styled[0][label] if styled else {"fmt": "o", "color": colour[label]}
            handles.append(ax.errorbar(x, np.nanmean(y), xerr=xerr, yerr=yerr, capsize=4, **look))
            points.append((x, np.nanmean(y)))
            y_range = (np.nanmean(y),) * 2 if yerr is None else (y_low, y_high)
            bars.append((np.nanmin(secs), np.nanmax(secs), *y_range))
            texts.append(wrap(shown[label], 40))
        positive = [p[0] for p in points if p[0] > 0]
        if positive and max(positive) / min(positive) > 5:
            if len(positive) < len(points):  # an arm that does not train (0 s): linear below the fastest that does
                ax.set_xscale("symlog", linthresh=10 ** math.floor(math.log10(min(positive))))
            else:
                ax.set_xscale("log")
            for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):  # 20, not 2 x 10^1
                axis(LogFormatter(minor_thresholds=(2, 0.5)))
        ax.set_xlabel(X_AXES[x_column][0])
        ax.set_ylabel(f"{info.ranked_by or 'validation score'} (mean over seeds)")
        if len(datasets) > 1:
            ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.margins(x=0.12, y=0.1)  # room for the labels of the outermost points
        to_label.append((ax, points, texts, handles, bars))
    fig.suptitle(f"{name}: validation score against {X_AXES[x_column][1]} (bars: 95% t intervals, {seeds_text(info)})")
    fig.tight_layout()
    crowded = []
    for ax, points, texts, handles, bars in to_label:  # after the layout: placement measures screen distances
        if styled:  # a point's style names its settings: the legend says which
            crowded.append((ax, [handle for handle, _ in styled[1]], [text for _, text in styled[1]]))
        elif not place_labels(ax, points, texts, bars=bars):  # too many points too close for a label beside each
            crowded.append((ax, handles, texts))
    for ax, handles, texts in crowded:
        ax.legend(handles, texts, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    if crowded:
        fig.set_figwidth(fig.get_figwidth() + 3)
        fig.tight_layout()
    return fig


def plot_accuracy_vs_seconds(info: StudyInfo, name: str, path: Path) -> Path | None:
    """seconds_figure written to `path`; None (nothing written) when seconds or scores do not vary."""
    fig = seconds_figure(info, name)
    return None if fig is None else save(fig, path)


def plot_accuracy_vs_serving(info: StudyInfo, name: str, path: Path) -> Path | None:
    """The same figure against the served classifier's texts per second (one text a call); None (nothing
    written) when no two configurations differ in it (runs before it was measured have none)."""
    fig = seconds_figure(info, name, names.SERVE_TPS_ONE)
    return None if fig is None else save(fig, path)
