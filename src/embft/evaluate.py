"""Evaluation: an MTEB classification task over the job's splits, scored by a sklearn kNN."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from embft.data import Splits

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    accuracy: float
    accuracy_std: float
    f1: float
    n_test: int
    scores: dict[str, Any]  # MTEB's scores for the test split, per experiment included

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=float)

    @classmethod
    def from_json(cls, text: str) -> "EvalResult":
        return cls(**json.loads(text))


def metric_name(eval_cfg: Any) -> str:
    """`accuracy_cosine` for the study's kNN; the name says which classifier produced it."""
    return f"accuracy_{eval_cfg.metric}" if eval_cfg.method == "knn" else f"accuracy_{eval_cfg.method}"


def _evaluator_model(eval_cfg: Any):
    # MTEB 2.x dropped method="kNN-pytorch": a task's evaluator_model is any sklearn classifier.
    if eval_cfg.method == "knn":
        from sklearn.neighbors import KNeighborsClassifier

        return KNeighborsClassifier(n_neighbors=eval_cfg.k, metric=eval_cfg.metric, algorithm="brute")
    if eval_cfg.method == "logreg":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=100)
    raise ValueError(f"eval.method={eval_cfg.method!r}: choose knn or logreg")


def cap_test(test: pd.DataFrame, max_rows: Optional[int], seed: int) -> pd.DataFrame:
    """A class-stratified sample of at most `max_rows` test rows (all rows when None)."""
    if max_rows is None or len(test) <= max_rows:
        return test
    frac = max_rows / len(test)
    sample = test.groupby("label", group_keys=False).sample(frac=frac, random_state=seed)
    return sample.sort_index().reset_index(drop=True)


def make_task(splits: Splits, eval_cfg: Any, dataset_name: str):
    """An AbsTaskClassification whose data is already in memory (no Hub access)."""
    import datasets
    from mteb.abstasks.classification import AbsTaskClassification
    from mteb.abstasks.task_metadata import TaskMetadata

    test = cap_test(splits.test, eval_cfg.max_test_rows, eval_cfg.seed)
    dataset = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_pandas(splits.train[["text", "label"]], preserve_index=False),
            "test": datasets.Dataset.from_pandas(test[["text", "label"]], preserve_index=False),
        }
    )

    class EmbftClassification(AbsTaskClassification):
        metadata = TaskMetadata(
            name=f"Embft{dataset_name.title().replace('_', '')}Classification",
            description=f"kNN classification on {splits.source}",
            dataset={"path": splits.source, "revision": splits.fingerprint()},
            reference=None,
            type="Classification",
            category="t2c",
            modalities=["text"],
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            main_score="accuracy",
            date=None,
            domains=None,
            task_subtypes=None,
            license=None,
            annotations_creators=None,
            dialect=None,
            sample_creation=None,
            bibtex_citation=None,
        )
        evaluator_model = _evaluator_model(eval_cfg)
        samples_per_label = eval_cfg.samples_per_label
        n_experiments = eval_cfg.n_experiments

        def load_data(self, **kwargs: Any) -> None:
            self.dataset = dataset
            self.data_loaded = True

    task = EmbftClassification(seed=eval_cfg.seed)
    task.load_data()
    return task


def evaluate(model: Any, splits: Splits, eval_cfg: Any, dataset_name: str) -> EvalResult:
    """Run the MTEB task on a SentenceTransformer (MTEB's result cache off)."""
    import mteb

    task = make_task(splits, eval_cfg, dataset_name)
    n_test = len(task.dataset["test"])
    log.info("Evaluating on %d test texts (%s, %d experiments)", n_test, metric_name(eval_cfg), eval_cfg.n_experiments)
    result = mteb.evaluate(
        model,
        task,
        cache=None,
        overwrite_strategy="always",
        encode_kwargs={"batch_size": eval_cfg.batch_size},
        show_progress_bar=True,
    )
    scores = result.task_results[0].scores["test"][0]
    per_experiment = [float(s["accuracy"]) for s in scores["scores_per_experiment"]]
    return EvalResult(
        accuracy=float(scores["accuracy"]),
        accuracy_std=float(np.std(per_experiment)),
        f1=float(scores["f1"]),
        n_test=n_test,
        scores=json.loads(json.dumps(scores, default=float)),
    )


def baseline_key(model_id: dict[str, Any], splits: Splits, eval_cfg: Any) -> str:
    """Identifies an untrained model's score: model, data content and eval settings."""
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(eval_cfg, resolve=True) if not isinstance(eval_cfg, dict) else eval_cfg
    payload = json.dumps({"model": model_id, "data": splits.fingerprint(), "eval": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cached_baseline(cache_dir: Path, key: str, compute) -> tuple[EvalResult, bool]:
    """The cached baseline for `key`, else `compute()` stored atomically; returns (result, hit)."""
    path = cache_dir / "baseline" / f"{key}.json"
    if path.is_file():
        try:
            result = EvalResult.from_json(path.read_text())
            log.info("Baseline: cache hit %s (accuracy %.4f)", path.name, result.accuracy)
            return result, True
        except (ValueError, TypeError) as err:  # a corrupt cache file is rebuilt, never trusted
            log.warning("Baseline cache %s is unreadable (%s); recomputing", path, err)
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(result.to_json())
    os.replace(tmp, path)
    return result, False
