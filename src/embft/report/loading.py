"""The runs of a study from MLflow, one row per run (params, metrics, the tags a report needs)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from embft import names
from embft.report.labels import run_arm
from embft.tracking.run_search import PAGE as _PAGE
from embft.tracking.run_search import search_runs


def _all_experiments(client) -> list:
    exps, token = [], None
    while True:
        page = client.search_experiments(max_results=_PAGE, page_token=token)
        exps.extend(page)
        token = page.token
        if not token:
            return exps


def _rows(runs: list, exp_names: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        tags = run.data.tags
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "experiment": exp_names.get(run.info.experiment_id, run.info.experiment_id),
            "status": run.info.status,
            "role": tags.get(names.ROLE),
            "sweep": tags.get(names.SWEEP),
            "baseline_key": tags.get(names.BASELINE_KEY),
            "config_hash": tags.get(names.CONFIG_HASH),
            "scoring_id": tags.get(names.SCORING_ID),  # what its scores were measured on (evaluation.scoring_id)
            "twin_reason": tags.get(names.TWIN_REASON),  # took a twin run's training (app.take_twin)
            "trained_as": tags.get(names.TRAINED_AS),
            "pruned": tags.get(names.OPTUNA_PRUNED) == "true",  # stopped by the study's pruner: a partial score
            "dataset": tags.get("data"),  # app.run_tags: the dataset where a run lacks the `data.name` param
            # the arm it trained (conf/arm/): its tag, else the arm= in its run name, else backend and loss
            "arm": run_arm(tags.get(names.ARM), run.info.run_name, run.data.params),
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
            runs = search_runs(client, [by_name[0].experiment_id])
        else:
            runs = search_runs(client, list(exp_names), {names.SWEEP: one})
        for row in _rows(runs, exp_names):
            wanted = row["role"] == "baseline" or all(row.get(f"params.{k}") == v for k, v in (where or {}).items())
            if wanted and row["run_id"] not in seen:
                row["selected"] = True
                seen.add(row["run_id"])
                selected.append(row)

    keys = {r["baseline_key"] for r in selected if r["role"] == "finetune" and r["baseline_key"]}
    extra = []
    if keys:
        baselines = search_runs(client, list(exp_names), {names.ROLE: "baseline"})
        for row in _rows(baselines, exp_names):
            if row["baseline_key"] in keys and row["run_id"] not in seen:
                row["selected"] = False
                extra.append(row)
    return pd.DataFrame(selected + extra)
