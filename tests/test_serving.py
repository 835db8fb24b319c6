"""Models in MLflow: the logged kNN classifier, log_model=best, the registry's champion, `embft predict`.

A tiny random BERT stands in for the fine-tuned model: what is checked is the plumbing (support
set, kNN settings, label names, aliases), which does not depend on the weights being good.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, make_tiny_bert
from embft import names
from embft.errors import EmbftError
from embft.serving import models as serving
from embft.serving.predict import predict_main
from embft.tracking import mlflow_runs, registry

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
K = 5  # not the default 3: a classifier that ignored the job's k would disagree


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory) -> Path:
    """A saved SentenceTransformer folder (tiny BERT + mean pooling), as train() leaves one."""
    from sentence_transformers import SentenceTransformer, models

    folder = make_tiny_bert(tmp_path_factory.mktemp("bert"))
    word = models.Transformer(str(folder), max_seq_length=64)
    model = SentenceTransformer(
        modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean")], device="cpu"
    )
    out = tmp_path_factory.mktemp("st") / "model"
    model.save(str(out))
    return out


@pytest.fixture(scope="module")
def frames(ag_news_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = pd.read_csv(ag_news_dir / "train.csv", nrows=400)
    test = pd.read_csv(ag_news_dir / "test.csv", nrows=40)
    return rows, test


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    import mlflow

    folder = tmp_path_factory.mktemp("mlruns")
    uri = f"sqlite:///{folder}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment("serving", artifact_location=(folder / "artifacts").as_uri())
    yield uri, experiment_id
    mlflow.set_tracking_uri(previous)


def _cfg(log_model: str = "best", name: str = "embft-test"):
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "tracking": {
                "log_model": log_model,
                "registered_model_name": name,
                "support_per_class": 20,
                "classifier": "knn",
                "support_from_training": False,
            },
            "eval": {"method": "knn", "k": K, "metric": "cosine", "seed": 7, "batch_size": 16},
        }
    )


class _Splits:
    def __init__(self, train: pd.DataFrame):
        self.train, self.label_names = train, LABELS


def _job(experiment_id: str, study: str, score: float, model_dir: Path, train: pd.DataFrame, log_model="best"):
    """A finished fine-tune run of `study` with `score`, through the same hook the app calls."""
    import mlflow

    tags = {names.ROLE: "finetune", "optuna.study_name": study}
    with mlflow_runs.job_run(experiment_id, f"{study}-{score}", tags) as run:
        mlflow.log_metrics({"val_accuracy_cosine": score, "accuracy_cosine": score})  # a best needs validation
        uri = serving.log_job_models(model_dir, _Splits(train), _cfg(log_model))
    return run.info.run_id, uri


def test_support_set_is_a_seeded_per_class_sample(frames) -> None:
    train, _ = frames
    a = serving.support_set(train, 20, seed=7)
    assert a["label"].value_counts().to_dict() == {i: 20 for i in range(4)}
    assert a.equals(serving.support_set(train, 20, seed=7))
    assert not a.equals(serving.support_set(train, 20, seed=8))
    assert len(serving.support_set(train, None, seed=7)) == len(train)
    with pytest.raises(EmbftError, match="support_per_class=0"):
        serving.support_set(train, 0, seed=7)


def test_logged_classifier_predicts_like_sklearn_knn(tiny_st: Path, frames, store) -> None:
    """The classifier loaded back from MLflow == an in-process sklearn kNN over the same support set."""
    import mlflow
    from sentence_transformers import SentenceTransformer
    from sklearn.neighbors import KNeighborsClassifier

    train, test = frames
    _, experiment_id = store
    run_id, uri = _job(experiment_id, "equal", 0.5, tiny_st, train, log_model="all")
    assert mlflow.MlflowClient().get_run(run_id).data.tags[names.CLASSIFIER_URI] == uri

    model = SentenceTransformer(str(tiny_st), device="cpu")
    support = serving.support_set(train, 20, seed=7)
    knn = KNeighborsClassifier(n_neighbors=K, metric="cosine", algorithm="brute")
    knn.fit(serving.embed(model, support["text"], 16), support["label"])
    test_emb = serving.embed(model, test["text"], 16)
    expected, expected_proba = knn.predict(test_emb), knn.predict_proba(test_emb)

    got = mlflow.pyfunc.load_model(uri).predict(test[["text"]])
    assert got["label"].tolist() == expected.tolist()
    assert got["label_name"].tolist() == [LABELS[i] for i in expected]
    np.testing.assert_allclose(got[[f"score_{n}" for n in LABELS]].to_numpy(), expected_proba, atol=1e-12)
    assert got["label"].nunique() > 1  # a model that always said one label would pass too easily

    # The embedder beside it, in MLflow's sentence_transformers flavor, embeds as the folder does.
    embedder = mlflow.sentence_transformers.load_model(f"runs:/{run_id}/embedder")
    np.testing.assert_allclose(embedder.encode(test["text"].tolist()[:4]), test_emb[:4], atol=1e-5)
    reqs = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text()
    assert "sentence-transformers==" in reqs and "scikit-learn==" in reqs  # pinned, not inferred


def test_log_model_best_logs_only_a_leader_and_none_logs_nothing(tiny_st: Path, frames, store) -> None:
    train, _ = frames
    _, experiment_id = store
    assert _job(experiment_id, "best", 0.50, tiny_st, train)[1]
    assert _job(experiment_id, "best", 0.40, tiny_st, train)[1] is None  # trails 0.50
    assert _job(experiment_id, "best", 0.60, tiny_st, train)[1]
    assert _job(experiment_id, "other", 0.10, tiny_st, train)[1]  # another study: leads its own
    assert _job(experiment_id, "best", 0.90, tiny_st, train, log_model="none")[1] is None
    with pytest.raises(EmbftError, match="tracking.log_model=some"):
        serving.log_job_models(tiny_st, _Splits(train), _cfg("some"))


@pytest.mark.slow  # five logged models and a fresh process
def test_registry_champion_moves_only_to_a_better_study(tiny_st: Path, frames, store, tmp_path: Path) -> None:
    import mlflow

    train, test = frames
    uri, experiment_id = store
    client = mlflow.MlflowClient()
    name = "embft-champion"

    def register(study: str):
        return registry.register_best(experiment_id, {"optuna.study_name": study}, study, name, "accuracy_cosine")

    _job(experiment_id, "s1", 0.50, tiny_st, train)
    best1, _ = _job(experiment_id, "s1", 0.70, tiny_st, train)
    v1 = register("s1")
    assert v1.run_id == best1
    assert v1.tags[names.VERSION_STUDY] == "s1" and float(v1.tags[names.VERSION_SCORE]) == 0.70
    assert v1.tags[names.VERSION_TRIAL] and v1.tags[names.VERSION_METRIC] == "accuracy_cosine"
    assert client.get_model_version_by_alias(name, "champion").version == v1.version
    assert register("s1").version == v1.version  # a second search worker ending the same study

    _job(experiment_id, "s2", 0.60, tiny_st, train)  # worse: registered, alias stays
    v2 = register("s2")
    assert client.get_model_version_by_alias(name, "champion").version == v1.version

    best3, _ = _job(experiment_id, "s3", 0.80, tiny_st, train)  # better: the alias moves
    v3 = register("s3")
    assert v3.run_id == best3
    assert client.get_model_version_by_alias(name, "champion").version == v3.version
    assert {v.version for v in client.search_model_versions(f"name = '{name}'")} == {v1.version, v2.version, v3.version}

    # `embft predict` in a fresh process loads NAME@champion and labels as the model does in process.
    test[["text"]].to_csv(tmp_path / "in.csv", index=False)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "embft",
            "predict",
            f"models:/{name}@champion",
            str(tmp_path / "in.csv"),
            "--out",
            str(tmp_path / "out.csv"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = pd.read_csv(tmp_path / "out.csv")
    expected = mlflow.pyfunc.load_model(f"runs:/{best3}/classifier").predict(test[["text"]])
    assert out["text"].tolist() == test["text"].tolist()
    assert out["label"].tolist() == expected["label"].tolist()
    assert out["label_name"].tolist() == expected["label_name"].tolist()


def test_predict_cli_keeps_the_input_format(tiny_st: Path, frames, store, tmp_path: Path, capsys) -> None:
    import mlflow

    train, test = frames
    uri, experiment_id = store
    run_id, model_uri = _job(experiment_id, "cli", 0.5, tiny_st, train, log_model="all")
    rows = test.head(6).assign(id=range(6))
    expected = mlflow.pyfunc.load_model(model_uri).predict(rows[["text"]])["label_name"].tolist()

    rows.to_parquet(tmp_path / "in.parquet")
    assert (
        predict_main(
            [model_uri, str(tmp_path / "in.parquet"), "--out", str(tmp_path / "out.parquet"), "--tracking-uri", uri]
        )
        == 0
    )
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert out["id"].tolist() == list(range(6)) and out["label_name"].tolist() == expected
    assert out["label_input"].tolist() == rows["label"].tolist()  # the gold label, not overwritten

    rows.to_json(tmp_path / "in.jsonl", orient="records", lines=True)
    capsys.readouterr()
    assert predict_main([f"runs:/{run_id}/classifier", str(tmp_path / "in.jsonl"), "--tracking-uri", uri]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label_name"] for r in lines] == expected and {"score_World", "id"} <= set(lines[0])

    rows[["id"]].to_csv(tmp_path / "no_text.csv", index=False)
    assert predict_main([model_uri, str(tmp_path / "no_text.csv"), "--tracking-uri", uri]) == 1
    assert "needs a `text` column" in capsys.readouterr().err
    assert predict_main(["models:/nope@champion", str(tmp_path / "in.jsonl"), "--tracking-uri", uri]) == 1
    assert "cannot load models:/nope@champion" in capsys.readouterr().err
