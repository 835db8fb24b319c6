"""Never lose a sweep: SIGKILL mid-job then rerun, parallel joblib workers, CPU determinism."""

import contextlib
import os
import signal

import pytest

from conftest import start_held_in_training, wait_until_held_in_training
from test_pipeline import embft, runs

pytestmark = pytest.mark.slow


def finetune_runs(root, experiment):
    return [r for r in runs(root, experiment) if r.data.tags.get("embft.role") == "finetune"]


def test_killed_job_is_finished_by_rerunning_the_same_command(tmp_path, ag_news_dir, tiny_model):
    args = [
        "experiment=smoke",
        f"data.local_dir={ag_news_dir}",
        *tiny_model,
        "name=killed",
        "train.max_train_queries=64",
    ]
    env = {**os.environ, "EMBFT_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    marker, log = tmp_path / "in_training", tmp_path / "killed.log"
    job = start_held_in_training(args, env, marker, log)
    try:
        wait_until_held_in_training(job, marker, log)  # training is under way (a train_loss is logged)
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already if it failed before training
            os.killpg(job.pid, signal.SIGKILL)  # without warning
        job.wait()
    assert [r.info.status for r in finetune_runs(tmp_path, "killed")] == ["RUNNING"]
    # Killed mid-training: no folder under a final name; only hidden temporary ones may remain.
    job_dirs = list((tmp_path / "outputs" / "killed").iterdir())
    assert len(job_dirs) == 1
    entries = {p.name for p in job_dirs[0].iterdir()}
    assert "model" not in entries and not any(name.startswith(".model.") for name in entries), entries
    assert all(
        name.startswith((".flagembedding.", ".torchrun.", ".hydra")) or not (job_dirs[0] / name).is_dir()
        for name in entries
    ), entries

    again = embft(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "as KILLED" in again.stdout + again.stderr and "process" in again.stdout + again.stderr
    rerun_dir = next(d for d in (tmp_path / "outputs" / "killed").iterdir() if d not in job_dirs)
    assert not [p.name for p in rerun_dir.iterdir() if p.name.startswith((".flagembedding.", ".model.", ".torchrun."))]
    statuses = sorted(r.info.status for r in finetune_runs(tmp_path, "killed"))
    assert statuses == ["FINISHED", "KILLED"]
    third = embft(tmp_path, *args)
    assert third.returncode == 0 and "Skipping" in third.stdout + third.stderr
    assert sorted(r.info.status for r in finetune_runs(tmp_path, "killed")) == ["FINISHED", "KILLED"]


def test_two_joblib_workers_land_every_run_and_results_are_deterministic(tmp_path, ag_news_dir, tiny_model):
    args = [
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "experiment=smoke",
        f"data.local_dir={ag_news_dir}",
        *tiny_model,
        "name=parallel",
        "train.seed=7,7,8",
        "force=true",
    ]
    done = embft(tmp_path, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "database is locked" not in done.stdout + done.stderr
    # The two seed-7 jobs start together: one trains, its twin skips (running elsewhere), nothing KILLED.
    tuned = finetune_runs(tmp_path, "parallel")
    assert sorted(r.data.params["train.seed"] for r in tuned) == ["7", "8"]
    assert {r.info.status for r in tuned} == {"FINISHED"}
    assert "1 running elsewhere" in done.stdout + done.stderr
    baselines = [r for r in runs(tmp_path, "parallel") if r.data.tags.get("embft.role") == "baseline"]
    assert len(baselines) == 1, "the shared baseline is computed and logged once"
    again = embft(
        tmp_path,
        "experiment=smoke",
        f"data.local_dir={ag_news_dir}",
        *tiny_model,
        "name=parallel",
        "train.seed=7",
        "force=true",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    seven = [
        r.data.metrics["accuracy_cosine"]
        for r in finetune_runs(tmp_path, "parallel")
        if r.data.params["train.seed"] == "7"
    ]
    assert len(seven) == 2 and seven[0] == seven[1], "same config and seed give the same accuracy on the CPU"
