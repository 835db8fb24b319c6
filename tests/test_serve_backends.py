"""Served backends (tracking.serve_backend: torch, onnx, onnx_int8, openvino, openvino_int8) and the
static-embedding arm (train.backend=model2vec): refused up front when they cannot run, exported once in
the job, loaded back in a fresh process with the labels the job measured, gated on accuracy."""

from pathlib import Path

import pytest
from mlflow import MlflowClient

from embft.errors import EmbftError


@pytest.fixture(scope="module")
def refusals_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("refusals")


def _refused(compose, root, overrides, expected, monkeypatch=None):
    from embft.app import run_job

    cfg = compose(overrides, root=root)
    with pytest.raises(EmbftError, match=expected) as err:
        run_job(cfg)
    assert "\n" not in str(err.value)
    assert not list((root / "out").rglob("model")), "nothing trained"
    return str(err.value)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["tracking.max_serve_accuracy_drop=-0.1"], r"tracking.max_serve_accuracy_drop=-0.1: must be in \[0, 1\]"),
        (["tracking.max_serve_accuracy_drop=2"], r"tracking.max_serve_accuracy_drop=2.0: must be in \[0, 1\]"),
        (["train=model2vec", "tracking.serve_backend=onnx"], "a static-embedding model has no transformer to export"),
        (["train=model2vec", "train.loss=supcon"], "train.loss=supcon: train.backend=model2vec takes"),
    ],
)
def test_a_setting_that_cannot_serve_is_refused_in_one_line_before_any_work(
    compose, refusals_root, overrides, expected
) -> None:
    _refused(compose, refusals_root, overrides, expected)


def test_an_unknown_backend_is_refused_by_the_schema_with_the_choices(compose) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose(["tracking.serve_backend=tensorrt"])
    assert "onnx_int8" in str(err.value.__cause__)


def test_a_backend_whose_package_is_missing_is_refused_naming_the_install(compose, refusals_root, monkeypatch) -> None:
    from embft.encoding import export

    monkeypatch.setattr(export, "_installed", lambda module: not module.startswith("openvino"))
    message = _refused(compose, refusals_root, ["tracking.serve_backend=openvino_int8"], "needs openvino")
    assert "pip install 'sentence-transformers[openvino]'" in message and "tracking.serve_backend=torch" in message


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


@pytest.mark.slow
def test_the_static_arm_is_distilled_trained_and_scored_like_every_arm(compose, tmp_path) -> None:
    """train.backend=model2vec: distilled from the job's base model (offline), trained on the labelled texts,
    scored by the same MTEB kNN (and served classifiers) from a SentenceTransformer folder."""
    import mlflow

    from embft.app import run_job

    cfg = _job(compose, tmp_path, ["train=model2vec", "train.per_device_train_batch_size=8"])
    value = run_job(cfg)
    _, run = _finetune_run(tmp_path)
    m = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.params["train.backend"] == "model2vec"
    assert value == m["val_accuracy_cosine"] and 0 <= m["accuracy_cosine"] <= 1
    assert m["train_labelled_texts"] == 24 and m["distill_seconds"] > 0 and "val_served_accuracy_knn" in m
    embedder = mlflow.sentence_transformers.load_model(f"runs:/{run.info.run_id}/embedder")
    assert type(embedder[0]).__name__ == "StaticEmbedding"


def test_the_gate_refuses_a_backend_that_drops_more_than_the_bound_and_passes_one_within_it() -> None:
    from types import SimpleNamespace

    from embft.tracking.registry import serve_gate

    def run(served, fp32, bound="0.005"):
        params = {"tracking.classifier": "knn", "tracking.serve_backend": "onnx_int8"}
        params["tracking.max_serve_accuracy_drop"] = bound
        metrics = {"val_served_accuracy_knn": served, "val_served_fp32_accuracy_knn": fp32}
        return SimpleNamespace(data=SimpleNamespace(params=params, metrics=metrics))

    assert serve_gate(run(0.850, 0.854)) is None  # 0.004 below: within 0.005
    assert serve_gate(run(0.860, 0.854)) is None  # better than fp32
    message = serve_gate(run(0.840, 0.854))
    assert "onnx_int8" in message and "0.0140 below torch fp32" in message and "\n" not in message
    assert serve_gate(run(0.840, 0.854, bound="0.02")) is None
    old = SimpleNamespace(data=SimpleNamespace(params={}, metrics={"val_served_accuracy_knn": 0.5}))
    assert serve_gate(old) is None  # logged before the fp32 score existed: not refused


BACKENDS = ["torch", "onnx", "onnx_int8", "openvino", "openvino_int8"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backends_logged_model_loads_in_a_fresh_process_and_labels_as_the_job_measured(
    compose, tmp_path, backend
) -> None:
    import os
    import subprocess
    import sys

    import mlflow
    import pandas as pd

    from embft.app import run_job
    from embft.data import load_splits
    from embft.evaluation.classification import eval_rows
    from embft.tracking.registry import register_best

    cfg = _job(
        compose,
        tmp_path,
        ["train=sentence_transformers", "train.per_device_train_batch_size=8", f"tracking.serve_backend={backend}"],
    )
    run_job(cfg)
    client, run = _finetune_run(tmp_path)
    m = run.data.metrics
    # Read back from the store: both accuracies on the same rows, and the served code's speed.
    for key in ("served_accuracy_knn", "served_fp32_accuracy_knn"):
        assert 0 <= m[key] <= 1 and 0 <= m[f"val_{key}"] <= 1
    assert m["serve_texts_per_second_1"] > 0 and m["serve_texts_per_second_64"] > 0
    assert run.data.tags["embft.serve_backend"] == backend
    if backend == "torch":
        assert m["val_served_accuracy_knn"] == m["val_served_fp32_accuracy_knn"]
    # The logged classifier carries the exported files and the packages they need.
    uri = run.data.tags["embft.classifier_uri"]
    local = Path(mlflow.artifacts.download_artifacts(uri, tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db"))
    exported = [p.name for p in local.rglob("*") if p.suffix in (".onnx", ".xml")]
    requirements = (local / "requirements.txt").read_text()
    if backend == "torch":
        assert not exported and "onnxruntime" not in requirements
    else:
        assert exported and ("onnxruntime" if "onnx" in backend else "openvino") in requirements
    loaded = mlflow.pyfunc.load_model(uri).unwrap_python_model().embedder
    assert loaded[0].backend == backend.split("_")[0]  # the exported backend, as the job scored it
    # A fresh process (`embft predict`, MLflow's pyfunc loader), offline, labels the validation rows as the job
    # measured: the same accuracy to the last row, with no export at load time.
    splits = load_splits(cfg.data)
    rows = eval_rows(splits, "validation", cfg.eval)
    rows[["text"]].to_csv(tmp_path / "val.csv", index=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "embft", "predict", uri, str(tmp_path / "val.csv"), "--out", str(tmp_path / "o.csv")]
        + ["--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Exporting the model" not in done.stderr
    labels = pd.read_csv(tmp_path / "o.csv")["label"].to_numpy()
    assert float((labels == rows["label"].to_numpy()).mean()) == pytest.approx(m["val_served_accuracy_knn"], abs=1e-12)
    # The gate: the same run is made champion within the bound, and refused when fp32 scores far above it.
    exp = run.info.experiment_id
    assert register_best(exp, {}, "t", "ok", "val_accuracy_cosine") is not None
    assert client.get_model_version_by_alias("ok", "champion").run_id == run.info.run_id
    client.log_metric(run.info.run_id, "val_served_fp32_accuracy_knn", m["val_served_accuracy_knn"] + 0.1)
    register_best(exp, {}, "t", "gated", "val_accuracy_cosine")
    with pytest.raises(Exception, match="alias"):
        client.get_model_version_by_alias("gated", "champion")


def test_the_report_shows_serving_speed_per_configuration_and_plots_the_serving_axis(tmp_path, capsys) -> None:
    """A transformer arm and the static arm, two seeds each: their served speed and both served accuracies per
    configuration, and accuracy against served texts per second (read back from the store)."""
    from test_report import _ft_metrics, _run

    from embft import report

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("serving", artifact_location=str(tmp_path / "art"))
    speed = {"sentence_transformers": 40.0, "model2vec": 1200.0}
    for backend, fast in speed.items():
        for seed in (1, 2):
            metrics = {
                **_ft_metrics(0.80 + seed / 100),
                "val_served_accuracy_knn": 0.79,
                "val_served_fp32_accuracy_knn": 0.80,
                "serve_texts_per_second_1": fast + seed,
                "serve_texts_per_second_64": 4 * fast,
            }
            params = {"model.name": "minilm", "train.seed": seed, "train.backend": backend}
            _run(client, exp, role="finetune", params=params, metrics=metrics)
    assert report.main(["serving", "--tracking-uri", uri, "--out-dir", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "serving" / "report.md").read_text()
    assert "served texts/s, 1 a call" in text and "validation served kNN, torch fp32" in text
    assert "1201.5000" in text and "41.5000" in text  # the means over the two seeds, per configuration
    png = tmp_path / "out" / "serving" / "accuracy_vs_serve_texts_per_second.png"
    assert png.stat().st_size > 1000 and str(png) in capsys.readouterr().out


def test_an_export_that_fails_is_one_line_naming_the_backend_and_the_way_out(tmp_path, monkeypatch) -> None:
    from embft.encoding import export

    def broken(model_dir, backend, texts):
        raise RuntimeError("Unsupported operator aten::scaled_dot_product_attention\nat line 3")

    monkeypatch.setattr(export, "_export", broken)
    with pytest.raises(EmbftError) as err:
        export.export_for_serving(tmp_path, "onnx_int8")
    message = str(err.value)
    assert "\n" not in message and "tracking.serve_backend=onnx_int8" in message
    assert "Unsupported operator" in message and "use tracking.serve_backend=torch" in message
    assert not (tmp_path / export.SERVE_FILE).exists()  # nothing says the folder was exported


def test_a_static_folder_is_refused_for_an_exported_backend(tmp_path) -> None:
    import json

    from embft.encoding import export

    (tmp_path / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.StaticEmbedding"}]))
    with pytest.raises(EmbftError, match="no Transformer module to export"):
        export.export_for_serving(tmp_path, "onnx")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["openvino", "onnx_int8"])
def test_the_served_model_answers_concurrent_requests(tmp_path, backend) -> None:
    """The scoring server calls predict from several threads at once: OpenVINO's single infer request
    failed them with "Infer Request is busy" (HTTP 400 under 8 clients) until they took turns."""
    import threading
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd

    from conftest import make_tiny_bert
    from embft.encoding.export import export_for_serving, load_served
    from embft.encoding.model_folder import save_whole, sentence_transformer
    from embft.serving.classifier import KnnClassifier

    bare = make_tiny_bert(tmp_path / "bare")
    save_whole(sentence_transformer(str(bare), "cls", True, 32), tmp_path / "st", {"max_seq_length": 32})
    texts = [f"text number {i} about things" for i in range(40)]
    export_for_serving(tmp_path / "st", backend, texts)
    np.savez(tmp_path / "s.npz", embeddings=load_served(tmp_path / "st").encode(texts), labels=np.arange(40) % 4)
    model = KnnClassifier()
    artifacts = {"embedder": str(tmp_path / "st"), "support": str(tmp_path / "s.npz")}
    model.load_context(
        SimpleNamespace(artifacts=artifacts, model_config={"k": 3, "metric": "cosine", "label_names": list("abcd")})
    )
    expected = model.predict(None, pd.DataFrame({"text": texts[:8]}))["label"].tolist()
    errors, answers = [], []

    def client() -> None:
        for _ in range(10):
            try:
                answers.append(model.predict(None, pd.DataFrame({"text": texts[:8]}))["label"].tolist())
            except Exception as err:  # what the server would answer with a 400
                errors.append(repr(err))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(answers) == 80 and all(a == expected for a in answers)


def test_the_served_classifier_runs_its_distance_product_on_one_blas_thread(tmp_path) -> None:
    """On 2 cores OpenBLAS's second thread, spinning after the kNN's product, starved torch's next encode:
    one text a call ran at 34 instead of 82 texts/s over 1,536 support texts (docs/performance.md)."""
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd
    from threadpoolctl import threadpool_info, threadpool_limits

    from conftest import make_tiny_bert
    from embft.encoding.model_folder import save_whole, sentence_transformer
    from embft.serving.classifier import KnnClassifier

    bare = make_tiny_bert(tmp_path / "bare")
    embedder = sentence_transformer(str(bare), "cls", True, 32)
    save_whole(embedder, tmp_path / "st", {"max_seq_length": 32})
    texts = [f"text number {i} about things" for i in range(40)]
    np.savez(tmp_path / "s.npz", embeddings=embedder.encode(texts), labels=np.arange(40) % 4)
    model = KnnClassifier()
    artifacts = {"embedder": str(tmp_path / "st"), "support": str(tmp_path / "s.npz")}
    model.load_context(
        SimpleNamespace(artifacts=artifacts, model_config={"k": 3, "metric": "cosine", "label_names": list("abcd")})
    )
    fitted, seen = model.classifier, []

    class Recording:
        classes_ = fitted.classes_

        def predict_proba(self, embeddings):
            seen.append({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})
            return fitted.predict_proba(embeddings)

    model.classifier = Recording()
    with threadpool_limits(limits=2, user_api="blas"):  # as on a 2-core server (the suite runs with 1)
        labels = model.predict(None, pd.DataFrame({"text": texts[:1]}))["label"].tolist()
    assert labels == fitted.predict(embedder.encode(texts[:1])).tolist()
    assert seen == [{1}], f"BLAS threads during the kNN: {seen}"
