"""Documented promises (README.md and the docs site, docs/) that no other test checked, each against the
behaviour (and, where the docs give a number, against their own wording, so the two cannot drift apart):

- `objectives` naming the test score is refused under `eval.objective=validation`;
- a job skipped because its config already has a FINISHED run returns that run's metrics;
- `train.nproc_per_node>1` turns live metrics off;
- the heartbeat (30 s), staleness (2 min) and claim-settle (1 s) defaults;
- `embft report NAME --storage URL`;
- the `tracking.support_per_class` default (256);
- `python -m embft --cfg job` prints the config and touches no store;
- the twin rule (`same` / `same_nib` at one query per step) through the app, with controls that
  must still train (`same_dataset_batch_size=2`, `loss=groupwise`, `nproc_per_node=2`).

The jobs run in-process on a tiny BERT (seconds of training) and share one project root.
"""

import inspect
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, make_tiny_bert

# What a user reads: the README and the documentation site's pages (docs/), where most promises live.
README = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))])
NAME = "docpromises"


def readme_number(pattern: str) -> float:
    """The one number the docs (README.md and docs/) state where `pattern` (a regex with one group) matches."""
    text = " ".join(README.split())  # the docs wrap their lines anywhere
    found = re.findall(pattern, text)
    assert len(found) == 1, f"README.md and docs/ should say this exactly once: {pattern!r} (found {found})"
    return float(found[0])


def compose_job(overrides=(), *, root: Path, out: Path):
    """The job config as the app sees it (its own conf/; paths under `root`, output folder `out`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from embft.app import CONF_DIR  # also registers the schema and resolvers

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = hydra_compose(
                "config",
                overrides=[f"paths.root_dir={root}", f"paths.output_dir={out}", *overrides],
                return_hydra_config=True,
            )
    finally:
        GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture
def compose(tmp_path):
    """compose(overrides) -> the job config, paths under tmp_path (conftest's, on the app's conf/)."""
    return lambda overrides=(): compose_job(overrides, root=tmp_path, out=tmp_path / "out")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One project root (store, caches) for the module's jobs: the baseline is computed once."""
    return tmp_path_factory.mktemp("doc_promises_root")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_doc"))


@pytest.fixture(scope="module")
def tiny_args(tiny_bert, ag_news_dir) -> list[str]:
    """A job of seconds at the study's batch: 3 per device -> 1 query per step in same-dataset mode."""
    return [
        "experiment=smoke",
        f"data.local_dir={ag_news_dir}",
        f"model.name_or_path={tiny_bert}",
        "model.package=null",
        "train.per_device_train_batch_size=3",
        "train.max_train_queries=12",
        "train.keep_model=true",
        "train.device=cpu",
        "eval.max_test_rows=80",
        "eval.max_validation_rows=80",
        "tracking.log_model=none",
        f"name={NAME}",
    ]


@pytest.fixture
def run_in_process(root, tmp_path, caplog):
    """run(overrides) -> (what run_job returned, the log text of that call)."""
    from embft.app import run_job

    count = iter(range(1000))

    def _run(overrides):
        cfg = compose_job(overrides, root=root, out=tmp_path / f"job{next(count)}")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="embft"):
            returned = run_job(cfg)
        return returned, caplog.text

    return _run


def client_for(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")


def finetune_runs(root: Path, experiment: str = NAME) -> list:
    client = client_for(root)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("embft.role") == "finetune"]


def newest_run(root: Path):
    return max(finetune_runs(root), key=lambda r: (r.info.start_time, r.info.run_id))


# ------------------------------------------------------------------------------------- objectives


def test_objectives_naming_the_test_score_are_refused_under_eval_objective_validation(compose, tmp_path):
    """README: "Listing the test score (`accuracy_cosine`) is refused while `eval.objective=validation`"
    - before any MLflow work; eval.objective=test allows it; the validation score is always fine."""
    from embft.app import start
    from embft.errors import EmbftError

    assert "Listing the test score (`accuracy_cosine`) is refused while `eval.objective=validation`" in " ".join(
        README.split()
    )
    test_score = "objectives=[{metric: accuracy_cosine, direction: maximize}]"
    cfg = compose([test_score])
    assert cfg.eval.objective == "validation"  # the default
    with pytest.raises(EmbftError, match=r"objectives lists accuracy_cosine.*eval\.objective=test"):
        start(cfg)
    assert not (tmp_path / "mlruns").exists(), "refused before the store is touched"

    two = "objectives=[{metric: val_accuracy_cosine, direction: maximize}, {metric: accuracy_cosine, direction: maximize}]"
    with pytest.raises(EmbftError, match="objectives lists accuracy_cosine"):
        start(compose([two]))

    job = start(compose([test_score, "eval.objective=test"]))
    assert job.objectives == ["accuracy_cosine"]
    job = start(compose(["objectives=[{metric: val_accuracy_cosine, direction: maximize}]"]))
    assert job.objectives == ["val_accuracy_cosine"]


# ------------------------------------------------------------------------------ heartbeat defaults


def test_heartbeat_staleness_and_settle_defaults_are_what_the_readme_says(tmp_path, monkeypatch):
    """README: a running job refreshes `embft.heartbeat` every 30 s; a RUNNING run is dead once its
    heartbeat is older than 2 minutes; the claim is checked against live twins after 1 s. Checked on
    what job_run really does with its defaults and on is_alive at either side of the limit."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from embft.tracking import mlflow_runs

    heartbeat_s = readme_number(r"refreshes its run's tag `embft\.heartbeat` every (\d+) s")
    stale_min = readme_number(r"its heartbeat is older than (\d+) minutes")
    assert readme_number(r"once its heartbeat is (\d+) minutes old") == stale_min
    settle_s = readme_number(r"checked against live twins of the config after (\d+) s\)")

    defaults = inspect.signature(mlflow_runs.job_run).parameters
    assert defaults["heartbeat_s"].default == heartbeat_s
    assert defaults["settle_s"].default == settle_s
    assert inspect.signature(mlflow_runs.Heartbeat).parameters["interval"].default == heartbeat_s

    # is_alive at either side of the limit (another machine's run: only its heartbeat counts).
    beat = 1_000_000.0
    run = SimpleNamespace(
        data=SimpleNamespace(
            tags={"embft.heartbeat": f"{beat:.0f}", "embft.host": "another-machine", "embft.pid": "1"}
        ),
        info=SimpleNamespace(start_time=0),
    )
    limit = stale_min * 60
    assert mlflow_runs.is_alive(run, now=beat + limit - 1)[0], "a heartbeat 119 s old is alive"
    assert not mlflow_runs.is_alive(run, now=beat + limit + 1)[0], "a heartbeat 121 s old is dead"
    assert mlflow_runs.is_alive(run, now=beat + heartbeat_s)[0]

    # What job_run does with its defaults: a Heartbeat every 30 s, one wait of 1 s before the check.
    beats, sleeps = [], []
    real_heartbeat = mlflow_runs.Heartbeat

    class SpyHeartbeat(real_heartbeat):
        def __init__(self, run_id, interval=mlflow_runs.HEARTBEAT_INTERVAL_S):
            beats.append(interval)
            super().__init__(run_id, interval)

    monkeypatch.setattr(mlflow_runs, "Heartbeat", SpyHeartbeat)
    real_sleep = time.sleep

    def spy_sleep(seconds):  # job_run's own waits; MLflow's retries on a busy SQLite store sleep too
        if sys._getframe(1).f_globals.get("__name__") == mlflow_runs.__name__:
            sleeps.append(seconds)
        else:
            real_sleep(seconds)

    monkeypatch.setattr(mlflow_runs.time, "sleep", spy_sleep)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    exp = MlflowClient().create_experiment("defaults")
    with mlflow_runs.job_run(exp, "job", {"embft.config_hash": "abc"}) as active:
        assert active is not None
    assert beats == [heartbeat_s] and sleeps == [settle_s]


# ------------------------------------------------------------------------------- support_per_class


def test_support_per_class_defaults_to_256_texts_per_class(compose, monkeypatch):
    """README: "`tracking.support_per_class` texts per class, default 256" - in the schema, both
    tracking groups, what log_job_models hands the classifier, and the support set's size."""
    import pandas as pd

    from embft.config import TrackingConfig
    from embft.serving import models as serving

    default = readme_number(r"`tracking\.support_per_class` texts per class, default (\d+)")
    assert TrackingConfig().support_per_class == default
    for group in ("mlflow", "server"):
        assert compose([f"tracking={group}"]).tracking.support_per_class == default, group

    cfg = compose(["tracking.log_model=all"])
    seen = {}
    monkeypatch.setattr(serving, "log_models", lambda *a, **kw: seen.update(kw) or "models:/m-x")
    splits = SimpleNamespace(train=None, label_names=["a", "b"])
    serving.log_job_models(Path("model"), splits, cfg)
    assert seen["support_per_class"] == default

    per_class = int(default) + 40
    train = pd.DataFrame(
        {"text": [f"t{i}" for i in range(3 * per_class)], "label": [i % 3 for i in range(3 * per_class)]}
    )
    support = serving.support_set(train, seen["support_per_class"], seed=cfg.eval.seed)
    assert support["label"].value_counts().to_dict() == {0: default, 1: default, 2: default}


# ----------------------------------------------------------------------------------- --cfg job


def test_cfg_job_prints_the_composed_config_and_creates_no_store(tmp_path):
    """README: "`python -m embft --cfg job` prints the config" - Hydra's composed job config, overrides
    applied, with nothing run: no MLflow store, no output folders, no cache."""
    import yaml

    assert "`python -m embft --cfg job` prints the config" in README
    env = {**os.environ, "EMBFT_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-m", "embft", "--cfg", "job", "variant=no_same", "train.learning_rate=3e-5"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = yaml.safe_load(done.stdout)  # as printed: interpolations unresolved
    assert "hydra" not in printed, "the job's config, not Hydra's"
    assert printed["name"] == "default" and printed["variant"]["name"] == "no_same"
    assert float(printed["train"]["learning_rate"]) == 3e-5 and printed["train"]["train_group_size"] == 8
    assert printed["tracking"]["uri"] == "sqlite:///${paths.root_dir}/mlruns/mlflow.db"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing written: no mlruns/, outputs/ or .cache/"


# ------------------------------------------------------------------------------------- --storage


def test_report_storage_points_at_a_study_the_parent_tag_cannot_open(tmp_path, capsys):
    """README: "The study is read from the storage in the parent's tag `optuna.storage`; pass
    `--storage URL` when that URL needs a password." Here the tag's URL (masked, as a job logs it)
    cannot open the study: the report fails and names --storage; with --storage it adds the search."""
    import optuna
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from embft import report

    assert "pass `--storage URL` when that URL needs a password" in " ".join(README.split())
    real = f"sqlite:///{tmp_path}/optuna.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="srch", storage=real, direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("srch", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(
        exp,
        tags={
            "embft.role": "study",
            "embft.parent_key": "study:srch",
            "optuna.storage": f"sqlite:///{tmp_path}/elsewhere/optuna.db",  # not this machine's file
        },
    )
    client.set_terminated(parent.info.run_id, "FINISHED")
    for trial, acc in enumerate((0.61, 0.64, 0.66)):
        run = client.create_run(
            exp, tags={"embft.role": "finetune", "embft.baseline_key": "k", "embft.config_hash": f"h{trial}"}
        )
        now = int(time.time() * 1000)
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, v, now, 0) for k, v in {"accuracy_cosine": acc, "val_accuracy_cosine": acc}.items()],
            params=[Param("train.learning_rate", str(trial)), Param("model.name", "m")],
        )
        client.set_terminated(run.info.run_id, "FINISHED")

    out = tmp_path / "reports"
    assert report.main(["srch", "--tracking-uri", uri, "--out-dir", str(out)]) == 1
    assert "pass --storage URL" in capsys.readouterr().err
    assert report.main(["srch", "--tracking-uri", uri, "--out-dir", str(out), "--storage", real]) == 0
    text = (out / "srch" / "report.md").read_text()
    assert "## Search: Optuna study `srch`" in text and "3 trials: 3 complete" in text, text
    assert (out / "srch" / "search_optimization_history.png").is_file()


# ---------------------------------------------------------------------- nproc_per_node > 1: no live


def test_nproc_per_node_above_one_turns_live_metrics_off(compose, tmp_path, tiny_bert, monkeypatch, caplog):
    """README: "Live metrics and pruning need `train.nproc_per_node=1`". With 2 processes the job's
    callbacks (live train_loss, live validation, pruning) never reach training and the log says so;
    with 1 they run. torchrun itself is replaced by a stand-in that saves the untrained weights
    (tests/test_distributed.py trains through torchrun for real)."""
    import shutil

    from transformers import TrainerCallback

    from embft.training.flagembedding import distributed
    from embft.training.flagembedding.records import build_records, write_records
    from embft.training.flagembedding.runner import RunnerOutcome
    from embft.training.flagembedding.train import train

    assert "Live metrics and pruning need `train.nproc_per_node=1`" in " ".join(README.split())

    class Spy(TrainerCallback):
        def __init__(self):
            self.calls = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.calls += 1

    launched = []

    def fake_launch(spec, nproc, device, work_parent=None, **kwargs):
        launched.append((nproc, kwargs))
        bare = Path(spec.training_args["output_dir"])
        for item in tiny_bert.iterdir():
            shutil.copy(item, bare / item.name)
        return RunnerOutcome(seconds=1.0, losses=[(1, 0.5)])

    monkeypatch.setattr(distributed, "launch", fake_launch)
    texts = [f"{['sport', 'market', 'science', 'war'][i % 4]} story {i * 7919 % 1000}" for i in range(12)]
    records = tmp_path / "records"
    records.mkdir()
    write_records(build_records(texts, [i % 4 for i in range(12)], group_size=4, seed=0), records / "train.jsonl")
    common = [f"model.name_or_path={tiny_bert}", "model.package=null", "variant=no_same", "train.device=cpu"]
    common += ["train.num_train_epochs=1", "train.logging_steps=1"]

    for nproc in (2, 1):
        spy = Spy()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="embft"):
            result = train(
                compose([*common, f"train.nproc_per_node={nproc}"]),
                records,
                str(tiny_bert),
                12,
                tmp_path / f"job{nproc}",
                callbacks=(spy,),
            )
        if nproc == 2:
            assert spy.calls == 0, "the job's callbacks never ran"
            assert [n for n, _ in launched] == [2] and not any(kw for _, kw in launched), "no callbacks to torchrun"
            assert "train.nproc_per_node=2: live metrics, evaluation and pruning are off" in caplog.text
            assert result.losses == [(1, 0.5)], "the losses come back from rank 0 at the end"
        else:
            assert len(launched) == 1, "one process trains here, not under torchrun"
            assert spy.calls == 4, "one call per step: 12 queries / 3 per step"
            assert "live metrics" not in caplog.text


# ------------------------------------------------------------------------------ jobs through run_job


@pytest.mark.slow
def test_a_skipped_job_returns_its_runs_metrics(run_in_process, tiny_args, root):
    """README: "A job skipped because its config already has a FINISHED run returns the same metrics
    from that run" - the objective by default, and every one of `objectives` (not in the hash)."""
    first, _ = run_in_process([*tiny_args, "variant=no_same", "train.seed=3"])
    (run,) = [r for r in finetune_runs(root) if r.data.params["train.seed"] == "3"]
    assert first == run.data.metrics["val_accuracy_cosine"]

    again, text = run_in_process([*tiny_args, "variant=no_same", "train.seed=3"])
    assert "Skipping: run " + run.info.run_id in text and "Fine-tuning" not in text
    assert again == first

    two = (
        "objectives=[{metric: val_accuracy_cosine, direction: maximize}, {metric: train_seconds, direction: minimize}]"
    )
    both, text = run_in_process([*tiny_args, "variant=no_same", "train.seed=3", two])
    assert "Skipping: run " + run.info.run_id in text
    assert both == [run.data.metrics["val_accuracy_cosine"], run.data.metrics["train_seconds"]]
    assert len([r for r in finetune_runs(root) if r.data.params["train.seed"] == "3"]) == 1


@pytest.mark.slow
def test_same_nib_takes_the_same_run_at_one_query_per_step_and_controls_train(
    run_in_process, tiny_args, root, tiny_bert, compose, monkeypatch
):
    """README: at the study's batch (3 -> 1 query per step) `same_nib` trains exactly like `same`, so
    with train.reuse_twin (the default) it takes that run's scores, loss curve and seconds, tagged
    `embft.trained_as`, without training. The run that trained moved its weights. Controls where
    the suffix does count must still train: 2 queries per step, the groupwise loss, 2 processes."""
    import torch
    from safetensors.torch import load_file

    from embft.app import start

    returned, text = run_in_process([*tiny_args, "variant=same"])
    trained = newest_run(root)
    assert trained.data.params["variant.name"] == "same" and "embft.trained_as" not in trained.data.tags
    assert trained.data.metrics["effective_batch_size"] == 1 and "Fine-tuning" in text
    assert trained.data.tags.get("embft.twin_key")

    # The twin that trained really trained: its saved weights are not the initial ones.
    initial = load_file(tiny_bert / "model.safetensors")
    (tuned_file,) = Path(trained.data.tags["model_dir"]).rglob("model.safetensors")
    tuned = load_file(tuned_file)
    common = [k for k in initial if k in tuned]
    assert len(common) >= 0.9 * len(initial), (list(initial)[:5], list(tuned)[:5])
    moved = [k for k in common if not torch.equal(initial[k], tuned[k])]
    assert len(moved) >= len(common) // 2, f"only {len(moved)} of {len(common)} tensors moved"

    took_returned, text = run_in_process([*tiny_args, "variant=same_nib"])
    took = newest_run(root)
    assert took.data.params["variant.name"] == "same_nib"
    assert took.data.tags["embft.trained_as"] == trained.info.run_id
    assert "one query per step" in took.data.tags["embft.twin_reason"]
    assert f"Not training: variant=same_nib trains the same weights as run {trained.info.run_id}" in text
    assert "Fine-tuning" not in text and "model_dir" not in took.data.tags
    assert took.data.metrics == trained.data.metrics and took_returned == returned
    client = client_for(root)
    for metric in ("train_loss", "train_seconds"):
        ours = [(m.step, m.value) for m in client.get_metric_history(took.info.run_id, metric)]
        theirs = [(m.step, m.value) for m in client.get_metric_history(trained.info.run_id, metric)]
        assert ours == theirs and ours, metric

    # Controls: the suffix counts (or is not shown not to), so each same_nib job trains itself even
    # right after a FINISHED `same` run of the same settings (which the twin rule must not offer it).
    for control in (["train.same_dataset_batch_size=2"], ["train.loss=groupwise"]):
        run_in_process([*tiny_args, "variant=same", *control])
        same_run = newest_run(root)
        _, text = run_in_process([*tiny_args, "variant=same_nib", *control])
        nib_run = newest_run(root)
        assert nib_run.data.params["variant.name"] == "same_nib", control
        assert "embft.trained_as" not in nib_run.data.tags and "embft.twin_key" not in nib_run.data.tags, control
        assert "Fine-tuning" in text and "Not training" not in text, control
        assert nib_run.info.run_id != same_run.info.run_id and "model_dir" in nib_run.data.tags

    # nproc_per_node=2 (torchrun: too slow to train here twice) - the decision the app makes.
    job = start(compose([*tiny_args, "variant=same_nib", "train.nproc_per_node=2"]))
    assert job.twin_key is None and job.twin_reason is None
    job = start(compose([*tiny_args, "variant=same_nib"]))
    assert job.twin_key == trained.data.tags["embft.twin_key"] and job.twin_reason
