"""The smoke sweep's model through the authenticated server: logged through the artifact proxy,
registered as NAME@champion, loaded by alias in a fresh process, and served by `mlflow models serve`."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from embft.errors import EmbftError
from model_server import start_model_server, stop_model_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # slow too: `-m "not slow"` must not need the services

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [
    "The central bank raised interest rates again as inflation stayed high.",
    "The striker scored twice as the home side won the cup final.",
    "A new chip promises faster phones with longer battery life.",
    "Rebels and government forces agreed to a ceasefire after talks.",
]


def _client_env(mlflow_uri: str) -> dict:
    # The venv's bin first: `mlflow models serve` execs `uvicorn` from PATH (make e2e does not activate it).
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT / "src"),
        "PATH": path,
    }


@pytest.fixture(scope="module")
def champion(smoke_sweep, mlflow_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri).get_model_version_by_alias(
        smoke_sweep.name, "champion"
    )


@pytest.fixture(scope="module")
def in_process_labels(champion, smoke_sweep, mlflow_uri: str) -> list[str]:
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    model = mlflow.pyfunc.load_model(f"models:/{smoke_sweep.name}@champion")
    return model.predict(pd.DataFrame({"text": TEXTS}))["label_name"].tolist()


def test_sweep_logged_and_registered_its_best_model(smoke_sweep, champion, mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    tuned = client.search_runs([smoke_sweep.experiment_id], "tags.`embft.role` = 'finetune'")[0]
    assert champion.run_id == tuned.info.run_id
    assert champion.tags["embft.study"] == tuned.data.tags["embft.sweep"]
    assert float(champion.tags["embft.score"]) == tuned.data.metrics[champion.tags["embft.metric"]]
    assert champion.tags["embft.trial"]
    # Both models went through the server's artifact proxy: no path of the server's disk in them.
    models = {m.name: m for m in client.search_logged_models([smoke_sweep.experiment_id])}
    assert {"embedder", "classifier"} <= set(models)
    assert all(m.artifact_location.startswith("mlflow-artifacts:") for m in models.values())
    assert tuned.data.tags["embft.classifier_uri"] == f"models:/{models['classifier'].model_id}"
    assert "Registered" in smoke_sweep.output and "@champion" in smoke_sweep.output


def test_champion_loads_by_alias_in_a_fresh_process(
    smoke_sweep, in_process_labels, mlflow_uri: str, tmp_path: Path
) -> None:
    pd.DataFrame({"text": TEXTS}).to_csv(tmp_path / "in.csv", index=False)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "embft",
            "predict",
            f"models:/{smoke_sweep.name}@champion",
            str(tmp_path / "in.csv"),
            "--out",
            str(tmp_path / "out.csv"),
        ],
        env=_client_env(mlflow_uri),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert pd.read_csv(tmp_path / "out.csv")["label_name"].tolist() == in_process_labels

    no_auth = {k: v for k, v in _client_env(mlflow_uri).items() if not k.startswith("MLFLOW_TRACKING_PASSWORD")}
    refused = subprocess.run(
        [sys.executable, "-m", "embft", "predict", f"models:/{smoke_sweep.name}@champion", str(tmp_path / "in.csv")],
        env=no_auth,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert refused.returncode == 1 and "cannot load" in refused.stderr


def _stop(server: subprocess.Popen) -> None:
    stop_model_server(server)


def _serve(model_uri: str, env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    """embft's model server starter, a test failure (its log) when the server does not come up."""
    try:
        return start_model_server(model_uri, log, env=env)
    except EmbftError as err:
        pytest.fail(str(err), pytrace=False)


def test_mlflow_models_serve_answers_on_loopback(
    smoke_sweep, in_process_labels, mlflow_uri: str, tmp_path: Path
) -> None:
    server, url = _serve(f"models:/{smoke_sweep.name}@champion", _client_env(mlflow_uri), tmp_path / "serve.log")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                opener.open(f"{url}/ping", timeout=5).close()
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 300 s"
                time.sleep(2)
        body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        with opener.open(request, timeout=120) as response:
            predictions = json.loads(response.read())["predictions"]
        assert [p["label_name"] for p in predictions] == in_process_labels
        assert {"label", *(f"score_{name}" for name in in_process_labels)} <= set(predictions[0])
    finally:
        _stop(server)
