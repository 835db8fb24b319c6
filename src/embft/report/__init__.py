"""`embft report NAME`: a study report (markdown table + plot) from the MLflow runs of a study.

NAME is an MLflow experiment name or an `embft.sweep` tag value; several NAMEs are pooled, and
`--where KEY=VALUE` keeps only the fine-tune runs with that param (to borrow identical runs from
another study, e.g. `embft report pairing seed_grid --where variant.name=same_nib`). Usable runs are FINISHED
fine-tune runs with the report's metric (`--metric`; default from the runs' eval settings, e.g.
`accuracy_cosine` for kNN/cosine); they are grouped into configurations by the params that vary
across them (training seeds excluded), and each configuration gets its mean and spread over seeds,
compared with the untrained model's baseline. Configurations are ranked by the validation score
(`val_<metric>`) where the runs have it: choices are made on validation, test is reported beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from embft.config import Config
from embft.errors import EmbftError
from embft.tracking import names

DEFAULT_METRIC = names.score_metric("knn", "cosine")  # older runs without eval params
ROLE_TAG, SWEEP_TAG, KEY_TAG, HASH_TAG = names.ROLE, names.SWEEP, names.BASELINE_KEY, names.CONFIG_HASH
SEED_PARAM = "train.seed"
NON_SETTING_PREFIXES = ("paths.", "tracking.", "optuna.", "hydra.")
# Run switches that never change a result (tracking.LOCATION_KEYS, keeping the model folder,
# taking a twin's training); `name` labels the study (MLflow experiment).
NON_SETTING_KEYS = ("force", "debug", "name", "train.keep_model", "train.reuse_twin")
# A setting is a key of the job's config; other params a library logs into the run are not (MLflow
# logs a pyfunc model's model_config as params: the served classifier's, serving.log_models).
CONFIG_KEYS = frozenset(f.name for f in fields(Config))
TABLE_NUMBERS = [
    "n_seeds",
    "val_accuracy_mean",
    "accuracy_mean",
    "accuracy_std_seeds",
    "mteb_std_mean",
    "delta_mean",
    "delta_ci95_low",
    "delta_ci95_high",
    "train_minutes",
    "train_qps",
]
_PATH_VALUE = re.compile(r"^(/|~|[A-Za-z]:[\\/])")
_PAGE = 1000


# --------------------------------------------------------------------------------------- loading


def _search_all(client, experiment_ids: list[str], filter_string: str = "") -> list:
    """All runs of the experiments matching the filter, following MLflow's page tokens."""
    if not experiment_ids:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=_PAGE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _all_experiments(client) -> list:
    exps, token = [], None
    while True:
        page = client.search_experiments(max_results=_PAGE, page_token=token)
        exps.extend(page)
        token = page.token
        if not token:
            return exps


def _quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def _rows(runs: list, exp_names: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        tags = run.data.tags
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "experiment": exp_names.get(run.info.experiment_id, run.info.experiment_id),
            "status": run.info.status,
            "role": tags.get(ROLE_TAG),
            "sweep": tags.get(SWEEP_TAG),
            "baseline_key": tags.get(KEY_TAG),
            "config_hash": tags.get(HASH_TAG),
            "twin_reason": tags.get(names.TWIN_REASON),  # took a twin run's training (app.take_twin)
            "trained_as": tags.get(names.TRAINED_AS),
            "pruned": tags.get(names.OPTUNA_PRUNED) == "true",  # stopped by the study's pruner: a partial score
            "start_time": run.info.start_time,
            "end_time": run.info.end_time,
        }
        row.update({f"params.{k}": v for k, v in run.data.params.items()})
        row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
        rows.append(row)
    return rows


def load_runs(client, name: str | list[str], where: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per run of NAME (experiment name, else `embft.sweep` tag in any experiment).

    Several names are pooled; `where` keeps only the fine-tune runs whose params equal its values.

    Columns: run_id, experiment, status, role, sweep, baseline_key, config_hash, start_time,
    end_time, `params.<key>` (strings) and `metrics.<key>` (latest value). Baseline runs from
    other experiments whose `embft.baseline_key` matches a selected fine-tune run are appended
    with `selected=False`, because the baseline may be logged by another study.
    """
    exps = _all_experiments(client)
    exp_names = {e.experiment_id: e.name for e in exps}
    selected, seen = [], set()
    for one in [name] if isinstance(name, str) else name:
        by_name = [e for e in exps if e.name == one]
        if by_name:
            runs = _search_all(client, [by_name[0].experiment_id])
        else:
            runs = _search_all(client, list(exp_names), f"tags.`{SWEEP_TAG}` = {_quote(one)}")
        for row in _rows(runs, exp_names):
            wanted = row["role"] == "baseline" or all(row.get(f"params.{k}") == v for k, v in (where or {}).items())
            if wanted and row["run_id"] not in seen:
                row["selected"] = True
                seen.add(row["run_id"])
                selected.append(row)

    keys = {r["baseline_key"] for r in selected if r["role"] == "finetune" and r["baseline_key"]}
    extra = []
    if keys:
        baselines = _search_all(client, list(exp_names), f"tags.`{ROLE_TAG}` = 'baseline'")
        for row in _rows(baselines, exp_names):
            if row["baseline_key"] in keys and row["run_id"] not in seen:
                row["selected"] = False
                extra.append(row)
    return pd.DataFrame(selected + extra)


# ------------------------------------------------------------------------------------ summarizing


@dataclass
class StudyInfo:
    """What a report says about a study besides its table."""

    metric: str  # the test score reported, e.g. accuracy_cosine
    ranked_by: str | None  # val_<metric>; None where no run has it (nothing is chosen on test)
    experiments: list[str]
    sweeps: list[str]
    n_used: int
    n_skipped: int
    skipped_by_status: dict[str, int]
    settings: list[str]  # the varying params: the configuration axes
    fixed_settings: dict[str, str]
    n_seeds_min: int
    n_seeds_max: int
    accuracies: dict[str, list[float]]  # per configuration label, one test score per seed
    n_baseline_runs: int
    baselines: dict[str, float]  # baseline row label -> test score
    baseline_source: str
    first_start: str | None
    last_start: str | None
    twins: dict[str, str]  # configuration label -> "n of m runs took a twin's training (why)"


def _metric(df: pd.DataFrame, name: str) -> pd.Series:
    col = f"metrics.{name}"
    return pd.to_numeric(df[col], errors="coerce") if col in df else pd.Series(np.nan, df.index)


def _pruned(df: pd.DataFrame) -> pd.Series:
    return df["pruned"].fillna(False).astype(bool) if "pruned" in df else pd.Series(False, df.index)


def _usable(df: pd.DataFrame, role: str, metric: str) -> pd.Series:
    """FINISHED runs of `role` with `metric`; a pruned trial's run (a partial score) is never one."""
    return (df["role"] == role) & (df["status"] == "FINISHED") & ~_pruned(df) & _metric(df, metric).notna()


def _skip_reason(row: pd.Series, metric: str) -> str:
    if row["status"] != "FINISHED":
        return str(row["status"])
    pruned = row.get("pruned")
    if pd.notna(pruned) and bool(pruned):
        return "PRUNED (stopped by the study's pruner: listed apart, never ranked)"
    return f"FINISHED without {metric}" if row["role"] in ("finetune", "baseline") else "untagged"


def default_metric(df: pd.DataFrame) -> str:
    """The score named by the fine-tune runs' eval settings (`accuracy_cosine`, `accuracy_logreg`, ...)."""
    tuned = df[df["role"] == names.ROLE_FINETUNE]
    if "params.eval.method" not in tuned or tuned["params.eval.method"].isna().all():
        return DEFAULT_METRIC
    found = {
        names.score_metric(m, d if isinstance(d, str) else "cosine")
        for m, d in zip(tuned["params.eval.method"], tuned.get("params.eval.metric", pd.Series(index=tuned.index)))
        if isinstance(m, str)
    }
    if len(found) > 1:
        counts = {m: int(_metric(tuned, m).notna().sum()) for m in found}
        chosen = max(sorted(found), key=lambda m: counts[m])
        print(
            f"note: the runs use several evaluations ({', '.join(sorted(found))}); reporting {chosen}, "
            "the most common (--metric chooses another)",
            file=sys.stderr,
        )
        return chosen
    return found.pop()


def _is_setting(key: str) -> bool:
    return (
        key.partition(".")[0] in CONFIG_KEYS
        and key != SEED_PARAM
        and key not in NON_SETTING_KEYS
        and not key.startswith(NON_SETTING_PREFIXES)
    )


def varying_settings(runs: pd.DataFrame) -> list[str]:
    """Param keys whose values differ across runs: the configuration axes (seed, paths excluded)."""
    keys = []
    for col in sorted(c for c in runs.columns if c.startswith("params.")):
        key = col[len("params.") :]
        if not _is_setting(key):
            continue
        values = runs[col]
        # One value, missing in some runs: a key the schema gained later, not a configuration axis.
        if values.nunique(dropna=True) < 2:
            continue
        present = values.dropna().astype(str)
        # Per-run folders (output dirs, caches) would split every run into its own configuration.
        if len(present) and present.map(lambda v: bool(_PATH_VALUE.match(v))).all():
            continue
        keys.append(key)
    return keys


def _short_names(keys: list[str]) -> dict[str, str]:
    """`train.learning_rate` -> `learning_rate`, `variant.name` -> `variant`; full key on clash."""
    parts = [k.split(".") for k in keys]
    short = [p[-2] if p[-1] == "name" and len(p) > 1 else p[-1] for p in parts]
    return {k: (s if short.count(s) == 1 else k) for k, s in zip(keys, short)}


def config_label(settings: dict[str, Any], sep: str = ", ") -> str:
    """Readable configuration label from {setting key: value}."""
    if not settings:
        return "all runs"
    short = _short_names(list(settings))
    return sep.join(f"{short[k]}={v}" for k, v in settings.items())


def t_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided t interval for the mean over seeds (n-1 dof); (nan, nan) when n < 2."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) < 2:
        return (math.nan, math.nan)
    half = stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return (float(x.mean() - half), float(x.mean() + half))


def _std(values: pd.Series) -> float:
    return float(values.std(ddof=1)) if values.notna().sum() >= 2 else math.nan


def _baselines(df: pd.DataFrame, used: pd.DataFrame, settings: list[str], metric: str):
    """Baseline table rows per `embft.baseline_key` of the used runs, and accuracy by key.

    Uses the baseline runs with that key when there are any, else the `baseline_accuracy_cosine`
    metric the fine-tune runs logged. Returns (rows, {key: accuracy}, {"runs"/"metric"}).
    """
    base_runs = df[_usable(df, "baseline", metric)]
    logged = _metric(used, names.baseline(metric))
    logged_val = _metric(used, names.baseline(names.validation(metric)))
    found = []
    for key, group in used.groupby("_key", sort=True):
        runs = base_runs[base_runs["baseline_key"] == key]
        if len(runs):
            accs, mteb_std, source = _metric(runs, metric), _metric(runs, names.std(metric)), "runs"
            val = _metric(runs, names.validation(metric))
        else:
            accs, mteb_std, source = logged[group.index].dropna(), pd.Series([math.nan]), "metric"
            val = logged_val[group.index]
        if accs.empty:
            continue
        # Settings shared by all fine-tune runs of this key (e.g. model.name) name the baseline.
        common = {k: group[k].iloc[0] for k in settings if group[k].nunique() == 1}
        found.append((key, common, accs, mteb_std, source, val))

    rows, by_key = [], {}
    for key, common, accs, mteb_std, source, val in found:
        label = "baseline"
        if len(found) > 1:
            label += f" ({config_label(common) if common else key})"
        by_key[key] = float(accs.mean())
        rows.append(
            {
                "configuration": label,
                **{k: common.get(k, "") for k in settings},
                "n_seeds": len(accs) if source == "runs" else 0,  # 0: logged metric, no run
                **{c: math.nan for c in TABLE_NUMBERS[1:]},
                "val_accuracy_mean": val.mean(),
                "accuracy_mean": by_key[key],
                "mteb_std_mean": mteb_std.mean(),
            }
        )
    return rows, by_key, {f[4] for f in found}


def _baseline_keys(used: pd.DataFrame, selected: pd.DataFrame) -> pd.Series:
    """Each used run's `embft.baseline_key`; a run that took its twin's training (logged before twins
    carried the key) takes the key of the run that trained, so it never makes a baseline of its own."""
    keys = used["baseline_key"]
    if "trained_as" in used:
        by_run = selected.set_index("run_id")["baseline_key"].dropna().to_dict()
        keys = keys.where(keys.notna(), used["trained_as"].map(by_run))
    return keys.fillna("(none)")


def _fixed_settings(used: pd.DataFrame, settings: list[str]) -> dict[str, str]:
    """Params with one value across the used runs (non-setting prefixes and seed excluded)."""
    fixed = {}
    for col in sorted(c for c in used.columns if c.startswith("params.")):
        key = col[len("params.") :]
        if key in settings or not _is_setting(key):
            continue
        if used[col].notna().all() and used[col].nunique() == 1:
            fixed[key] = used[col].iloc[0]
    return fixed


def summarize(df: pd.DataFrame, metric: str | None = None) -> tuple[pd.DataFrame, StudyInfo]:
    """Table of configurations (plus baseline rows) and an info dict for the report.

    Table columns: `configuration` (label), one column per varying setting, then TABLE_NUMBERS
    (`accuracy_*` are `metric`, `val_accuracy_mean` its validation score); rows sorted by the
    validation score where the runs have one, else by the test score, best first.
    Raises EmbftError when no run is usable.
    """
    if df.empty:
        raise EmbftError("no runs found")
    metric = metric or default_metric(df)
    selected = df[df["selected"]] if "selected" in df else df
    used_mask = _usable(selected, "finetune", metric)
    # Baseline runs are reported as the baseline, not as used or skipped study runs.
    skipped = selected[
        ~used_mask
        & ~_usable(selected, "baseline", metric)
        & ~selected["role"].isin((names.ROLE_STUDY, names.ROLE_SWEEP))
    ]  # parent runs hold no job
    skipped_by = skipped.apply(_skip_reason, axis=1, metric=metric).value_counts().to_dict() if len(skipped) else {}
    if not used_mask.any():
        counts = ", ".join(f"{n} {s}" for s, n in skipped_by.items()) or "none"
        raise EmbftError(f"no usable runs: need FINISHED role=finetune runs with {metric} (skipped: {counts})")

    used = selected[used_mask].copy()
    settings = varying_settings(used)
    # Setting columns under their plain key; missing params count as a value of their own.
    for key in settings:
        used[key] = used[f"params.{key}"].fillna("(unset)").astype(str)
    used["_key"] = _baseline_keys(used, selected)
    base_rows, base_acc, sources = _baselines(df, used, settings, metric)
    acc = _metric(used, metric)
    val_acc = _metric(used, names.validation(metric))
    delta = _metric(used, names.delta(metric))
    delta = delta.where(delta.notna(), acc - used["_key"].map(base_acc))

    rows, accuracies, twins = [], {}, {}
    groups = used.groupby(settings, sort=False) if settings else [((), used)]
    for values, group in groups:
        values = values if isinstance(values, tuple) else (values,)
        label = config_label(dict(zip(settings, values)))
        ix = group.index
        low, high = t_interval(delta[ix])
        rows.append(
            {
                "configuration": label,
                **dict(zip(settings, values)),
                "n_seeds": len(group),
                "val_accuracy_mean": val_acc[ix].mean(),
                "accuracy_mean": acc[ix].mean(),
                "accuracy_std_seeds": _std(acc[ix]),
                "mteb_std_mean": _metric(group, names.std(metric)).mean(),
                "delta_mean": delta[ix].mean(),
                "delta_ci95_low": low,
                "delta_ci95_high": high,
                "train_minutes": _metric(group, "train_seconds").mean() / 60,
                "train_qps": _metric(group, "train_queries_per_second").mean(),
            }
        )
        accuracies[label] = acc[ix].tolist()
        took = group["twin_reason"].dropna() if "twin_reason" in group else pd.Series(dtype=str)
        if len(took):
            twins[label] = f"{len(took)} of {len(group)} runs took a twin run's training ({'; '.join(took.unique())})"

    table = pd.DataFrame(rows + base_rows, columns=["configuration", *settings, *TABLE_NUMBERS])
    has_val = bool(val_acc.notna().any())
    if has_val:  # runs without a validation score are never ranked on test: they come last, unranked
        table = table.sort_values(["val_accuracy_mean"], ascending=False, kind="stable", na_position="last")
    table = table.reset_index(drop=True).astype({"n_seeds": int})
    seeds = [len(v) for v in accuracies.values()]
    start = pd.to_numeric(selected["start_time"], errors="coerce").dropna()
    info = StudyInfo(
        metric=metric,
        ranked_by=names.validation(metric) if has_val else None,
        experiments=sorted(set(selected["experiment"].dropna())),
        sweeps=sorted(set(selected["sweep"].dropna())),
        n_used=len(used),
        n_skipped=len(skipped),
        skipped_by_status=skipped_by,
        settings=settings,
        fixed_settings=_fixed_settings(used, settings),
        n_seeds_min=min(seeds),
        n_seeds_max=max(seeds),
        accuracies=accuracies,
        n_baseline_runs=int(sum(r["n_seeds"] for r in base_rows)),
        baselines={r["configuration"]: r["accuracy_mean"] for r in base_rows},
        baseline_source=" and ".join(sorted(sources)) or "none",
        first_start=_ms_to_str(start.min()) if len(start) else None,
        last_start=_ms_to_str(start.max()) if len(start) else None,
        twins=twins,
    )
    return table, info


def _ms_to_str(ms: float) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def used_sentence(info: StudyInfo) -> str:
    """'used 6 runs, skipped 2: 1 FAILED, 1 RUNNING'."""
    text = f"used {info.n_used} runs, skipped {info.n_skipped}"
    if info.skipped_by_status:
        text += ": " + ", ".join(f"{n} {s}" for s, n in sorted(info.skipped_by_status.items()))
    if info.n_baseline_runs:
        text += f" (plus {info.n_baseline_runs} baseline run(s))"
    return text


def ranked_line(info: StudyInfo) -> str:
    """What the ranking rests on; where no run has a validation score, that nothing was ranked."""
    if info.ranked_by is None:
        return (
            f"not ranked: these runs have no `{names.validation(info.metric)}`, and choices are made on "
            "validation, never on the test score (rerun them to choose)"
        )
    return f"`{info.ranked_by}` (choices are made on validation; the test score is reported beside it)"


def seeds_text(info: StudyInfo) -> str:
    lo, hi = info.n_seeds_min, info.n_seeds_max
    return f"n seeds = {lo}" if lo == hi else f"n seeds = {lo}-{hi}"


# -------------------------------------------------------------------------------------- writing


def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def format_table(table: pd.DataFrame, settings: list[str], baselines=()) -> str:
    """The summary table as a markdown pipe table; rows labelled in `baselines` get no deltas, rows
    without a validation score no rank (a rank would be a choice made on test)."""
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
        "train q/s",
    ]
    align = ["---"] * (1 + len(settings)) + ["---:"] * 9
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
            "" if baseline else _fmt(r["train_qps"], 2),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def write_markdown(table: pd.DataFrame, info: StudyInfo, name: str, path: Path, image: str = "report.png") -> Path:
    """Write the report: what/when, used/skipped runs, table, interval note, plot link."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    when = f"{info.first_start} to {info.last_start}" if info.first_start else "unknown"
    fixed_items = info.fixed_settings.items()
    fixed = ", ".join(f"`{k}={v}`" for k, v in fixed_items if not _PATH_VALUE.match(str(v)))
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
- Fixed settings: {fixed or "none"}
{twin_lines}
{format_table(table, info.settings, info.baselines)}

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
    path.write_text(text, encoding="utf-8")
    return path


def plot(table: pd.DataFrame, info: StudyInfo, name: str, path: Path) -> Path:
    """Accuracy per configuration: mean ± std over seeds, seed points, dashed baseline line(s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = table[~table["configuration"].isin(list(info.baselines))].reset_index(drop=True)
    labels = [config_label({k: r[k] for k in info.settings}, sep="\n") for _, r in configs.iterrows()]
    longest = max((len(line) for lab in labels for line in lab.split("\n")), default=0)
    # Widen the figure so labels fit side by side (~0.09 in per character at this font size,
    # plus room for the legend); rotate them only when that would get too wide.
    width = len(labels) * max(1.2, 0.09 * longest) + 4.5
    rotate = width > 16
    if rotate:
        width = len(labels) * 0.9 + 4.5
    fig, ax = plt.subplots(figsize=(min(max(width, 7.0), 16), 6 if rotate else 5))
    x = np.arange(len(configs))
    ax.errorbar(
        x,
        configs["accuracy_mean"],
        yerr=configs["accuracy_std_seeds"].fillna(0),
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
        ax.scatter(
            i + rng.uniform(-0.12, 0.12, len(pts)),
            pts,
            s=18,
            color="gray",
            alpha=0.7,
            zorder=2,
            label="individual seeds" if i == 0 else None,
        )
    for j, (label, value) in enumerate(info.baselines.items()):
        ax.axhline(value, linestyle="--", color=f"C{(j + 1) % 10}", label=f"{label} ({value:.4f})")
    ax.set_xticks(x, labels)
    if rotate:
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.6, len(configs) - 0.4)
    ax.set_ylabel(f"{info.metric} (test)")
    ax.set_title(f"{name}: accuracy per configuration ({seeds_text(info)})")
    ax.grid(axis="y", alpha=0.3)
    # Outside the axes so it never hides seed points.
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ CLI


def _default_tracking_uri() -> str:
    # The project's store, as conf/tracking/mlflow.yaml: MLFLOW_TRACKING_URI is not read (see there).
    from embft.tracking.mlflow_runs import default_tracking_uri

    return default_tracking_uri()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="embft report", description="Write report.md and report.png for a study from MLflow."
    )
    parser.add_argument("name", nargs="+", help="MLflow experiment name(s) or embft.sweep tag value(s), pooled")
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep only fine-tune runs with this param value (repeatable)",
    )
    parser.add_argument("--tracking-uri", default=None, help="default: the project store (mlruns/mlflow.db)")
    parser.add_argument(
        "--metric",
        default=None,
        help="score to report, e.g. accuracy_cosine or accuracy_logreg (default: from the runs' eval settings)",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("experiments"), help="default: ./experiments")
    parser.add_argument("--output-name", default=None, help="folder under out-dir (default: name, / -> _)")
    parser.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL of a search (default: the study parent run's optuna.storage tag)",
    )
    args = parser.parse_args(argv)

    where = {}
    for item in args.where:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--where {item!r}: expected KEY=VALUE, e.g. variant.name=same_nib")
        where[key] = value
    title = " + ".join(args.name)
    uri = args.tracking_uri or _default_tracking_uri()
    # A missing sqlite file would silently be created as an empty store; say what is wrong instead.
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        print(f"error: no MLflow store at {uri} (pass --tracking-uri)", file=sys.stderr)
        return 1
    from mlflow.tracking import MlflowClient

    try:
        df = load_runs(MlflowClient(tracking_uri=uri), args.name, where)
        if df.empty:
            raise EmbftError(
                f"no experiment named {title!r} and no runs tagged "
                f"{SWEEP_TAG}={title!r} in {uri}" + (f" matching {where}" if where else "")
            )
        table, info = summarize(df, args.metric)
    except EmbftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    out = args.out_dir / (args.output_name or args.name[0].replace("/", "_"))
    out.mkdir(parents=True, exist_ok=True)
    md = write_markdown(table, info, title, out / "report.md")
    png = plot(table, info, title, out / "report.png")
    try:  # a search also gets Optuna's plots, in report.md and on its parent run
        from embft.report.search import add_search_section

        add_search_section(MlflowClient(tracking_uri=uri), args.name, md, storage=args.storage)
    except EmbftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    best = table[~table["configuration"].isin(list(info.baselines))].iloc[0]
    print(md)
    print(png)
    n_configs = len(table) - len(info.baselines)
    delta = "" if math.isnan(best["delta_mean"]) else f" (delta {best['delta_mean']:+.4f})"
    val = "" if math.isnan(best["val_accuracy_mean"]) else f"validation {best['val_accuracy_mean']:.4f}, "
    if info.ranked_by is None:  # runs from before the validation split: nothing to choose on
        print(f"{title}: {used_sentence(info)}; {n_configs} configuration(s); {ranked_line(info)}")
        return 0
    print(
        f"{title}: {used_sentence(info)}; {n_configs} configuration(s); best by {info.ranked_by}: "
        f"{best['configuration']}: {val}test {best['accuracy_mean']:.4f}{delta}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
