"""What a person reads per class: precision, recall and F1 by class name, and a confusion-matrix picture.

Both come from the confusion matrix pooled over MTEB's experiments (the sum of each experiment's
matrix on the same scored rows), i.e. from the very predictions the accuracy was computed from: its
trace over its total is MTEB's accuracy (the mean over experiments, each scoring the same rows).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def class_names(label_names: list[str], n_classes: int) -> list[str]:
    """The class as a person knows it: the part of data.label_names before ':' ("World: news..." -> World)."""
    names = [name.split(":")[0].strip() for name in label_names[:n_classes]]
    return names + [str(i) for i in range(len(names), n_classes)]


def confusion(y_true: Any, y_pred: Any, n_classes: int) -> np.ndarray:
    """Counts by (true class, predicted class), ids 0..n_classes-1."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return matrix


def per_class_table(matrix: Any, label_names: list[str]) -> dict[str, Any]:
    """{"classes": {name: {precision, recall, f1, support}}, "accuracy", "macro_f1"} from a confusion
    matrix; a class never predicted (or absent) scores 0, as sklearn's zero_division=0."""
    m = np.asarray(matrix, dtype=float)
    tp, predicted, actual = np.diag(m), m.sum(axis=0), m.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    names = class_names(label_names, len(m))
    classes = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(names, precision, recall, f1, actual)
    }
    return {
        "classes": classes,
        "accuracy": float(tp.sum() / m.sum()) if m.sum() else 0.0,
        "macro_f1": float(f1.mean()),
        "note": "pooled over MTEB's experiments (each scores the same rows); f1_macro in the metrics is "
        "MTEB's f1, the mean of each experiment's macro F1",
    }


def confusion_figure(matrix: Any, label_names: list[str], title: str):
    """A matplotlib Figure: rows true class, columns predicted, each cell its count and row share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    names = class_names(label_names, len(m))
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = 1.2 + 0.9 * len(m)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(m)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(m)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(m)):
        for j in range(len(m)):
            ax.text(
                j,
                i,
                f"{m[i, j]}\n{share[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if share[i, j] > 0.5 else "black",
            )
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    return fig


def log_class_artifacts(results: dict[str, Any], prefix: str = "") -> None:
    """Per split: `<prefix>per_class_<split>.json` and `<prefix>confusion_matrix_<split>.png` into the
    active MLflow run (prefix `baseline_` for the untrained model). Results without a matrix (a cache
    written before matrices were kept) log nothing."""
    import matplotlib.pyplot as plt
    import mlflow

    for split, result in results.items():
        if not result.confusion:
            continue
        table = per_class_table(result.confusion, result.classes)
        mlflow.log_dict(table, f"{prefix}per_class_{split}.json")
        who = "untrained model" if prefix else "fine-tuned model"
        fig = confusion_figure(result.confusion, result.classes, f"{who}, {split} ({result.n_test} rows x experiments)")
        mlflow.log_figure(fig, f"{prefix}confusion_matrix_{split}.png")
        plt.close(fig)
