"""Models in MLflow: log a job's fine-tuned embedder and its classifier with its support set.

Per job (when `tracking.log_model` asks for it), two logged models in the job's run:
- `embedder`: the fine-tuned SentenceTransformer, MLflow's sentence_transformers flavor;
- `classifier`: a pyfunc (embft/serving/classifier.py, logged as code) = that embedder + the job's
  kNN (eval.k, eval.metric) over a support set embedded from the train split + the label names.
Over a tracking server both upload through its artifact proxy (`mlflow-artifacts:`), so a
worker needs no disk shared with the server. The run gets tag `embft.classifier_uri`, which the
registry (embft.tracking.registry) registers.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from embft import names, sampling
from embft.config import LogModel, choice
from embft.errors import EmbftError

log = logging.getLogger(__name__)

INPUT_EXAMPLE = pd.DataFrame({"text": ["Stocks rallied after the central bank held rates steady."]})


def _pins(*packages: str) -> list[str]:
    """Explicit pip requirements (exact installed versions): MLflow's inference would load the
    model in a subprocess to find them, slowly, and may guess wrong for a local build (torch+cpu)."""
    pins = []
    for package in packages:
        version = metadata.version(package).split("+")[0]
        pins.append(f"{package}=={version}")
    return pins


def support_set(train: pd.DataFrame, per_class: Optional[int], seed: int) -> pd.DataFrame:
    """The classifier's support rows: all of `train` (per_class None) or up to `per_class` rows
    of each label, sampled with `seed`; order kept so the same arguments give the same rows."""
    if per_class is None:
        return train[["text", "label"]].reset_index(drop=True)
    if per_class < 1:
        raise EmbftError(
            f"tracking.support_per_class={per_class}: use a positive number, or null for the whole train split."
        )
    return sampling.per_class(train, per_class, seed)


def support_source(splits: Any, cfg: Any) -> pd.DataFrame:
    """The rows a job's support set is drawn from: the train split, or with tracking.support_from_training
    the labelled texts its trainer read."""
    if not cfg.tracking.support_from_training:
        return splits.train
    from embft.training.labelled import budget_rows

    return budget_rows(splits.train, cfg.train)


def support_rows(splits: Any, cfg: Any) -> pd.DataFrame:
    """The served classifier's support set for a job (tracking.support_per_class, support_from_training)."""
    return support_set(support_source(splits, cfg), cfg.tracking.support_per_class, cfg.eval.seed)


def embed(model: Any, texts: Sequence[str], batch_size: int) -> np.ndarray:
    return model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True)


def classifier_signature(label_names: Sequence[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from embft.serving.classifier import score_column

    outputs = [ColSpec("long", "label"), ColSpec("string", "label_name")]
    outputs += [ColSpec("double", score_column(n)) for n in label_names]
    # MLflow checks the column and its type before predict(); KnnClassifier.predict refuses what
    # this cannot say (null, empty or whitespace-only texts, a number MLflow let through, > MAX_ROWS).
    return ModelSignature(inputs=Schema([ColSpec("string", "text", required=True)]), outputs=Schema(outputs))


def log_models(
    model_dir: Path,
    train: pd.DataFrame,
    label_names: Sequence[str],
    *,
    k: int,
    metric: str,
    support_per_class: Optional[int],
    seed: int,
    batch_size: int = 64,
    classifier: str = "knn",
) -> str:
    """Log `embedder` and `classifier` (kNN or logistic regression over the support set, `classifier`)
    into the active run; return the classifier's model URI."""
    import mlflow
    from mlflow.models import infer_signature
    from sentence_transformers import SentenceTransformer

    from embft.encoding.export import SERVE_PACKAGES, load_served, serve_spec

    # On the CPU, where a served model usually runs: the support set's vectors are those it computes.
    embedder = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    example = INPUT_EXAMPLE["text"].tolist()
    mlflow.sentence_transformers.log_model(
        embedder,
        name="embedder",
        signature=infer_signature(example, embed(embedder, example, batch_size)),
        input_example=example,
        pip_requirements=_pins("sentence-transformers", "transformers", "torch"),
    )
    support = support_set(train, support_per_class, seed)
    missing = sorted(set(range(len(label_names))) - set(support["label"]))
    if missing:
        log.warning("The classifier's support set has no rows of label(s) %s: it never predicts them", missing)
    with tempfile.TemporaryDirectory() as tmp:
        support_file = Path(tmp) / "support.npz"
        np.savez(  # with the backend the folder is served with (embft.encoding.export), as the job scored it
            support_file,
            embeddings=embed(load_served(model_dir), support["text"], batch_size),
            labels=support["label"].to_numpy(dtype=np.int64),
        )
        info = mlflow.pyfunc.log_model(
            name="classifier",
            python_model=str(Path(__file__).with_name("classifier.py")),
            artifacts={"embedder": str(model_dir), "support": str(support_file)},
            model_config={
                "classifier": str(classifier),
                "k": int(k),
                "metric": str(metric),
                "label_names": list(label_names),
                "batch_size": int(batch_size),
            },
            signature=classifier_signature(label_names),
            input_example=INPUT_EXAMPLE,
            pip_requirements=_pins(
                "mlflow",
                "sentence-transformers",
                "transformers",
                "torch",
                "scikit-learn",
                "pandas",
                "numpy",
                *SERVE_PACKAGES.get(serve_spec(model_dir)["backend"], ()),
            ),
        )
    mlflow.set_tags({names.CLASSIFIER_URI: info.model_uri, names.SUPPORT_ROWS: str(len(support))})
    log.info(
        "Logged the embedder and the %s classifier (%d support rows): %s", classifier, len(support), info.model_uri
    )
    return info.model_uri


def is_best_so_far(metric: str) -> bool:
    """For log_model=best: does the active run beat (or tie) every FINISHED run of its study or
    sweep on `metric` (embft.tracking.registry's rule)? The final best always does when it runs, so it
    always gets its model; an earlier leader logs too (a few extra models), which spares keeping every
    job's folder (on every worker's disk) until the sweep ends."""
    import mlflow

    from embft.tracking.registry import is_best_so_far as leads

    run = mlflow.MlflowClient().get_run(mlflow.active_run().info.run_id)
    if metric not in run.data.metrics:
        log.warning("tracking.log_model=best: this run has no %s yet; logging its model anyway", metric)
    return leads(run, metric)


def log_job_models(model_dir: Path, splits: Any, cfg: Any) -> Optional[str]:
    """Called inside the job's run after its metrics are logged, before the model folder is removed.

    Returns the classifier's URI, or None when `tracking.log_model` says not to log."""
    from embft.tracking.registry import objective_metric

    mode = cfg.tracking.log_model
    mode = str(choice(LogModel, mode, "tracking.log_model"))
    if mode == "none":
        return None
    metric = objective_metric(cfg)
    if mode == "best" and not is_best_so_far(metric):
        log.info("Not logging the model: its %s trails a finished run of this sweep (tracking.log_model=best)", metric)
        return None
    return log_models(
        Path(model_dir),
        support_source(splits, cfg),
        splits.label_names,
        k=cfg.eval.k,
        metric=cfg.eval.metric,
        support_per_class=cfg.tracking.support_per_class,
        seed=cfg.eval.seed,
        batch_size=cfg.eval.batch_size,
        classifier=str(cfg.tracking.classifier),
    )
