"""The SetFit anchor's table (setfit_anchor.sh): embft's runs from the project's MLflow store beside the SetFit
paper's published means (all-MiniLM-L6-v2, 8 per class, full test sets, mean over 10 splits)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from embft.config import default_tracking_uri  # noqa: E402

# SetFit's final_results for sentence-transformers/all-MiniLM-L6-v2 at 8 per class (test accuracy, %).
PUBLISHED = {"ag_news": (83.1, 2.3), "emotion": (39.1, None), "sst5": (29.8, None)}


def runs() -> pd.DataFrame:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(default_tracking_uri())
    experiment = client.get_experiment_by_name("setfit_anchor")
    if experiment is None:
        raise SystemExit("no setfit_anchor experiment: run experiments/label_budget/setfit_anchor.sh")
    rows = []
    for run in client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'", max_results=1000):
        if run.data.tags.get("embft.role") != "finetune":
            continue
        m, p = run.data.metrics, run.data.params
        rows.append(
            {
                "data": run.data.tags.get("data"),
                "backend": p.get("train.backend"),
                "seed": p.get("train.seed"),
                "head": m.get("setfit_head_accuracy"),
                "deployed": m.get("served_accuracy_logreg"),
                "knn": m.get("accuracy_cosine"),
                "untrained_knn": m.get("accuracy_cosine", math.nan) - m.get("delta_accuracy_cosine", math.nan),
                "test_rows": float(run.data.tags.get("embft.scoring.test_rows", "nan")),
                "train_s": m.get("train_seconds"),
            }
        )
    return pd.DataFrame(rows)


def table(frame: pd.DataFrame) -> str:
    lines = [
        "| dataset | published SetFit (10 splits) | embft SetFit head | embft supcon, deployed logreg | "
        "SetFit kNN | supcon kNN | untrained kNN | seeds | test rows |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def stat(values: pd.Series) -> str:
        values = values.dropna() * 100
        if values.empty:
            return ""
        return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}" if len(values) > 1 else f"{values.mean():.1f}"

    for data in ("ag_news", "emotion", "sst5"):
        mine = frame[frame["data"] == data]
        setfit, supcon = mine[mine["backend"] == "setfit"], mine[mine["backend"] == "sentence_transformers"]
        mean, spread = PUBLISHED[data]
        published = f"{mean:.1f}" + (f" ± {spread:.1f}" if spread else "")
        lines.append(
            f"| {data} | {published} | {stat(setfit['head'])} | {stat(supcon['deployed'])} | {stat(setfit['knn'])} | "
            f"{stat(supcon['knn'])} | {stat(mine['untrained_knn'].drop_duplicates())} | "
            f"{len(setfit)} / {len(supcon)} | {int(mine['test_rows'].max()) if mine['test_rows'].notna().any() else ''} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(runs()))
