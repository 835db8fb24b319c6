"""Two machines, one tracking server (issue 16): identical jobs started together train once, and
no live run is closed as KILLED; a job killed with -9 is closed by the rerun, which completes."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import make_tiny_bert

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def start(root: Path, mlflow_uri: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "EMBFT_ROOT": str(root), "EMBFT_MLFLOW_URI": mlflow_uri, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [sys.executable, "-m", "embft", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def tiny_args(tmp_path_factory, ag_news_dir) -> list[str]:
    tiny = make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_e2e"))
    return [
        "experiment=smoke",
        "tracking=server",
        f"data.local_dir={ag_news_dir}",
        f"model.name_or_path={tiny}",
        "model.package=null",
        "eval.max_test_rows=120",
    ]


def finetune_runs(mlflow_uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return [r for r in runs if r.data.tags.get("embft.role") == "finetune"]


def test_two_machines_start_one_config_together(mlflow_uri, tiny_args, tmp_path):
    """Two sweeps of one config, each with its own project root (two machines), on one server."""
    name = f"e2e_twins_{uuid.uuid4().hex[:8]}"
    jobs = [start(tmp_path / f"machine{i}", mlflow_uri, "-m", *tiny_args, f"name={name}") for i in range(2)]
    outputs = []
    for job in jobs:
        output, _ = job.communicate(timeout=900)
        assert job.returncode == 0, output[-4000:]
        outputs.append(output)
    tuned = finetune_runs(mlflow_uri, name)
    assert [r.info.status for r in tuned] == ["FINISHED"], [o[-1500:] for o in outputs]
    assert not any("as KILLED" in o for o in outputs)
    skipped = [o for o in outputs if "is running elsewhere as run" in o]
    assert len(skipped) == 1 and tuned[0].info.run_id in skipped[0]
    assert "1 running elsewhere" in skipped[0], "the sweep summary counts the skip, not as a failure"


def test_kill_9_then_rerun_completes_over_the_server(mlflow_uri, tiny_args, tmp_path):
    name = f"e2e_killed_{uuid.uuid4().hex[:8]}"
    args = [*tiny_args, f"name={name}", "train.max_train_queries=48"]
    job = start(tmp_path, mlflow_uri, *args)
    deadline = time.time() + 600
    for line in job.stdout:
        if "Fine-tuning" in line or time.time() > deadline:
            break
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert [r.info.status for r in finetune_runs(mlflow_uri, name)] == ["RUNNING"]

    rerun = start(tmp_path, mlflow_uri, *args)
    output, _ = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, output[-4000:]
    assert "as KILLED" in output
    assert sorted(r.info.status for r in finetune_runs(mlflow_uri, name)) == ["FINISHED", "KILLED"]
