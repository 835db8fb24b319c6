"""Trainer backends side by side: sentence-transformers' losses, supcon, SetFit, and what every run logs
(labelled texts read, classes per batch, the deployable classifiers end to end)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from embft.errors import EmbftError

# ------------------------------------------------------------------------------------ supcon


def _reference_supcon(z: np.ndarray, labels: list[int], t: float) -> float:
    """Khosla et al.'s L_out written out loop by loop."""
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    total, anchors = 0.0, 0
    for a in range(len(z)):
        positives = [p for p in range(len(z)) if p != a and labels[p] == labels[a]]
        if not positives:
            continue
        denom = sum(math.exp(z[a] @ z[k] / t) for k in range(len(z)) if k != a)
        total += -np.mean([math.log(math.exp(z[a] @ z[p] / t) / denom) for p in positives])
        anchors += 1
    return total / anchors


def test_supcon_matches_its_definition_and_takes_no_same_class_text_for_a_negative() -> None:
    from embft.training.sentence_transformers.supcon import supcon_loss

    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 5))
    labels = [0, 0, 1, 1, 2, 0]  # class 2 has no positive: its anchor is left out
    got = supcon_loss(torch.tensor(z), torch.tensor(labels), 0.1).item()
    assert got == pytest.approx(_reference_supcon(z, labels, 0.1), rel=1e-9)
    # Texts of a class at one point, classes orthogonal: far below random embeddings' loss (a same-class
    # text in the denominator would keep it from falling).
    clustered = np.eye(5)[labels] + 1e-3 * rng.normal(size=(6, 5))
    assert supcon_loss(torch.tensor(clustered), torch.tensor(labels), 0.1) < 0.2 * got


def test_supcon_on_a_batch_without_positives_is_zero_with_a_gradient_path() -> None:
    from embft.training.sentence_transformers.supcon import supcon_loss

    z = torch.randn(4, 3, requires_grad=True)
    loss = supcon_loss(z, torch.tensor([0, 1, 2, 3]), 0.1)
    loss.backward()
    assert loss.item() == 0 and torch.all(z.grad == 0)


# -------------------------------------------------------------------------- rows and batches


def _train(n_per_class: dict[int, int]) -> pd.DataFrame:
    rows = [(f"text {label} {i}", label) for label, n in n_per_class.items() for i in range(n)]
    return pd.DataFrame(rows, columns=["text", "label"])


def test_training_texts_are_a_stratified_seeded_sample_with_a_positive_for_every_class() -> None:
    from embft.training.labelled import training_texts

    train = _train({0: 500, 1: 300, 2: 5})
    picked = training_texts(train, 80, seed=3)
    counts = picked["label"].value_counts().to_dict()
    assert counts[0] == 50 and counts[1] == 30 and counts[2] == 2  # shares, and >= 2 for the rare class
    assert set(picked["text"]) <= set(train["text"])
    assert picked.equals(training_texts(train, 80, seed=3))
    assert not picked.equals(training_texts(train, 80, seed=4))
    assert len(training_texts(train, None, seed=3)) == len(train)


def test_contrastive_pairs_hold_one_same_class_and_one_other_class_partner_per_text() -> None:
    from embft.training.sentence_transformers.trainer import pair_rows

    rows = _train({0: 4, 1: 3})
    pairs = pair_rows(rows, seed=0)
    label_of = dict(zip(rows["text"], rows["label"]))
    assert len(pairs) == 2 * len(rows)
    for first, second, same in pairs.itertuples(index=False):
        assert first != second and same == int(label_of[first] == label_of[second])


def test_the_label_grouped_batches_hold_several_classes(tmp_path) -> None:
    """sentence-transformers 2920 / 3668 / 4013: a label-grouped sampler once gave one-class batches."""
    import datasets
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    from conftest import make_tiny_bert
    from embft.encoding.model_folder import sentence_transformer
    from embft.training.sentence_transformers.trainer import classes_per_batch

    model = sentence_transformer(str(make_tiny_bert(tmp_path / "tiny")), "mean", True, 16, "cpu")
    data = datasets.Dataset.from_pandas(_train({0: 40, 1: 30, 2: 10, 3: 4}))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        batch_sampler=BatchSamplers.GROUP_BY_LABEL,
        dataloader_drop_last=True,
        report_to="none",
        use_cpu=True,
    )
    from embft.training.sentence_transformers.supcon import SupConLoss

    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=SupConLoss(model))
    seen = classes_per_batch(trainer, data)
    assert seen["train_min_classes_per_batch"] >= 2 and 2 <= seen["train_classes_per_batch"] <= 4


# ------------------------------------------------------------------------------ config checks


@pytest.fixture(scope="module")
def refusals_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("refusals")  # one store for the cases: opened once


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (
            ["train=sentence_transformers", "train.loss=stock"],
            "train.loss=stock: train.backend=sentence_transformers takes",
        ),
        (["train.loss=supcon"], "train.loss=supcon: train.backend=flagembedding takes stock or groupwise"),
        (
            ["train=sentence_transformers", "train.loss=batch_hard_triplet", "train.per_device_train_batch_size=5"],
            "needs an even batch of at least 4",
        ),
        (["train=sentence_transformers", "train.margin=0.3"], "train.loss=supcon has no margin"),
        (["train=setfit", "train.loss=supcon"], "train.backend=setfit trains with cosine_similarity"),
        (["train=setfit", "train.nproc_per_node=2"], "trains in one process here"),
    ],
)
def test_a_loss_a_backend_cannot_train_fails_in_one_line(compose, overrides, expected, refusals_root) -> None:
    """Through the job itself: one line, and nothing read, encoded, trained or scored (the data would be the
    Hub's AG News and the model a package, neither of which this offline test could reach)."""
    from embft.app import run_job

    cfg = compose(overrides, root=refusals_root)
    with pytest.raises(EmbftError, match=expected.replace("(", r"\(").replace(")", r"\)")) as err:
        run_job(cfg)
    assert "\n" not in str(err.value)
    assert not list((refusals_root / "out").rglob("model")), "no model folder"
    assert not [p for p in Path(cfg.paths.cache_dir).rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    store = refusals_root / "mlruns" / "mlflow.db"
    if store.exists():  # the store may be opened first; it holds no score and no finished run
        client = MlflowClient(f"sqlite:///{store}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert all(r.info.status == "FAILED" and not r.data.metrics for r in runs), runs


def test_a_margin_reaches_the_loss_and_null_keeps_the_librarys_default(compose) -> None:
    from sentence_transformers import losses

    from embft.training.sentence_transformers.losses import LOSSES

    cfg = compose(["train=sentence_transformers", "train.loss=batch_hard_triplet", "train.margin=0.25"])
    assert LOSSES["batch_hard_triplet"].build(object(), cfg.train).triplet_margin == 0.25
    cfg = compose(["train=sentence_transformers", "train.loss=batch_hard_triplet"])
    default = losses.BatchHardTripletLoss.__init__.__defaults__[-1]
    assert LOSSES["batch_hard_triplet"].build(object(), cfg.train).triplet_margin == default


def test_the_new_fields_leave_an_existing_jobs_config_hash_alone(compose) -> None:
    """train.margin at null is hash-neutral: rerunning an older study still skips its finished jobs."""
    from embft.config import to_container
    from embft.tracking.mlflow_runs import config_hash

    resolved = to_container(compose([]))
    older = {**resolved, "train": {k: v for k, v in resolved["train"].items() if k != "margin"}}
    assert config_hash(resolved) == config_hash(older)
    assert config_hash({**resolved, "train": {**resolved["train"], "margin": 0.2}}) != config_hash(resolved)


# ------------------------------------------------------------------------------------ jobs


def _job(compose, tmp_path, overrides):
    from conftest import make_tiny_bert
    from test_data import synthetic, write

    model = make_tiny_bert(tmp_path / "tiny")
    folder = write(tmp_path / "data", synthetic(n_per_class=24), synthetic(seed=1))
    return compose(
        [
            "experiment=smoke",
            "model.package=null",
            f"model.name_or_path={model}",
            f"data.local_dir={folder}",
            "eval.max_seq_length=32",
            "train.max_train_queries=24",
            "tracking.log_model=all",
            *overrides,
        ]
    )


def _finetune_run(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("smoke").experiment_id
    (run,) = [r for r in client.search_runs([exp]) if r.data.tags["embft.role"] == "finetune"]
    return client, run


def _sklearn_accuracy(classifier, embedder, fit_rows, rows) -> float:
    """An independent measurement: sklearn's classifier fitted on `fit_rows`' embeddings, scored on `rows`."""
    fitted = classifier.fit(embedder.encode(fit_rows["text"].tolist()), fit_rows["label"].to_numpy())
    return float((fitted.predict(embedder.encode(rows["text"].tolist())) == rows["label"].to_numpy()).mean())


def _served_accuracy(client, run, splits, cfg) -> float:
    """The logged classifier, loaded back from the store, on the job's validation rows."""
    import mlflow

    from embft.evaluation.classification import eval_rows

    rows = eval_rows(splits, "validation", cfg.eval)
    model = mlflow.pyfunc.load_model(run.data.tags["embft.classifier_uri"])
    return float((model.predict(rows[["text"]])["label"].to_numpy() == rows["label"].to_numpy()).mean())


@pytest.mark.slow
def test_a_sentence_transformers_job_logs_what_it_read_and_what_its_served_classifier_scores(compose, tmp_path):
    from embft.app import run_job
    from embft.data import load_splits

    cfg = _job(
        compose,
        tmp_path,
        ["train=sentence_transformers", "train.per_device_train_batch_size=8", "tracking.classifier=logreg"],
    )
    value = run_job(cfg)
    client, run = _finetune_run(tmp_path)
    m = run.data.metrics
    assert run.info.status == "FINISHED" and value == m["val_accuracy_cosine"]
    assert m["train_labelled_texts"] == 24 and m["train_min_classes_per_batch"] >= 2
    assert "setfit_head_accuracy" not in m
    # What MLflow shows for the served classifier is what the logged model predicts (logreg here).
    splits = load_splits(cfg.data)
    assert _served_accuracy(client, run, splits, cfg) == pytest.approx(m["val_served_accuracy_logreg"], abs=1e-9)
    # The served kNN, against sklearn's on the logged embedder: the support set is the whole train split
    # (24 a class, under tracking.support_per_class), k and the metric are the job's.
    import mlflow
    from sklearn.neighbors import KNeighborsClassifier

    from embft.evaluation.classification import eval_rows

    embedder = mlflow.sentence_transformers.load_model(f"runs:/{run.info.run_id}/embedder")
    assert splits.train["label"].value_counts().max() <= cfg.tracking.support_per_class
    for split, prefix in (("validation", "val_"), ("test", "")):
        knn = KNeighborsClassifier(n_neighbors=cfg.eval.k, metric=str(cfg.eval.metric), algorithm="brute")
        expected = _sklearn_accuracy(knn, embedder, splits.train, eval_rows(splits, split, cfg.eval))
        assert m[f"{prefix}served_accuracy_knn"] == pytest.approx(expected, abs=1e-9), split


@pytest.mark.slow
def test_a_setfit_job_scores_its_body_by_knn_and_its_head_apart(compose, tmp_path):
    import mlflow
    from sklearn.linear_model import LogisticRegression

    from embft.app import run_job
    from embft.data import load_splits
    from embft.evaluation.classification import eval_rows
    from embft.training.labelled import training_texts

    # Trained at 6 tokens, evaluated at 32: the synthetic texts (~10 tokens) are cut in training only.
    # train.num_iterations=3: the SetFit paper's pair generation, 3 positive and 3 negative pairs per text.
    overrides = ["train=setfit", "train.per_device_train_batch_size=8", "train.max_train_queries=8"]
    cfg = _job(compose, tmp_path, [*overrides, "train.query_max_len=6", "train.num_iterations=3"])
    run_job(cfg)
    _, run = _finetune_run(tmp_path)
    m = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.params["train.backend"] == "setfit"
    assert m["train_labelled_texts"] == 8 and m["train_queries"] == 3 * 2 * 8  # SetFit trains on pairs of them
    # The head, against SetFit's default head (sklearn's LogisticRegression) fitted on the trained body's
    # embeddings of the 8 labelled texts it read, at the evaluation's length, scored on the same rows.
    body = mlflow.sentence_transformers.load_model(f"runs:/{run.info.run_id}/embedder")
    assert body.max_seq_length == cfg.eval.max_seq_length
    splits = load_splits(cfg.data)
    read = training_texts(splits.train, cfg.train.max_train_queries, cfg.train.seed)
    for split, prefix in (("validation", "val_"), ("test", "")):
        expected = _sklearn_accuracy(LogisticRegression(), body, read, eval_rows(splits, split, cfg.eval))
        assert m[f"{prefix}setfit_head_accuracy"] == pytest.approx(expected, abs=1e-9), split


@pytest.mark.slow
def test_live_scores_and_pruning_reach_a_sentence_transformers_job(compose, tmp_path):
    """The same callback as FlagEmbedding's: live validation scores by step, on the shared weights."""
    from embft.app import run_job

    cfg = _job(
        compose,
        tmp_path,
        [
            "train=sentence_transformers",
            "train.per_device_train_batch_size=8",
            "train.num_train_epochs=2",
            "eval.every_steps=2",
        ],
    )
    run_job(cfg)
    client, run = _finetune_run(tmp_path)
    history = client.get_metric_history(run.info.run_id, "live_val_accuracy_cosine")
    assert [h.step for h in history] == [2, 4, 6]  # 24 texts / 8 = 3 steps an epoch, 2 epochs
    assert all(0 <= h.value <= 1 for h in history)
    # the last live score is the trained model's, scored as the final evaluation scores it
    assert history[-1].value == pytest.approx(run.data.metrics["val_accuracy_cosine"], abs=1e-6)


def test_flagembeddings_labelled_texts_count_every_text_its_records_read(compose, tmp_path) -> None:
    """100 query records read the labels of their positives and negatives too: that is the labelling cost."""
    import json
    from types import SimpleNamespace

    from embft.data import Splits
    from embft.training.flagembedding.trainer import FlagEmbeddingTrainer

    train = _train({0: 60, 1: 60, 2: 60})
    splits = Splits(train=train, test=train.head(3), label_names=["a", "b", "c"], source="test")
    cfg = compose(["train.max_train_queries=10", "train.train_group_size=4"])
    ctx = SimpleNamespace(cfg=cfg, splits=splits, cache_dir=tmp_path / "cache", encode=None, model_key="m")
    prepared = FlagEmbeddingTrainer().prepare(ctx)
    records = [json.loads(line) for line in (prepared.data / "train.jsonl").read_text().splitlines()]
    texts = {t for r in records for t in [r["query"], *r["pos"], *r["neg"]]}
    assert prepared.n_queries == 10 and prepared.labelled_texts == len(texts)
    assert 10 < prepared.labelled_texts <= 10 * 5  # a query, a positive and 3 negatives each, some shared


def test_setfits_head_is_scored_at_the_evaluations_length_like_every_other_classifier() -> None:
    from types import SimpleNamespace

    from embft.training.setfit.trainer import _predict_at

    seen = []
    body = SimpleNamespace(max_seq_length=64)
    model = SimpleNamespace(
        model_body=body, predict=lambda texts, as_numpy: seen.append(body.max_seq_length) or [0] * len(texts)
    )
    assert list(_predict_at(model, ["a", "b"], 256)) == [0, 0]
    assert seen == [256] and body.max_seq_length == 64  # the body is left at its training length


def test_setfits_head_is_fitted_at_the_evaluations_length_on_the_texts_it_read() -> None:
    from types import SimpleNamespace

    from embft.training.setfit.trainer import _fit_head_at

    fitted = []
    body = SimpleNamespace(max_seq_length=64)
    model = SimpleNamespace(
        model_body=body, fit=lambda texts, labels, **kw: fitted.append((body.max_seq_length, texts, labels))
    )
    _fit_head_at(model, pd.DataFrame({"text": ["a", "b"], "label": [1, 0]}), 256)
    assert fitted == [(256, ["a", "b"], [1, 0])] and body.max_seq_length == 64


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_live_scores_encode_as_the_final_evaluation_does(tmp_path, precision) -> None:
    """eval.every_steps scores the model in training with the evaluation's encoder: its length and its
    precision (bf16 autocast under eval.precision=bf16), for the single-text backends and FlagEmbedding."""
    from types import SimpleNamespace

    from conftest import make_tiny_bert
    from embft.encoding.encoders import EncodeSettings, build_encoder, describe_encoder
    from embft.encoding.model_folder import sentence_transformer
    from embft.training.common import live_view
    from embft.training.flagembedding.trainer import FlagEmbeddingTrainer

    path = str(make_tiny_bert(tmp_path / "tiny"))
    settings = EncodeSettings(precision=precision, max_seq_length=48)
    model = SimpleNamespace(pooling="mean", normalize=True)
    ctx = SimpleNamespace(cfg=SimpleNamespace(model=model), model_path=path, encode_settings=settings.as_dict())
    final = describe_encoder(build_encoder(path, "mean", True, settings, "cpu"))
    training = sentence_transformer(path, "mean", True, 16, "cpu")  # trained at 16 tokens
    assert describe_encoder(live_view(ctx, training)) == final
    live_fe = FlagEmbeddingTrainer().live_encoder(ctx, SimpleNamespace(model=training[0].auto_model))
    assert describe_encoder(live_fe) == final
