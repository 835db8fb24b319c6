"""The deployed classifier, measured: what each classifier a job can log (embft.serving) scores on the
job's validation and test rows, computed as the served model computes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from embft import names


def served_scores(model_dir: Path, splits: Any, cfg: Any) -> dict[str, float]:
    """What each classifier `tracking.classifier` can log would score end to end on the job's validation and
    test rows: the embedder loaded as the served model loads it (CPU, the folder's own settings), texts cut
    as it cuts them, the same support set and the same fitted classifier code (embft.serving.classifier.make_classifier).
    Metrics `served_accuracy_<kind>` and `val_served_accuracy_<kind>`."""
    from sentence_transformers import SentenceTransformer

    from embft.config import ServedClassifier
    from embft.evaluation.classification import eval_rows
    from embft.serving.classifier import TEXT_CHARS_PER_TOKEN, make_classifier, predict_labels
    from embft.serving.models import embed, support_rows

    embedder = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    max_chars = TEXT_CHARS_PER_TOKEN * (embedder.max_seq_length or 512)
    batch = cfg.eval.batch_size
    support = support_rows(splits, cfg)
    fitted = {
        kind.value: make_classifier(kind.value, cfg.eval.k, str(cfg.eval.metric)).fit(
            embed(embedder, support["text"], batch), support["label"].to_numpy()
        )
        for kind in ServedClassifier
    }
    out = {}
    for split, prefix in (("test", ""), ("validation", names.VALIDATION_PREFIX)):
        rows = eval_rows(splits, split, cfg.eval)
        vectors = embed(embedder, [t[:max_chars] for t in rows["text"]], batch)
        for kind, classifier in fitted.items():
            labels, _ = predict_labels(classifier, vectors, len(splits.label_names))
            out[prefix + names.served_accuracy(kind)] = float(np.mean(labels == rows["label"].to_numpy()))
    return out
