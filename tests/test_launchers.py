"""Launcher configs: joblib (local parallel), submitit SLURM, and submitit_local, which runs the
SLURM path here as subprocesses (a real multirun of the smoke experiment)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig


@pytest.mark.parametrize(
    "launcher,target",
    [
        ("parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
        ("slurm_local", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"),
    ],
)
def test_launcher_configs_compose(compose, launcher, target):
    compose([f"hydra/launcher={launcher}"])
    assert HydraConfig.get().launcher._target_ == target


def test_slurm_override_a_user_types(compose):
    compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4"])
    launcher = HydraConfig.get().launcher
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 4, 1)


@pytest.mark.slow
def test_submitit_local_multirun(tmp_path, ag_news_dir, tiny_model):
    """Two smoke jobs through submitit's local executor: both runs FINISHED, per-task logs written."""
    env = {**os.environ, "EMBFT_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "embft",
            "-m",
            "hydra/launcher=slurm_local",
            "experiment=smoke",
            f"data.local_dir={ag_news_dir}",
            *tiny_model,
            "variant=same_nib,no_same",
            "train.max_train_queries=8",
            "eval.max_test_rows=100",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "2 FINISHED" in done.stdout + done.stderr

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    tuned = [r for r in runs if r.data.tags["embft.role"] == "finetune"]
    assert sorted(r.data.params["variant.name"] for r in tuned) == ["no_same", "same_nib"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    # submitit's own per-task logs: the jobs really ran as submitted subprocesses
    logs = list(Path(tmp_path, "multirun").rglob(".submitit/*/*_log.out"))
    assert len(logs) == 2, logs
