"""Evaluation: an MTEB classification task over the job's splits, scored by a sklearn kNN.

Both sides of a comparison (the untrained baseline and the fine-tuned model) are built by
`embft.encoding.encoders.build_encoder` from one `EncodeSettings`, so a delta never mixes two ways of encoding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from embft import names, sampling
from embft.config import EvalConfig
from embft.data import Splits
from embft.encoding.encoders import EncodeSettings
from embft.errors import EmbftError
from embft.names import score_metric

log = logging.getLogger(__name__)

SPLITS = ("validation", "test")


# Bumped when EvalResult gains what a cached baseline must hold (2: confusion matrices, `also`).
RESULT_FORMAT = 2


@dataclass
class EvalResult:
    accuracy: float
    accuracy_std: float
    # MTEB 2.26's classification `f1`: sklearn's f1_score(average="macro") per experiment, averaged
    # over the experiments (as `accuracy` is), i.e. macro-F1; logged as f1_macro (and f1, as before).
    f1: float
    n_test: int  # rows scored (of the split the result is for)
    scores: dict[str, Any]  # MTEB's scores for the split, per experiment included
    # (true, predicted) counts summed over the experiments, from the predictions MTEB scored.
    confusion: list[list[int]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # the matrix's classes by id, as a person names them
    # The other classifiers of eval.also on the same embeddings, by metric name (accuracy_logreg).
    also: dict[str, EvalResult] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=float)

    @classmethod
    def from_dict(cls, data: dict) -> EvalResult:
        also = {name: cls.from_dict(r) for name, r in data.get("also", {}).items()}
        return cls(**{**data, "also": also})


def metric_name(eval_cfg: EvalConfig) -> str:
    """`accuracy_cosine` for the study's kNN; the name says which classifier produced it."""
    return score_metric(str(eval_cfg.method), str(eval_cfg.metric))


def methods(eval_cfg: EvalConfig) -> list[str]:
    """eval.method first (the job's metric), then eval.also without repeats."""
    out = [str(eval_cfg.method)]
    for method in getattr(eval_cfg, "also", None) or ():
        if str(method) not in out:
            out.append(str(method))
    return out


def score_metrics(
    metric: str, scores: dict[str, EvalResult], baseline: Optional[dict[str, EvalResult]] = None
) -> dict[str, float]:
    """Per split (test unprefixed, validation `val_`): each classifier's accuracy (eval.method's is
    `metric`, eval.also's `accuracy_logreg`, ...) with its std over experiments and its macro-F1
    (`f1_macro`, `f1_macro_logreg`); `f1` too (MTEB's name, kept for earlier runs). With `baseline`,
    `baseline_*` and `delta_*` (tuned minus untrained) beside each accuracy and macro-F1."""
    out: dict[str, float] = {}
    for split, prefix in (("test", ""), ("validation", names.VALIDATION_PREFIX)):
        if split not in scores:
            continue
        tuned, base = scores[split], (baseline or {}).get(split)
        out[f"{prefix}{names.F1}"] = tuned.f1
        scored = [(metric, tuned, base, True)]
        scored += [(m, r, base.also.get(m) if base else None, False) for m, r in tuned.also.items()]
        for m, t, b, primary in scored:
            out[names.std(f"{prefix}{m}")] = t.accuracy_std
            for name, value, base_value in (
                (f"{prefix}{m}", t.accuracy, b.accuracy if b else None),
                (f"{prefix}{names.f1_macro(m, primary)}", t.f1, b.f1 if b else None),
            ):
                out[name] = value
                if base_value is not None:
                    out[names.baseline(name)] = base_value
                    out[names.delta(name)] = value - base_value
    return out


def check_support(splits: Splits, eval_cfg: EvalConfig, dataset_name: str) -> None:
    """Every class needs eval.samples_per_label train rows for the kNN support set: with fewer, MTEB
    quietly samples a smaller, unbalanced set and that class's score means something else."""
    counts = splits.train["label"].value_counts().sort_index()
    short = counts[counts < eval_cfg.samples_per_label]
    if len(short):
        names = [splits.label_names[i].split(":")[0] if i < len(splits.label_names) else i for i in short.index]
        listed = ", ".join(f"{n!r} ({c} rows)" for n, c in zip(names, short))
        raise EmbftError(
            f"data={dataset_name}, split train: class(es) {listed} have fewer rows than "
            f"eval.samples_per_label={eval_cfg.samples_per_label} for the kNN support set; lower "
            f"eval.samples_per_label to {int(short.min())} or add examples."
        )


def _evaluator_model(eval_cfg: EvalConfig, method: Optional[str] = None):
    # MTEB 2.x dropped method="kNN-pytorch": a task's evaluator_model is any sklearn classifier. The
    # served model's factory: a logreg or kNN figure is the same classifier wherever it is computed.
    from embft.serving.classifier import make_classifier

    return make_classifier(str(method or eval_cfg.method), eval_cfg.k, str(eval_cfg.metric))


def cap_test(test: pd.DataFrame, max_rows: Optional[int], seed: int) -> pd.DataFrame:
    """A class-stratified sample of at most `max_rows` rows (all rows when None)."""
    return sampling.capped(test, max_rows, seed)


def eval_rows(splits: Splits, split: str, eval_cfg: EvalConfig) -> pd.DataFrame:
    """The rows of `split` that are scored (capped by eval.max_test_rows / eval.max_validation_rows)."""
    if split == "test":
        return cap_test(splits.test, eval_cfg.max_test_rows, eval_cfg.seed)
    return cap_test(splits.validation, eval_cfg.max_validation_rows, eval_cfg.seed)


def make_task(
    splits: Splits,
    eval_cfg: EvalConfig,
    dataset_name: str,
    which: Sequence[str] = SPLITS,
    method: Optional[str] = None,
):
    """An AbsTaskClassification whose data is already in memory (no Hub access).

    The kNN's support set is sampled from `splits.train` only; `which` are the scored splits;
    `method` the classifier (eval.method by default). Tasks of one dataset share their name, so an
    embedding cache serves each of them. `task.predictions[split]` collects (y_true, y_pred) per
    experiment: the arrays MTEB computes its scores from.
    """
    import datasets
    from mteb.abstasks.classification import AbsTaskClassification
    from mteb.abstasks.task_metadata import TaskMetadata

    frames = {"train": splits.train, **{split: eval_rows(splits, split, eval_cfg) for split in which}}
    dataset = datasets.DatasetDict(
        {name: datasets.Dataset.from_pandas(f[["text", "label"]], preserve_index=False) for name, f in frames.items()}
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
            eval_splits=list(which),
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
        evaluator_model = _evaluator_model(eval_cfg, method)
        samples_per_label = eval_cfg.samples_per_label
        n_experiments = eval_cfg.n_experiments

        def load_data(self, **kwargs: Any) -> None:
            self.dataset = dataset
            self.data_loaded = True
            self.predictions: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

        def evaluate(self, model: Any, split: str = "test", *args: Any, **kwargs: Any) -> Any:
            self._scoring = split  # which split _calculate_scores' predictions belong to
            return super().evaluate(model, split, *args, **kwargs)

        def _calculate_scores(self, y_test: Any, y_pred: Any) -> Any:
            # datasets 4 hands MTEB a lazy Column of labels, which each of sklearn's ~20 input checks
            # per experiment reads row by row through Arrow: ~10 s of a 2,000-row evaluation.
            y_test = np.asarray(y_test)
            self.predictions.setdefault(self._scoring, []).append((y_test, np.asarray(y_pred)))
            return super()._calculate_scores(y_test, y_pred)

    task = EmbftClassification(seed=eval_cfg.seed)
    task.load_data()
    return task


def _result(task: Any, scores: dict, split: str, label_names: list[str], n_classes: int) -> EvalResult:
    from embft.evaluation.per_class import class_names, confusion

    per_experiment = [float(s["accuracy"]) for s in scores["scores_per_experiment"]]
    pooled = sum(confusion(y_true, y_pred, n_classes) for y_true, y_pred in task.predictions[split])
    return EvalResult(
        accuracy=float(scores["accuracy"]),
        accuracy_std=float(np.std(per_experiment)),
        f1=float(scores["f1"]),
        n_test=len(task.dataset[split]),
        scores=json.loads(json.dumps(scores, default=float)),
        confusion=pooled.tolist(),
        classes=class_names(label_names, n_classes),
    )


def evaluate(
    model: Any, splits: Splits, eval_cfg: EvalConfig, dataset_name: str, which: Sequence[str] = SPLITS
) -> dict[str, EvalResult]:
    """Run the MTEB task on a SentenceTransformer (MTEB's result cache off); a result per split, for
    eval.method, with eval.also's classifiers in `EvalResult.also`.

    Every classifier scores the same embeddings: one embedding cache serves the tasks (one per
    classifier, same name, same support-set sampling), so each text is encoded once in all.
    """
    import mteb
    from mteb.models import CachedEmbeddingWrapper, SentenceTransformerEncoderWrapper

    chosen = methods(eval_cfg)
    tasks = {m: make_task(splits, eval_cfg, dataset_name, which, method=m) for m in chosen}
    first = tasks[chosen[0]]
    log.info(
        "Evaluating on %s (%s, %d experiments)",
        ", ".join(f"{len(first.dataset[s])} {s}" for s in which),
        ", ".join(score_metric(m, str(eval_cfg.metric)) for m in chosen),
        eval_cfg.n_experiments,
    )
    n_classes = max(len(splits.label_names), int(splits.train["label"].max()) + 1)
    # MTEB encodes the kNN's support texts once per scored split (and per task); its embedding cache (this
    # call only, this model only) encodes each text once. A new cache says "No existing files found": by design.
    logging.getLogger("mteb.models.cache_wrappers.cache_backends.numpy_cache").setLevel(logging.ERROR)
    by_method: dict[str, dict[str, EvalResult]] = {}
    with tempfile.TemporaryDirectory(prefix="embft-embeddings-") as cache_dir, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(No existing files found|Dimension file not found|Hash collision)")
        cached = CachedEmbeddingWrapper(SentenceTransformerEncoderWrapper(model), cache_dir)
        for method, task in tasks.items():
            result = mteb.evaluate(
                cached,
                task,
                cache=None,
                overwrite_strategy="always",
                encode_kwargs={"batch_size": eval_cfg.batch_size},
                show_progress_bar=True,
            )
            by_method[method] = {
                split: _result(task, result.task_results[0].scores[split][0], split, splits.label_names, n_classes)
                for split in which
            }
        cached.close()
    out = by_method[chosen[0]]
    for method in chosen[1:]:
        for split in which:
            out[split].also[score_metric(method, str(eval_cfg.metric))] = by_method[method][split]
    return out


# The libraries whose code computes a score: a new version may change it, so it is part of the key.
EVAL_LIBRARIES = ("torch", "transformers", "sentence-transformers", "mteb", "scikit-learn")
ONNX_LIBRARIES = ("onnxruntime", "optimum")


def evaluator_versions(settings: EncodeSettings) -> dict[str, str]:
    from importlib import metadata

    packages = EVAL_LIBRARIES + (ONNX_LIBRARIES if settings.backend == "onnx" else ())
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "missing"
    return versions


def baseline_key(
    model_id: dict[str, Any], splits: Splits, eval_cfg: EvalConfig, settings: EncodeSettings, device: str
) -> str:
    """Identifies an untrained model's score: the model (its weights' fingerprint included), the data's
    content, the eval and encode settings, the device and the evaluating libraries' versions; a cached
    score is reused only by a job that would compute the same one."""
    from omegaconf import OmegaConf

    from embft.serving.classifier import LOGREG_MAX_ITER

    cfg = (
        OmegaConf.to_container(eval_cfg, resolve=True, enum_to_str=True) if not isinstance(eval_cfg, dict) else eval_cfg
    )
    key = {
        "model": model_id,
        "data": splits.fingerprint(),
        "eval": cfg,
        "encode": settings.as_dict(),
        "device": device,
        "versions": evaluator_versions(settings),
        "result_format": RESULT_FORMAT,  # a cache without confusion matrices is not reused
    }
    if "logreg" in (str(cfg.get("method")), *map(str, cfg.get("also") or ())):
        key["logreg_max_iter"] = LOGREG_MAX_ITER  # a logreg score fitted with another budget is not reused
    payload = json.dumps(key, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cached_baseline(
    cache_dir: Path, key: str, compute: Callable[[], dict[str, EvalResult]]
) -> tuple[dict[str, EvalResult], bool]:
    """The cached baseline (a result per split) for `key`, else `compute()` stored atomically; (results, hit)."""
    path = cache_dir / "baseline" / f"{key}.json"
    if path.is_file():
        try:
            results = {split: EvalResult.from_dict(r) for split, r in json.loads(path.read_text()).items()}
            log.info(
                "Baseline: cache hit %s (%s)", path.name, ", ".join(f"{s} {r.accuracy:.4f}" for s, r in results.items())
            )
            return results, True
        except (ValueError, TypeError, AttributeError) as err:  # a corrupt cache file is rebuilt, never trusted
            log.warning("Baseline cache %s is unreadable (%s); recomputing", path, err)
    results = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps({split: asdict(r) for split, r in results.items()}, indent=2, default=float))
    os.replace(tmp, path)
    return results, False
