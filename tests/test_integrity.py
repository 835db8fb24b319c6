"""What MLflow shows is what the job measured: the final scores are the run's metrics, a "best" is a
complete run scored on validation, the cache keys hold what changes a score, twins share a baseline."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from embft import names
from embft.tracking import mlflow_runs
from test_pipeline import embft, runs

LIVE_SEARCH = [
    "train.max_train_queries=12",  # same_nib at batch 3 -> 1 query a step: 12 steps
    "train.logging_steps=2",
    "eval.max_test_rows=120",
    "eval.max_validation_rows=120",
    "eval.samples_per_label=8",
    "eval.n_experiments=2",
    "train.num_train_epochs=1",
    "eval.every_steps=5",  # live scores at steps 5 and 10: not a divisor of the 12 steps
    "eval.backend=onnx",  # the final evaluation encodes another way than the live one (torch)
    "hydra/sweeper/pruner=none",
    "tracking.support_per_class=8",
    "train.temperature=0.02",
    "train.train_group_size=4",
    "train.learning_rate=choice(1e-5,1e-4,3e-4)",
]


@pytest.mark.slow
def test_a_search_with_live_scores_shows_the_final_scores_and_crowns_optunas_best(tmp_path):
    """Every trial's MLflow val_accuracy_cosine is the value Optuna got (the final evaluation, never a
    live score at a higher step), live scores keep their own name, and the champion is Optuna's best."""
    from conftest import make_tiny_bert
    from test_data import synthetic, write

    model = make_tiny_bert(tmp_path / "tiny")
    data = write(tmp_path / "data", synthetic(n_per_class=24), synthetic(seed=1))
    done = embft(
        tmp_path,
        "-m",
        "experiment=search",
        "data=local",
        f"data.local_dir={data}",
        "model.package=null",
        f"model.name_or_path={model}",
        "train.query_max_len=16",
        "train.passage_max_len=16",
        "eval.max_seq_length=32",
        *LIVE_SEARCH,
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.n_trials=3",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    tuned = {
        int(r.data.tags["optuna.trial_number"]): r
        for r in runs(tmp_path, "search")
        if r.data.tags.get("embft.role") == "finetune"
    }
    for trial in study.trials:
        run = tuned[trial.number]
        final = client.get_metric_history(run.info.run_id, "val_accuracy_cosine")
        assert [m.value for m in final] == [pytest.approx(trial.value)], "one point: the final evaluation's"
        assert run.data.metrics["val_accuracy_cosine"] == pytest.approx(trial.value)
        live = client.get_metric_history(run.info.run_id, "live_val_accuracy_cosine")
        assert sorted(m.step for m in live) == [5, 10], "live scoring fired through the job, under its own name"
        assert run.data.params["eval.backend"] == "onnx"
    champion = client.get_model_version_by_alias("search", "champion")
    assert champion.tags["embft.run_id"] == tuned[study.best_trial.number].info.run_id
    assert float(champion.tags["embft.score"]) == pytest.approx(study.best_value)


# ---------------------------------------------------------------------------- choosing a "best"


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    return client, client.create_experiment("s", artifact_location=(tmp_path / "art").as_uri())


def _finetune(client, exp, metrics, *, pruned=False, tags=()):
    tags = {names.ROLE: names.ROLE_FINETUNE, names.OPTUNA_STUDY: "s", **dict(tags)}
    if pruned:
        tags.update({names.OPTUNA_PRUNED: "true", names.OPTUNA_PRUNED_STEP: "5"})
    run = client.create_run(exp, tags=tags)
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_a_pruned_leader_never_wins_best_and_a_run_without_validation_is_not_eligible(store):
    from embft.tracking.registry import best_run, objective_metric

    client, exp = store
    complete = _finetune(client, exp, {"val_accuracy_cosine": 0.70, "accuracy_cosine": 0.71})
    _finetune(client, exp, {"val_accuracy_cosine": 0.90}, pruned=True)  # its live score, higher
    _finetune(client, exp, {"accuracy_cosine": 0.99})  # logged before the validation split
    group = {names.OPTUNA_STUDY: "s"}
    assert best_run(exp, group, "val_accuracy_cosine").info.run_id == complete
    # Even a study that chooses on test (eval.objective=test) never crowns a run without validation.
    assert best_run(exp, group, "accuracy_cosine").info.run_id == complete
    # A config that does not say eval.objective chooses on validation, not test.
    from omegaconf import OmegaConf

    assert objective_metric(OmegaConf.create({"eval": {"method": "knn", "metric": "cosine"}})) == "val_accuracy_cosine"


def test_log_model_best_is_not_blocked_by_a_pruned_leader(store):
    import mlflow

    from embft.serving.models import is_best_so_far

    client, exp = store
    _finetune(client, exp, {"val_accuracy_cosine": 0.90}, pruned=True)
    with mlflow.start_run(experiment_id=exp, tags={names.ROLE: names.ROLE_FINETUNE, names.OPTUNA_STUDY: "s"}):
        mlflow.log_metrics({"val_accuracy_cosine": 0.70, "accuracy_cosine": 0.71})
        assert is_best_so_far("val_accuracy_cosine")
    _finetune(client, exp, {"val_accuracy_cosine": 0.80, "accuracy_cosine": 0.8})
    with mlflow.start_run(experiment_id=exp, tags={names.ROLE: names.ROLE_FINETUNE, names.OPTUNA_STUDY: "s"}):
        mlflow.log_metrics({"val_accuracy_cosine": 0.75, "accuracy_cosine": 0.9})
        assert not is_best_so_far("val_accuracy_cosine"), "a complete run with a higher validation score leads"


# ------------------------------------------------------------------------------------ cache keys


def _splits():
    import pandas as pd

    from embft.data import Splits

    frame = pd.DataFrame({"text": [f"t{i}" for i in range(8)], "label": [0, 1] * 4})
    return Splits(train=frame, validation=frame, test=frame, label_names=["a", "b"], source="x", notes={})


def test_the_baseline_key_holds_device_library_versions_and_the_weights(compose, tmp_path, monkeypatch):
    from conftest import make_tiny_bert
    from embft.encoding.encoders import EncodeSettings
    from embft.encoding.model_folder import weights_fingerprint
    from embft.evaluation import classification

    cfg = compose([])
    settings, splits = EncodeSettings(), _splits()
    folder = make_tiny_bert(tmp_path / "tiny")
    model = {
        "path": "m",
        "revision": None,
        "pooling": "cls",
        "normalize": True,
        "weights": weights_fingerprint(str(folder)),
    }
    key = classification.baseline_key(model, splits, cfg.eval, settings, "cpu")
    assert key == classification.baseline_key(dict(model), splits, cfg.eval, settings, "cpu")
    assert key != classification.baseline_key(model, splits, cfg.eval, settings, "cuda"), "a GPU score is not a CPU one"
    real = classification.evaluator_versions
    monkeypatch.setattr(classification, "evaluator_versions", lambda s: {**real(s), "mteb": "9.9"})
    assert key != classification.baseline_key(model, splits, cfg.eval, settings, "cpu"), "another MTEB, another score"
    monkeypatch.undo()
    make_tiny_bert(folder, dropout=False)  # same folder, same name, other weights
    retrained = {**model, "weights": weights_fingerprint(str(folder))}
    assert retrained["weights"] != model["weights"]
    assert key != classification.baseline_key(retrained, splits, cfg.eval, settings, "cpu")


def test_the_config_hash_holds_the_device_auto_resolved_to(compose, monkeypatch):
    from embft import app
    from embft.encoding import precision

    cpu = app.start(compose(["train.device=auto"]))
    assert cpu.cfg.train.device == "cpu" and cpu.params["train.device"] == "cpu"
    assert cpu.config_hash == app.start(compose(["train.device=cpu"])).config_hash
    monkeypatch.setattr(precision, "pick_device", lambda requested: "cuda")
    monkeypatch.setattr(precision, "pick_precision", lambda requested, device: "fp32")
    monkeypatch.setattr("embft.encoding.encoders.pin_eval_settings", lambda cfg, device: cpu.encode)
    gpu = app.start(compose(["train.device=auto"]))
    assert gpu.config_hash != cpu.config_hash, "a GPU run never skips for (or twins with) a CPU one"


# ---------------------------------------------------------------------------------------- twins


def _job(exp, twin_key="tk"):
    return SimpleNamespace(
        twin_key=twin_key,
        twin_reason="one query per step",
        experiment_id=exp,
        cfg=SimpleNamespace(force=False, variant=SimpleNamespace(name="same_nib")),
        metric="accuracy_cosine",
        scored=lambda run: "val_accuracy_cosine" in run.data.metrics,
    )


def test_a_twin_run_takes_the_trained_runs_baseline_key(store):
    import mlflow

    from embft.tracking import twins

    client, exp = store
    trained = client.create_run(
        exp, tags={names.ROLE: names.ROLE_FINETUNE, names.TWIN_KEY: "tk", names.BASELINE_KEY: "base-1"}
    )
    client.log_batch(
        trained.info.run_id, metrics=[Metric("val_accuracy_cosine", 0.8, 0, 0), Metric("accuracy_cosine", 0.7, 0, 0)]
    )
    client.log_text(trained.info.run_id, "{}", names.SCORES_ARTIFACT)
    client.set_terminated(trained.info.run_id, "FINISHED")
    with mlflow.start_run(experiment_id=exp) as own:
        twins.take_twin(_job(exp), client.get_run(trained.info.run_id))
    tags = client.get_run(own.info.run_id).data.tags
    assert tags[names.BASELINE_KEY] == "base-1" and tags[names.TRAINED_AS] == trained.info.run_id


def test_a_job_waiting_for_a_twin_whose_heartbeat_stops_trains_itself(store, monkeypatch):
    """The wait applies the heartbeat's staleness rule at every look: a twin that stopped beating
    (hung, killed elsewhere) is given up on, and the job trains instead of waiting forever."""
    from embft.tracking import twins

    client, exp = store
    monkeypatch.setattr(mlflow_runs, "STALE_AFTER_S", 2.0)
    monkeypatch.setattr(mlflow_runs, "TWIN_POLL_S", 0.2)
    now_ms = int(time.time() * 1000)
    twin = client.create_run(
        exp,
        start_time=now_ms - 1000,  # started first: the job waits for it
        tags={
            names.ROLE: names.ROLE_FINETUNE,
            names.TWIN_KEY: "tk",
            names.HEARTBEAT: f"{time.time():.0f}",
            names.HOST: "another-machine",  # not this machine's process table: only the heartbeat tells
        },
    )
    own = client.create_run(exp, start_time=now_ms, tags={names.ROLE: names.ROLE_FINETUNE, names.TWIN_KEY: "tk"})
    found = []
    started = time.monotonic()
    waiter = threading.Thread(
        target=lambda: found.append(twins.finished_twin(_job(exp), client.get_run(own.info.run_id))), daemon=True
    )
    waiter.start()
    waiter.join(timeout=30)
    waited = time.monotonic() - started
    assert found == [None], f"still waiting after {waited:.0f} s for a twin whose heartbeat stopped"
    assert 0.5 < waited < 30, f"waited {waited:.1f} s: while the twin beat, then not past the staleness limit"
    assert client.get_run(twin.info.run_id).info.status == "RUNNING"


# ------------------------------------------------------------------------- the comparison guard


@pytest.mark.slow
def test_a_tuned_model_encoded_unlike_its_baseline_fails_the_job(compose, tmp_path, monkeypatch):
    """Force the two sides apart through the app (the tuned encoder truncates at another length):
    the job stops before scoring, its run is FAILED with the guard's message, and no score is logged."""
    import embft.encoding.encoders as encoders
    from conftest import make_tiny_bert
    from embft.app import run_job
    from test_data import synthetic, write

    model = make_tiny_bert(tmp_path / "tiny")
    folder = write(tmp_path / "data", synthetic(n_per_class=16), synthetic(seed=1))
    real_build = encoders.build_encoder

    def drifting(path, pooling, normalize, settings, device=None):
        encoder = real_build(path, pooling, normalize, settings, device)
        if path != str(model):  # the tuned side only
            encoder.max_seq_length = 32
        return encoder

    monkeypatch.setattr(encoders, "build_encoder", drifting)
    cfg = compose(
        [
            "experiment=smoke",
            "model.package=null",
            f"model.name_or_path={model}",
            f"data.local_dir={folder}",
            "eval.max_seq_length=48",
            "train.query_max_len=16",
            "train.passage_max_len=16",
        ]
    )
    with pytest.raises(RuntimeError, match="encode differently"):
        run_job(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("smoke").experiment_id
    (run,) = [r for r in client.search_runs([exp]) if r.data.tags["embft.role"] == "finetune"]
    assert run.info.status == "FAILED"
    assert "the two sides of the comparison encode differently" in run.data.tags["error"]
    assert "max_seq_length" in run.data.tags["error"]
    assert "accuracy_cosine" not in run.data.metrics and "val_accuracy_cosine" not in run.data.metrics


def test_the_closing_link_points_at_the_port_the_ui_is_started_on(compose, monkeypatch, caplog):
    """`make mlflow-ui` and the job's closing paragraph both read EMBFT_MLFLOW_UI_PORT."""
    import logging
    import re
    from pathlib import Path

    from embft.app import Job, JobResult, summarize
    from embft.evaluation.classification import EvalResult
    from embft.training.base import TrainResult

    monkeypatch.setenv("EMBFT_MLFLOW_UI_PORT", "5123")
    cfg = compose([])
    score = EvalResult(accuracy=0.8, accuracy_std=0.01, f1=0.79, n_test=10, scores={})
    result = JobResult(
        baseline={"test": score, "validation": score},
        scores={"test": score, "validation": score},
        train=TrainResult(Path("m"), 10.0, 5, 0.5, 1, "fp32", "cpu"),
        eval_seconds=1.0,
    )
    job = Job(cfg, {}, "h", "accuracy_cosine", "7", Path("."), Path("."), "cpu", None)
    with caplog.at_level(logging.INFO, logger="embft"):
        summarize(job, "abc", result)
    assert "http://127.0.0.1:5123/#/experiments/7/runs/abc" in caplog.text
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert re.search(r"--port \$\(EMBFT_MLFLOW_UI_PORT\)", makefile), "the UI starts on the port the link uses"


# ------------------------------------------------------------------------------ the trainer interface


@pytest.mark.slow
def test_a_backend_registered_through_config_alone_runs_a_job(compose, tmp_path):
    """train.backend=<dotted path> runs the app's stages through the Trainer interface; the app names
    no backend. The stub copies the base model, so the tuned scores equal the baseline's."""
    import stub_trainer

    from conftest import make_tiny_bert
    from embft.app import run_job
    from test_data import synthetic, write

    model = make_tiny_bert(tmp_path / "tiny")
    folder = write(tmp_path / "data", synthetic(n_per_class=16), synthetic(seed=1))
    stub_trainer.CALLS.clear()
    cfg = compose(
        [
            "experiment=smoke",
            "model.package=null",
            f"model.name_or_path={model}",
            f"data.local_dir={folder}",
            "eval.max_seq_length=32",
            "train.backend=stub_trainer.CopyTrainer",
        ]
    )
    value = run_job(cfg)
    assert stub_trainer.CALLS == ["check", "twin_reason", "prepare", "train"]  # check first: before the store
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("smoke").experiment_id
    (run,) = [r for r in client.search_runs([exp]) if r.data.tags["embft.role"] == "finetune"]
    assert run.info.status == "FINISHED" and run.data.params["train.backend"] == "stub_trainer.CopyTrainer"
    assert run.data.tags["stub.rows"] == str(int(run.data.metrics["train_queries"]))
    assert value == run.data.metrics["val_accuracy_cosine"]
    assert run.data.metrics["delta_val_accuracy_cosine"] == 0 and run.data.metrics["delta_accuracy_cosine"] == 0


@pytest.mark.parametrize(
    "backend,expected",
    [
        ("nope", "train.backend=nope: choose one of flagembedding"),
        ("no_such_module.Trainer", "train.backend=no_such_module.Trainer: cannot load"),
        ("stub_trainer.NotATrainer", "is not a trainer (missing check, twin_reason, prepare, train, live_encoder"),
    ],
)
def test_a_wrong_backend_fails_before_any_work_with_one_line(compose, tmp_path, backend, expected):
    from embft.app import start
    from embft.errors import EmbftError

    with pytest.raises(EmbftError, match=re.escape(expected)):
        start(compose([f"train.backend={backend}"]))
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()


def test_a_store_written_before_the_layout_change_is_skipped_not_retrained(compose):
    """Config hashes and twin keys recorded with the code before the files moved (tests/fixtures,
    made by make_config_hashes.py) are what this code computes: every run of such a store skips."""
    from embft.app import start

    recorded = json.loads((Path(__file__).parent / "fixtures" / "config_hashes_before_layout.json").read_text())
    pins = ["train.device=cpu", "train.precision=fp32", "eval.precision=fp32"]
    moved = []
    for case in recorded["jobs"]:
        job = start(compose([*pins, *case["overrides"]]))
        if job.config_hash != case["config_hash"]:
            # train.keep_model left the identity (hashed as the studies set it, false) and the served
            # classifiers' support set entered it off its defaults: the old hash is looked up beside the new
            # one (app.finished_run, which checks the run's logged support settings)
            off_default = job.cfg.tracking.support_per_class != 256 or job.cfg.tracking.support_from_training
            assert job.cfg.train.keep_model or off_default, case["overrides"]
            assert case["config_hash"] in job.legacy_hashes, case["overrides"]
            moved.append(case["overrides"])
        else:
            assert job.twin_key == case["twin_key"] and job.legacy_hashes == (), case["overrides"]
    studies = [overrides for overrides in moved if any(o.startswith("experiment=") for o in overrides)]
    assert studies == [["experiment=smoke"]], moved  # the studies keep their hashes; smoke's support set is 32


def test_a_long_command_line_names_its_run_within_mlflows_limit():
    """A tracking server on PostgreSQL refuses a run name over 250 characters (SQLite does not): an advise's
    command line is longer. The name keeps what tells the sweep's jobs apart (arm, data, seed) and says "..."
    where it left overrides out; a short one is Hydra's override_dirname as before."""
    from embft.report.labels import arm_from_run_name
    from embft.tracking.mlflow_runs import RUN_NAME_MAX, short_run_name

    overrides = [f"advise.setting_{i}=value_{i}" for i in range(20)] + ["arm=supcon", "train.seed=2", "data=trec"]
    name = short_run_name(overrides)
    assert len(name) <= RUN_NAME_MAX and name.endswith(",...")
    assert name.startswith("arm=supcon,data=trec,train.seed=2,") and arm_from_run_name(name) == "supcon"
    assert short_run_name(["arm=supcon", "train.seed=1"]) == "arm=supcon,train.seed=1"
