"""A study's runs summarized: configurations by the settings that vary, means and intervals over seeds,
the baselines, ranked on validation (never on test)."""

from __future__ import annotations

import datetime as dt
import math
import re
import sys
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from embft import names
from embft.config import Config
from embft.errors import EmbftError

DEFAULT_METRIC = names.score_metric("knn", "cosine")  # older runs without eval params
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
PATH_VALUE = re.compile(r"^(/|~|[A-Za-z]:[\\/])")
DATA_PARAM = "data.name"  # the dataset: a cross-dataset study varies it (report.datasets)
# Scores some trainers log beside the MTEB kNN score (the deployed classifier end to end, SetFit's own
# head): a column each, mean and interval over seeds, only where some run has them.
EXTRA_SCORES = (
    "val_served_accuracy_knn",
    "served_accuracy_knn",
    "val_served_accuracy_logreg",
    "served_accuracy_logreg",
    "val_setfit_head_accuracy",
    "setfit_head_accuracy",
    # tracking.serve_backend's cost: torch fp32's validation score beside the served one, and its speed
    "val_served_fp32_accuracy_knn",
    "serve_texts_per_second_1",
    "serve_texts_per_second_64",
)
LABELLED_TEXTS = "train_labelled_texts"  # the labelled texts a trainer read: the cost held equal, or not


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
    extra_scores: list[str] = field(default_factory=list)  # EXTRA_SCORES some used run has
    has_labelled_texts: bool = False
    # One row per used run: its setting columns, `_key`, dataset, seed, scores and deltas (test `delta`,
    # validation `val_delta`), for views across the configurations (report.datasets).
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)


def _metric(df: pd.DataFrame, name: str) -> pd.Series:
    col = f"metrics.{name}"
    return pd.to_numeric(df[col], errors="coerce") if col in df else pd.Series(np.nan, df.index)


def _pruned(df: pd.DataFrame) -> pd.Series:
    return df["pruned"].fillna(False).astype(bool) if "pruned" in df else pd.Series(False, df.index)


def _usable(df: pd.DataFrame, role: str, metric: str) -> pd.Series:
    """FINISHED runs of `role` with `metric`; a pruned trial's run (a partial score) is never one."""
    return (df["role"] == role) & (df["status"] == "FINISHED") & ~_pruned(df) & _metric(df, metric).notna()


SUPERSEDED = "FINISHED, superseded by a newer FINISHED run of the same config and seed (force=true, reuse_twin=false)"


def _superseded(df: pd.DataFrame, used: pd.Series) -> pd.Series:
    """Usable runs with a newer usable run of the same config hash: a config counts once, as its
    newest result, so a `force=true` rerun replaces its old run instead of adding a seed."""
    if "config_hash" not in df:
        return pd.Series(False, df.index)
    hashed = used & df["config_hash"].notna()
    start = pd.to_numeric(df["start_time"], errors="coerce")
    newest = start[hashed].groupby(df.loc[hashed, "config_hash"]).transform("max")
    out = pd.Series(False, df.index)
    out[newest.index] = start[newest.index] < newest
    return out


def _same_seed(df: pd.DataFrame, used: pd.Series) -> pd.Series:
    """Usable runs with a newer usable run of the same configuration (the settings that vary) and seed:
    a seed counts once, whatever settings outside the report tell the two apart (train.reuse_twin,
    train.keep_model, a path, a hash an older embft computed)."""
    seed = f"params.{SEED_PARAM}"
    if seed not in df:  # runs that do not say their seed are never taken for one another
        return pd.Series(False, df.index)
    start = pd.to_numeric(df["start_time"], errors="coerce")
    runs = df[used & df[seed].notna()]
    columns = [f"params.{k}" for k in varying_settings(runs)] + [seed]
    columns += ["scoring_id"] if "scoring_id" in runs else []  # runs scored apart are never one seed
    if not len(runs):
        return pd.Series(False, df.index)
    key = runs[columns].apply(lambda row: "\0".join(map(str, row)), axis=1)
    newest = start[runs.index].groupby(key).transform("max")
    out = pd.Series(False, df.index)
    out[newest.index] = start[newest.index] < newest
    return out


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
        if len(present) and present.map(lambda v: bool(PATH_VALUE.match(v))).all():
            continue
        keys.append(key)
    return keys


SCORING = "scoring"  # the pseudo-setting of runs whose settings agree but were scored apart


def _scored_apart(used: pd.DataFrame, settings: list[str]) -> bool:
    """Do runs with the same settings carry different scoring identities (embft.scoring_id: other rows,
    e.g. another copy of the data under the same name, or other evaluation settings)?"""
    if "scoring_id" not in used or used["scoring_id"].isna().all():
        return False
    ids = used["scoring_id"].fillna("(untagged)")
    groups = ids.groupby([used[k] for k in settings], sort=False) if settings else ids.groupby(lambda _: 0)
    return bool((groups.nunique() > 1).any())


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
    metric the fine-tune runs logged. Returns (rows, {key: accuracy}, {"runs"/"metric"}, {key: validation score}).
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

    rows, by_key, val_by_key = [], {}, {}
    for key, common, accs, mteb_std, source, val in found:
        label = "baseline"
        if len(found) > 1:
            label += f" ({config_label(common) if common else key})"
        by_key[key] = float(accs.mean())
        val_by_key[key] = float(val.mean())
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
    return rows, by_key, {f[4] for f in found}, val_by_key


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
    superseded = _superseded(selected, used_mask)
    superseded |= _same_seed(selected, used_mask & ~superseded)
    used_mask &= ~superseded
    # Baseline runs are reported as the baseline, not as used or skipped study runs.
    skipped = selected[
        ~used_mask
        & ~superseded
        & ~_usable(selected, "baseline", metric)
        & ~selected["role"].isin((names.ROLE_STUDY, names.ROLE_SWEEP))
    ]  # parent runs hold no job
    skipped_by = skipped.apply(_skip_reason, axis=1, metric=metric).value_counts().to_dict() if len(skipped) else {}
    if superseded.any():
        skipped_by[SUPERSEDED] = int(superseded.sum())
    if not used_mask.any():
        counts = ", ".join(f"{n} {s}" for s, n in skipped_by.items()) or "none"
        raise EmbftError(f"no usable runs: need FINISHED role=finetune runs with {metric} (skipped: {counts})")

    used = selected[used_mask].copy()
    settings = varying_settings(used)
    # Setting columns under their plain key; missing params count as a value of their own.
    for key in settings:
        used[key] = used[f"params.{key}"].fillna("(unset)").astype(str)
    if _scored_apart(used, settings):  # never seeds of one configuration: their scores do not compare
        used[SCORING] = used["scoring_id"].fillna("(untagged)").astype(str)
        settings = [*settings, SCORING]
    used["_key"] = _baseline_keys(used, selected)
    base_rows, base_acc, sources, base_val = _baselines(df, used, settings, metric)
    acc = _metric(used, metric)
    val_acc = _metric(used, names.validation(metric))
    delta = _metric(used, names.delta(metric))
    delta = delta.where(delta.notna(), acc - used["_key"].map(base_acc))
    val_delta = _metric(used, names.delta(names.validation(metric)))
    val_delta = val_delta.where(val_delta.notna(), val_acc - used["_key"].map(base_val))
    seconds = _metric(used, names.TRAIN_SECONDS)
    extra = [m for m in EXTRA_SCORES if _metric(used, m).notna().any()]
    has_texts = bool(_metric(used, LABELLED_TEXTS).notna().any())
    extra_columns = [f"{m}_{part}" for m in extra for part in ("mean", "ci95_low", "ci95_high")]
    extra_columns += [f"{LABELLED_TEXTS}_mean"] if has_texts else []

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
                **_extra_numbers(group, extra, has_texts),
            }
        )
        accuracies[label] = acc[ix].tolist()
        took = group["twin_reason"].dropna() if "twin_reason" in group else pd.Series(dtype=str)
        if len(took):
            twins[label] = f"{len(took)} of {len(group)} runs took a twin run's training ({'; '.join(took.unique())})"

    table = pd.DataFrame(rows + base_rows, columns=["configuration", *settings, *TABLE_NUMBERS, *extra_columns])
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
        n_skipped=len(skipped) + int(superseded.sum()),
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
        extra_scores=extra,
        has_labelled_texts=has_texts,
        runs=_run_frame(used, settings, acc, val_acc, delta, val_delta, seconds),
    )
    return table, info


def _extra_numbers(group: pd.DataFrame, extra: list[str], has_texts: bool) -> dict[str, float]:
    """Mean and t interval over seeds of each extra score; the mean of the labelled texts read."""
    numbers = {}
    for m in extra:
        values = _metric(group, m)
        low, high = t_interval(values)
        numbers.update({f"{m}_mean": values.mean(), f"{m}_ci95_low": low, f"{m}_ci95_high": high})
    if has_texts:
        numbers[f"{LABELLED_TEXTS}_mean"] = _metric(group, LABELLED_TEXTS).mean()
    return numbers


def _run_frame(used, settings, acc, val_acc, delta, val_delta, seconds) -> pd.DataFrame:
    """The used runs with what a view across configurations needs; the dataset from `data.name`,
    else the run's `data` tag."""
    runs = used[[*settings, "_key"]].copy()
    dataset = used[f"params.{DATA_PARAM}"] if f"params.{DATA_PARAM}" in used else pd.Series(None, used.index)
    if "dataset" in used:
        dataset = dataset.where(dataset.notna(), used["dataset"])
    runs["dataset"] = dataset.fillna("(unset)").astype(str)
    runs["seed"] = used[f"params.{SEED_PARAM}"] if f"params.{SEED_PARAM}" in used else None
    # For the plots: the configuration's label, the run's arm, and the run whose training it took (a twin).
    runs["configuration"] = [config_label(dict(zip(settings, v))) for v in used[settings].values]
    for column in ("run_id", "arm", "trained_as"):
        runs[column] = used[column] if column in used else None
    for name, values in {
        "accuracy": acc,
        "val_accuracy": val_acc,
        "delta": delta,
        "val_delta": val_delta,
        "train_seconds": seconds,
        names.SERVE_TPS_ONE: _metric(used, names.SERVE_TPS_ONE),  # the serving axis of the plots
    }.items():
        runs[name] = values
    return runs


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
