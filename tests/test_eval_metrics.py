"""Metrics for imbalanced data: macro-F1, per-class precision/recall/F1 and the confusion matrix
(checked against sklearn and against MTEB's own accuracy), several classifiers from one encoding,
and the names they are logged under."""

import json

import numpy as np
import pandas as pd
import pytest

from embft.config import EvalConfig
from embft.encoding.encoders import EncodeSettings, build_encoder
from embft.evaluation.classification import EvalResult, evaluate
from embft.evaluation.per_class import class_names, confusion, log_class_artifacts, per_class_table

Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2, 1, 0, 2]
Y_PRED = [0, 1, 0, 1, 2, 2, 2, 0, 2, 1, 0, 1]  # every class confused at least once


def test_per_class_table_and_confusion_match_sklearn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    matrix = confusion(Y_TRUE, Y_PRED, 4)  # class 3 never occurs: a zero row and column
    assert matrix.tolist() == confusion_matrix(Y_TRUE, Y_PRED, labels=[0, 1, 2, 3]).tolist()
    table = per_class_table(matrix, ["World: news", "Sports: games", "Business: money", "Sci/Tech: chips"])
    assert list(table["classes"]) == ["World", "Sports", "Business", "Sci/Tech"]
    p, r, f, s = precision_recall_fscore_support(Y_TRUE, Y_PRED, labels=[0, 1, 2, 3], zero_division=0)
    for i, row in enumerate(table["classes"].values()):
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
    assert table["accuracy"] == pytest.approx(accuracy_score(Y_TRUE, Y_PRED))
    assert table["macro_f1"] == pytest.approx(f1_score(Y_TRUE, Y_PRED, labels=[0, 1, 2, 3], average="macro"))
    assert class_names(["a: x"], 3) == ["a", "1", "2"]


# --- several classifiers from one encoding ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory):
    from conftest import make_tiny_bert
    from embft.encoding.model_folder import save_sentence_transformer

    root = tmp_path_factory.mktemp("tiny")
    save_sentence_transformer(make_tiny_bert(root / "bare"), root / "model", "mean", True)
    return build_encoder(str(root / "model"), "mean", True, EncodeSettings(max_seq_length=32))


def imbalanced_splits():
    """Three classes, one rare, with overlapping words so that the classifiers make mistakes."""
    from embft.data import Splits

    rng = np.random.default_rng(0)
    words = {0: ["stocks", "market", "bank"], 1: ["match", "goal", "team"], 2: ["chip", "phone"]}

    def frame(n_per_class, tag):
        rows = [
            {"text": f"{rng.choice(words[c])} {rng.choice(words[(c + 1) % 3])} {tag} {i}", "label": c}
            for c, n in enumerate(n_per_class)
            for i in range(n)
        ]
        return pd.DataFrame(rows)

    return Splits(
        train=frame((20, 16, 8), "train"),
        test=frame((10, 8, 4), "test"),
        validation=frame((6, 5, 3), "val"),
        label_names=["Business: money", "Sports: games", "Tech: gadgets"],
        source="tiny",
    )


def counting(model):
    """The texts `model` is asked to encode, in order (every call)."""
    seen, encode = [], model.encode

    def counting_encode(sentences, *args, **kwargs):
        seen.extend(sentences)
        return encode(sentences, *args, **kwargs)

    model.encode = counting_encode
    return seen, lambda: setattr(model, "encode", encode)


def test_several_classifiers_score_one_encoding_as_separate_evaluations(tiny_st):
    splits = imbalanced_splits()
    base = dict(samples_per_label=6, n_experiments=3, batch_size=8)
    seen, restore = counting(tiny_st)
    try:
        both = evaluate(tiny_st, splits, EvalConfig(**base, also=["logreg"]), "tiny")
        assert len(seen) == len(set(seen)), "a text was encoded twice across the classifiers"
        scored = set(splits.validation["text"]) | set(splits.test["text"])
        assert scored <= set(seen) and len(seen) <= len(scored) + len(splits.train)
        knn = evaluate(tiny_st, splits, EvalConfig(**base), "tiny")
        logreg = evaluate(tiny_st, splits, EvalConfig(**base, method="logreg"), "tiny")
    finally:
        restore()
    for split in ("validation", "test"):
        assert list(both[split].also) == ["accuracy_logreg"]
        for ours, alone in ((both[split], knn[split]), (both[split].also["accuracy_logreg"], logreg[split])):
            assert (ours.accuracy, ours.f1, ours.accuracy_std) == (alone.accuracy, alone.f1, alone.accuracy_std)
            assert ours.confusion == alone.confusion
        assert not knn[split].also


def test_the_confusion_matrix_holds_the_predictions_mteb_scored(tiny_st):
    """Pooled over experiments (same rows each), its accuracy is MTEB's accuracy and the mean of the
    experiments' sklearn macro-F1 is MTEB's f1 (= f1_macro)."""
    splits = imbalanced_splits()
    result = evaluate(tiny_st, splits, EvalConfig(samples_per_label=6, n_experiments=4, batch_size=8), "tiny")
    for split, rows in (("validation", splits.validation), ("test", splits.test)):
        r = result[split]
        m = np.array(r.confusion)
        assert m.sum() == 4 * len(rows) and m.sum(axis=1).tolist() == [
            4 * n for n in rows["label"].value_counts().sort_index()
        ]
        assert np.trace(m) / m.sum() == pytest.approx(r.accuracy, abs=1e-12)
        per_experiment = [s["f1"] for s in r.scores["scores_per_experiment"]]
        assert r.f1 == pytest.approx(np.mean(per_experiment)) and r.classes == ["Business", "Sports", "Tech"]
    assert not np.array_equal(np.diag(m), m.sum(axis=1)), "the tiny model is perfect: the test checks nothing"


def test_cached_results_keep_matrices_and_other_classifiers(tmp_path):
    from embft.evaluation.classification import cached_baseline

    inner = EvalResult(0.5, 0.0, 0.4, 4, {}, confusion=[[1, 1], [1, 1]], classes=["a", "b"])
    result = {"test": EvalResult(0.75, 0.1, 0.7, 4, {}, [[2, 0], [1, 1]], ["a", "b"], {"accuracy_logreg": inner})}
    cached_baseline(tmp_path, "k", lambda: result)
    assert cached_baseline(tmp_path, "k", lambda: pytest.fail("recomputed")) == (result, True)


# --- names and artifacts ------------------------------------------------------------------------------


def result(acc, f1, also=None):
    also = {"accuracy_logreg": EvalResult(acc - 0.1, 0.0, f1 - 0.1, 4, {})} if also else {}
    return EvalResult(acc, 0.01, f1, 4, {}, [[2, 0], [1, 1]], ["a", "b"], also)


def test_job_metrics_name_every_classifier_and_macro_f1():
    from embft.evaluation.classification import score_metrics

    baseline = {"test": result(0.6, 0.5, True), "validation": result(0.62, 0.52, True)}
    tuned = {"test": result(0.8, 0.7, True), "validation": result(0.82, 0.72, True)}
    m = score_metrics("accuracy_cosine", tuned, baseline)
    assert m["accuracy_cosine"] == 0.8 and m["f1_macro"] == 0.7 == m["f1"] and m["val_f1_macro"] == 0.72
    assert m["baseline_f1_macro"] == 0.5 and m["delta_val_f1_macro"] == pytest.approx(0.2)
    assert m["accuracy_logreg"] == pytest.approx(0.7) and m["val_accuracy_logreg"] == pytest.approx(0.72)
    assert m["baseline_val_accuracy_logreg"] == pytest.approx(0.52) and m["delta_accuracy_logreg"] == pytest.approx(0.2)
    assert m["f1_macro_logreg"] == pytest.approx(0.6) and "val_f1_macro_logreg" in m
    assert "accuracy_logreg_std" in m and "val_accuracy_cosine_std" in m
    untrained = score_metrics("accuracy_cosine", baseline)  # the baseline run's own metrics
    assert untrained["accuracy_cosine"] == 0.6 and untrained["f1_macro_logreg"] == pytest.approx(0.4)
    assert not any(k.startswith(("baseline_", "delta_")) for k in untrained)


def test_class_artifacts_are_logged_by_name(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlflow.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=exp) as run:
        log_class_artifacts(
            {"test": result(0.75, 0.7), "validation": EvalResult(0.5, 0, 0.5, 1, {})}, prefix="baseline_"
        )
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert files == {"baseline_per_class_test.json", "baseline_confusion_matrix_test.png"}  # no matrix, no artifact
    folder = tmp_path / "artifacts" / run.info.run_id / "artifacts"
    table = json.loads((folder / "baseline_per_class_test.json").read_text())
    assert table["classes"]["b"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert (folder / "baseline_confusion_matrix_test.png").read_bytes()[:4] == b"\x89PNG"
