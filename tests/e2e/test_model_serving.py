"""The smoke sweep's model through the authenticated server: logged through the artifact proxy,
registered as NAME@champion, loaded by alias in a fresh process, and served by `mlflow models serve`."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

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


SERVE_PORTS = range(20000, 32768)  # below Linux's ephemeral ports: no client connection holds one
PICK = random.SystemRandom()  # not the test run's seeded `random`: two runs of this test pick apart


def _stop(server: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def _serve(model_uri: str, env: dict, log: Path, tries: int = 10) -> tuple[subprocess.Popen, str]:
    """`mlflow models serve` on a random loopback port, another one while the port is taken;
    (server, URL) once the server's own log says "Uvicorn running on URL": it holds the port then
    (a /ping that answers could be another server's). No port is probed and released first, so
    nothing can take it between the check and the bind."""
    for _ in range(tries):
        url = f"http://127.0.0.1:{PICK.choice(SERVE_PORTS)}"
        with log.open("w") as out:
            server = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("mlflow")),
                    "models",
                    "serve",
                    "-m",
                    model_uri,
                    "--env-manager",
                    "local",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    url.rsplit(":", 1)[1],
                    "--workers",
                    "1",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 300
        while f"Uvicorn running on {url}" not in log.read_text(errors="replace"):
            if server.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(1)
        else:
            return server, url
        code = server.poll()
        _stop(server)
        output = log.read_text(errors="replace")
        if "address already in use" not in output.lower():
            why = f"exited ({code})" if code is not None else "did not start in 300 s"
            pytest.fail(f"mlflow models serve on {url} {why}:\n{output[-3000:]}", pytrace=False)
    pytest.fail(f"mlflow models serve found every port taken in {tries} tries:\n{output[-3000:]}", pytrace=False)


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
