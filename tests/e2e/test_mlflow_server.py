"""A smoke sweep logs to the MLflow tracking server over HTTP; runs, metrics and artifacts read back."""

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # slow too: `-m "not slow"` must not need the services


def test_smoke_sweep_is_tracked_on_the_server(smoke_sweep, mlflow_uri: str, tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment(smoke_sweep.experiment_id)
    # tracking=server leaves the artifact root to the server, which proxies its own store.
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location

    runs = client.search_runs([smoke_sweep.experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"}
    by_role = {r.data.tags["embft.role"]: r for r in runs}
    assert sorted(r.data.tags["embft.role"] for r in runs) == ["baseline", "finetune", "sweep"]
    tuned = by_role["finetune"]
    assert tuned.data.tags["mlflow.parentRunId"] == by_role["sweep"].info.run_id  # one row per sweep in the UI
    assert 0 <= tuned.data.metrics["accuracy_cosine"] <= 1
    assert tuned.data.metrics["delta_accuracy_cosine"] == pytest.approx(
        tuned.data.metrics["accuracy_cosine"] - by_role["baseline"].data.metrics["accuracy_cosine"]
    )
    assert tuned.data.params["tracking.uri"] == mlflow_uri
    assert tuned.data.tags["embft.sweep"].startswith(f"{smoke_sweep.name}/")
    assert "1 FINISHED" in smoke_sweep.output  # the sweep's own summary, read from the server

    assert {"config.yaml", "mteb_scores.json", "data_notes.json"} <= {
        a.path for a in client.list_artifacts(tuned.info.run_id)
    }
    scores = mlflow.artifacts.download_artifacts(
        run_id=tuned.info.run_id, artifact_path="mteb_scores.json", dst_path=str(tmp_path), tracking_uri=mlflow_uri
    )
    assert json.loads(Path(scores).read_text())
    config = mlflow.artifacts.download_artifacts(
        run_id=tuned.info.run_id, artifact_path="config.yaml", dst_path=str(tmp_path), tracking_uri=mlflow_uri
    )
    assert f"name: {smoke_sweep.name}" in Path(config).read_text()

    # Nothing went to a local store.
    assert not (smoke_sweep.root / "mlruns").exists()
