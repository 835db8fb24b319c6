"""The deployed classifier, measured: what each classifier a job can log (embft.serving) scores on the
job's validation and test rows, computed as the served model computes it, with the backend it is served
with (tracking.serve_backend) and with torch fp32 beside it; and its texts per second, in-process with
the served code (the pyfunc model itself) on fixed validation texts."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from embft import names

SPEED_TEXTS = 64  # validation texts timed one per call (after one warm-up call), and in batches of SERVE_BATCH


def served_scores(model_dir: Path, splits: Any, cfg: Any) -> dict[str, float]:
    """What each classifier `tracking.classifier` can log would score end to end on the job's validation and
    test rows: the embedder loaded as the served model loads it (CPU, the folder's own settings and exported
    backend), texts cut as it cuts them, the same support set and the same fitted classifier code
    (embft.serving.classifier.make_classifier). Metrics `served_accuracy_<kind>` (the served backend) and
    `served_fp32_accuracy_<kind>` (torch fp32), each also `val_`."""
    from sentence_transformers import SentenceTransformer

    from embft.encoding.export import load_served, serve_spec

    out = _scores(load_served(model_dir), splits, cfg, names.served_accuracy)
    if serve_spec(model_dir)["backend"] == "torch":  # the served model is the fp32 one
        fp32 = {k.replace("served_accuracy", "served_fp32_accuracy"): v for k, v in out.items()}
    else:
        torch_fp32 = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
        fp32 = _scores(torch_fp32, splits, cfg, names.served_fp32_accuracy)
    return {**out, **fp32}


def _scores(embedder: Any, splits: Any, cfg: Any, name: Any) -> dict[str, float]:
    from embft.config import ServedClassifier
    from embft.evaluation.classification import eval_rows
    from embft.serving.classifier import TEXT_CHARS_PER_TOKEN, make_classifier, predict_labels
    from embft.serving.models import embed, support_rows

    length = embedder.max_seq_length  # a static model (math.inf) reads every token: cut as the pyfunc does
    max_chars = TEXT_CHARS_PER_TOKEN * (length if isinstance(length, int) and length else 512)
    batch = cfg.eval.batch_size
    support = support_rows(splits, cfg)
    vectors = embed(embedder, support["text"], batch)
    fitted = {
        kind.value: make_classifier(kind.value, cfg.eval.k, str(cfg.eval.metric)).fit(
            vectors, support["label"].to_numpy()
        )
        for kind in ServedClassifier
    }
    out = {}
    for split, prefix in (("test", ""), ("validation", names.VALIDATION_PREFIX)):
        rows = eval_rows(splits, split, cfg.eval)
        vectors = embed(embedder, [t[:max_chars] for t in rows["text"]], batch)
        for kind, classifier in fitted.items():
            labels, _ = predict_labels(classifier, vectors, len(splits.label_names))
            out[prefix + name(kind)] = float(np.mean(labels == rows["label"].to_numpy()))
    return out


def serve_speed(model_dir: Path, splits: Any, cfg: Any) -> dict[str, float]:
    """Texts per second of the served classifier (embft.serving.classifier.KnnClassifier, loaded from the
    model folder as MLflow loads it, with tracking.classifier over the job's support set) on the first
    SPEED_TEXTS validation texts: one text per predict call, and SERVE_BATCH texts per call. In this
    process, on its threads (torch's and ONNX Runtime's defaults: one per core)."""
    import pandas as pd

    from embft.encoding.export import load_served
    from embft.evaluation.classification import eval_rows
    from embft.serving.classifier import KnnClassifier
    from embft.serving.models import embed, support_rows

    texts = eval_rows(splits, "validation", cfg.eval)["text"].tolist()[:SPEED_TEXTS]
    texts = (texts * (SPEED_TEXTS // max(len(texts), 1) + 1))[:SPEED_TEXTS]
    model = KnnClassifier()
    support = support_rows(splits, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        support_file = Path(tmp) / "support.npz"
        np.savez(
            support_file,
            embeddings=embed(load_served(model_dir), support["text"], cfg.eval.batch_size),
            labels=support["label"].to_numpy(dtype=np.int64),
        )
        context = SimpleNamespace(
            artifacts={"embedder": str(model_dir), "support": str(support_file)},
            model_config={
                "classifier": str(cfg.tracking.classifier),
                "k": int(cfg.eval.k),
                "metric": str(cfg.eval.metric),
                "label_names": list(splits.label_names),
                "batch_size": int(cfg.eval.batch_size),
            },
        )
        model.load_context(context)
    frames = [pd.DataFrame({"text": [t]}) for t in texts]
    batches = [
        pd.DataFrame({"text": texts[i : i + names.SERVE_BATCH]}) for i in range(0, SPEED_TEXTS, names.SERVE_BATCH)
    ]
    model.predict(None, frames[0])  # warm-up: the first call allocates
    start = time.perf_counter()
    for frame in frames:
        model.predict(None, frame)
    one = len(frames) / (time.perf_counter() - start)
    start = time.perf_counter()
    for frame in batches:
        model.predict(None, frame)
    batched = SPEED_TEXTS / (time.perf_counter() - start)
    return {names.SERVE_TPS_ONE: one, names.SERVE_TPS_BATCH: batched}
