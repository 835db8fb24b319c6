"""Bad input: one clear error naming what is wrong, no MLflow run left RUNNING, nothing half-written."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from embft.app import run_job
from embft.errors import EmbftError
from test_data import synthetic, write


def bad_cases(tmp: Path):
    good = write(tmp / "good", synthetic(), synthetic(seed=1))
    one_class = write(tmp / "one_class", synthetic().assign(label=0), synthetic(seed=1).assign(label=0))
    no_weights = tmp / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    return [
        ("missing-folder", [f"data.local_dir={tmp}/nope"], "no such folder"),
        ("missing-column", [f"data.local_dir={good}", "data.text_column=body"], "no column 'body'"),
        ("one-class", [f"data.local_dir={one_class}"], "only one class"),
        ("group-too-large", [f"data.local_dir={good}", "train.train_group_size=40"], "lower train.train_group_size"),
        ("unknown-model", [f"data.local_dir={good}", "model.package=null", "model.name_or_path=nobody/no-such-model"],
         "nobody/no-such-model.*model=minilm"),
        ("no-weights", [f"data.local_dir={good}", "model.package=null", f"model.name_or_path={no_weights}"], "has no weights"),
        ("same-batch-zero", [f"data.local_dir={good}", "variant=same", "train.per_device_train_batch_size=1"],
         "same_dataset_batch_size"),
    ]


@pytest.mark.parametrize("case", range(7), ids=["missing-folder", "missing-column", "one-class", "group-too-large", "unknown-model", "no-weights", "same-batch-zero"])
def test_bad_input_fails_cleanly(compose, tmp_path, case, monkeypatch):
    import mlflow

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name, overrides, message = bad_cases(tmp_path)[case]
    cfg = compose(["experiment=smoke", f"name=bad_{name}", *overrides])
    with pytest.raises(EmbftError, match=message):
        run_job(cfg)
    assert mlflow.active_run() is None
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(f"bad_{name}").experiment_id])
    assert runs and all(r.info.status == "FAILED" for r in runs if r.data.tags.get("embft.role") == "finetune")
    assert not any(r.info.status == "RUNNING" for r in runs)
    assert not list((tmp_path / "out").glob("model*")), "no model folder may be left behind"


def test_unwritable_tracking_location(compose, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root): permissions are not enforced")
        cfg = compose([f"tracking.uri=sqlite:///{locked}/sub/mlflow.db"])
        with pytest.raises(EmbftError, match="choose a writable location"):
            run_job(cfg)
    finally:
        locked.chmod(0o700)


def test_tracking_location_that_is_a_file(compose, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = compose([f"tracking.uri=sqlite:///{blocker}/mlflow.db"])
    with pytest.raises(EmbftError, match="choose a writable location"):
        run_job(cfg)


def test_command_line_prints_one_line_and_exits_non_zero(tmp_path):
    env = {**os.environ, "EMBFT_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "embft", f"data.local_dir={tmp_path}/missing"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "no such folder" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_unknown_config_key_is_hydras_error(tmp_path):
    env = {**os.environ, "EMBFT_ROOT": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "embft", "train.lr=1"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Key 'lr' not in 'TrainConfig'" in done.stderr
