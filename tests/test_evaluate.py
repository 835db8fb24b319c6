"""Evaluation helpers: stratified test cap, metric names, and a baseline cache that heals itself."""

from types import SimpleNamespace

import pandas as pd

from embft.evaluation.classification import EvalResult, cached_baseline, cap_test, metric_name


def test_cap_test_is_stratified_and_deterministic():
    test = pd.DataFrame({"text": [f"t{i}" for i in range(400)], "label": [i % 4 for i in range(400)]})
    capped = cap_test(test, 100, seed=1)
    assert len(capped) == 100 and capped["label"].value_counts().tolist() == [25, 25, 25, 25]
    assert capped.equals(cap_test(test, 100, seed=1))
    assert cap_test(test, None, seed=1) is test


def test_metric_name_says_which_classifier():
    assert metric_name(SimpleNamespace(method="knn", metric="cosine")) == "accuracy_cosine"
    assert metric_name(SimpleNamespace(method="logreg", metric="cosine")) == "accuracy_logreg"


def test_the_evaluation_and_the_served_model_build_the_same_classifier():
    """One factory: accuracy_logreg (MTEB's evaluator) and served_accuracy_logreg differ by support set only."""
    from embft.evaluation.classification import _evaluator_model
    from embft.serving.classifier import LOGREG_MAX_ITER, make_classifier

    cfg = SimpleNamespace(method="knn", k=5, metric="cosine")
    for method in ("knn", "logreg"):
        evaluated, served = _evaluator_model(cfg, method), make_classifier(method, 5, "cosine")
        assert type(evaluated) is type(served) and evaluated.get_params() == served.get_params()
    assert _evaluator_model(cfg, "logreg").max_iter == LOGREG_MAX_ITER
    assert _evaluator_model(cfg).n_neighbors == 5


def test_corrupt_baseline_cache_is_recomputed(tmp_path):
    result = {
        "validation": EvalResult(accuracy=0.5, accuracy_std=0.01, f1=0.4, n_test=10, scores={}),
        "test": EvalResult(accuracy=0.6, accuracy_std=0.01, f1=0.5, n_test=20, scores={}),
    }
    calls = []

    def compute():
        calls.append(1)
        return result

    assert cached_baseline(tmp_path, "k", compute) == (result, False)
    assert cached_baseline(tmp_path, "k", compute) == (result, True)
    (tmp_path / "baseline" / "k.json").write_text('{"accuracy": 0.5, "trunc')
    assert cached_baseline(tmp_path, "k", compute) == (result, False)
    assert len(calls) == 2 and not list((tmp_path / "baseline").glob(".k.*"))
