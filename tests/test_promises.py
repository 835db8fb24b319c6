"""README promises through the real command, on one project root and a tiny BERT (seconds of
training), sharing jobs between assertions to keep CI short:

- two identical jobs started together: exactly one trains, the other skips; no live run KILLED;
- Ctrl-C and SIGTERM mark the run KILLED, and `force=true` reruns a finished job to completion;
- the baseline cache is reused for equal eval settings and recomputed when one changes;
- `train=fast` and `eval=logreg` end to end; `embft report NAME` with its default output folder;
- a variant whose no_in_batch_neg suffix cannot change training takes its twin's run (reuse_twin);
- Optuna trials in parallel through the joblib launcher.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_bert, start_held_in_training, wait_until_held_in_training
from test_pipeline import runs

pytestmark = pytest.mark.slow
NAME = "promises"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("promises_root")


@pytest.fixture(scope="module")
def tiny_args(tmp_path_factory, ag_news_dir) -> list[str]:
    tiny = make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_promises"))
    return [
        "experiment=smoke",
        f"data.local_dir={ag_news_dir}",
        f"model.name_or_path={tiny}",
        "model.package=null",
        "eval.max_test_rows=120",
        f"name={NAME}",
    ]


def start(root: Path, *args: str, cwd=None) -> subprocess.Popen:
    env = {**os.environ, "EMBFT_ROOT": str(root), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    # SIGINT restored: a shell's background job (CI's runner may be one) starts with it ignored,
    # and Python then never raises KeyboardInterrupt.
    return subprocess.Popen(
        [sys.executable, "-m", "embft", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def finish(job: subprocess.Popen, timeout: float = 900) -> tuple[int, str]:
    output, _ = job.communicate(timeout=timeout)
    return job.returncode, output


def tuned(root: Path, experiment: str = NAME):
    return [r for r in runs(root, experiment) if r.data.tags.get("embft.role") == "finetune"]


@pytest.fixture(scope="module")
def twin_jobs(root, tiny_args):
    """Two identical jobs started at the same moment on a fresh store (the race of issue 16)."""
    jobs = [start(root, *tiny_args) for _ in range(2)]
    return [finish(job) for job in jobs]


def test_two_identical_jobs_train_once_and_kill_nothing(root, twin_jobs):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    for code, output in twin_jobs:
        assert code == 0, output[-4000:]
    outputs = [output for _, output in twin_jobs]
    assert sum("is running elsewhere as run" in o for o in outputs) == 1, [o[-1500:] for o in outputs]
    assert not any("as KILLED" in o for o in outputs), "no job may close the other's live run"
    finished = tuned(root)
    assert [r.info.status for r in finished] == ["FINISHED"], "exactly one run of the config, FINISHED"
    skipped = next(o for o in outputs if "running elsewhere" in o)
    assert finished[0].info.run_id in skipped, "the skipping job names the run that has the config"
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name(NAME).experiment_id
    withdrawn = client.search_runs([exp], run_view_type=ViewType.DELETED_ONLY)
    assert len(withdrawn) == 1 and withdrawn[0].data.tags["embft.backed_off_to"] == finished[0].info.run_id


def test_ctrl_c_marks_the_run_killed_and_force_reruns_a_finished_job(root, tiny_args, twin_jobs, tmp_path):
    """force=true retrains a FINISHED config; Ctrl-C in that training ends its run KILLED and the
    rerun completes, reusing the cached baseline (equal eval settings)."""
    from mlflow.tracking import MlflowClient

    more = [*tiny_args, "force=true", "train.max_train_queries=48"]  # same config hash: force is a location key
    env = {**os.environ, "EMBFT_ROOT": str(root), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    marker, log = tmp_path / "in_training", tmp_path / "job.log"
    job = start_held_in_training(more, env, marker, log)
    try:
        step = wait_until_held_in_training(job, marker, log)
        # The store agrees: this job's run won its claim, is RUNNING and has logged a loss.
        (live,) = [r for r in tuned(root) if r.data.params["train.max_train_queries"] == "48"]
        assert live.info.status == "RUNNING" and live.data.tags["embft.claim"] == "won", live
        loss = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db").get_metric_history(live.info.run_id, "train_loss")
        assert [m.step for m in loss] == [step], loss
        code = None
        for _ in range(5):  # Ctrl-C, again if Python swallowed it ("Exception ignored in" a weakref callback)
            job.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
            try:
                code = job.wait(timeout=60)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    output = log.read_text()
    assert code is not None, f"the job did not end after 5 SIGINTs:\n{output[-3000:]}"
    # An uncaught KeyboardInterrupt: Python ends by SIGINT itself (-2 here, 130 in a shell).
    assert code == -signal.SIGINT and "KeyboardInterrupt" in output, f"exit code {code}\n{output[-3000:]}"
    statuses = sorted(r.info.status for r in tuned(root) if r.data.params["train.max_train_queries"] == "48")
    assert statuses == ["KILLED"], output[-3000:]
    leftovers = list((root / "outputs" / NAME).rglob("model")) + list((root / "outputs" / NAME).rglob(".*.*"))
    assert not [p for p in leftovers if p.is_dir()], f"an interrupted job leaves no model folders: {leftovers}"

    code, output = finish(start(root, *more))
    assert code == 0, output[-4000:]
    assert "Baseline: cache hit" in output
    statuses = sorted(r.info.status for r in tuned(root) if r.data.params["train.max_train_queries"] == "48")
    assert statuses == ["FINISHED", "KILLED"]
    baselines = [r for r in runs(root, NAME) if r.data.tags.get("embft.role") == "baseline"]
    assert len(baselines) == 1, "equal eval settings: the baseline is computed and logged once"

    code, output = finish(start(root, *more))  # force=true: a finished config trains again
    assert code == 0 and "Skipping" not in output, output[-3000:]
    statuses = sorted(r.info.status for r in tuned(root) if r.data.params["train.max_train_queries"] == "48")
    assert statuses == ["FINISHED", "FINISHED", "KILLED"]


def test_sigterm_in_training_ends_the_run_killed_and_the_process_by_sigterm(root, tiny_args, twin_jobs, tmp_path):
    """`kill`, `timeout` and schedulers send SIGTERM: the job cleans up as after Ctrl-C (its run
    KILLED, no model folder left) and still ends by SIGTERM, as the sender expects."""
    args = [*tiny_args, "train.max_train_queries=40"]
    env = {**os.environ, "EMBFT_ROOT": str(root), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    marker, log = tmp_path / "in_training", tmp_path / "job.log"
    job = start_held_in_training(args, env, marker, log)
    try:
        wait_until_held_in_training(job, marker, log)
        job.send_signal(signal.SIGTERM)
        code = job.wait(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    output = log.read_text()
    assert code == -signal.SIGTERM and "Terminated by SIGTERM" in output, f"exit code {code}\n{output[-3000:]}"
    statuses = [r.info.status for r in tuned(root) if r.data.params["train.max_train_queries"] == "40"]
    assert statuses == ["KILLED"], output[-3000:]
    leftovers = [p for p in (root / "outputs" / NAME).rglob("model") if p.is_dir()]
    assert not leftovers, f"a terminated job leaves no model folders: {leftovers}"


def test_train_fast_and_logreg_end_to_end_recompute_the_baseline(root, tiny_args, twin_jobs):
    """train=fast (groupwise loss, batches of 8) with eval=logreg: a new eval setting, so the
    baseline is recomputed under another key, and the logreg metric is logged with its delta."""
    code, output = finish(start(root, *tiny_args, "train=fast", "eval=logreg", "train.max_train_queries=32"))
    assert code == 0, output[-4000:]
    assert "Baseline: cache hit" not in output
    run = next(r for r in tuned(root) if r.data.params["eval.method"] == "logreg")
    assert run.info.status == "FINISHED"
    metrics, params = run.data.metrics, run.data.params
    assert params["train.loss"] == "groupwise" and metrics["effective_batch_size"] == 8
    assert metrics["train_queries"] == 32  # four full batches of 8: the fast path really batched
    assert 0 <= metrics["accuracy_logreg"] <= 1 and "accuracy_cosine" not in metrics
    baselines = {
        r.data.tags["embft.baseline_key"]: r for r in runs(root, NAME) if r.data.tags["embft.role"] == "baseline"
    }
    assert len(baselines) == 2 and run.data.tags["embft.baseline_key"] in baselines
    baseline = baselines[run.data.tags["embft.baseline_key"]].data.metrics["accuracy_logreg"]
    assert metrics["delta_accuracy_logreg"] == pytest.approx(metrics["accuracy_logreg"] - baseline)


def test_a_variant_whose_suffix_cannot_change_training_takes_its_twins_training(root, tiny_args, tmp_path):
    """Mixed batches never read the suffix: a sweep over no_same,no_same_nib, both jobs started
    together by the joblib launcher, trains once (the later waits for the earlier), the other run
    carries the trained run's scores and names it, the registry picks the run with the model;
    train.reuse_twin=false trains the twin for real, to the same scores."""
    from mlflow.tracking import MlflowClient

    from embft import report

    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    code, output = finish(
        start(
            root,
            "-m",
            *tiny_args,
            "name=twins",
            "variant=no_same,no_same_nib",
            "hydra/launcher=parallel",
            "hydra.launcher.n_jobs=2",
        )
    )
    assert code == 0, output[-4000:]
    took = [r for r in tuned(root, "twins") if "embft.trained_as" in r.data.tags]
    trained = [r for r in tuned(root, "twins") if "embft.trained_as" not in r.data.tags]
    assert len(took) == 1 and len(trained) == 1, output[-3000:]
    took, trained = took[0], trained[0]
    assert took.data.tags["embft.trained_as"] == trained.info.run_id
    assert {took.data.params["variant.name"], trained.data.params["variant.name"]} == {"no_same", "no_same_nib"}
    assert "never reads the suffix" in took.data.tags["embft.twin_reason"]
    assert took.data.metrics == trained.data.metrics and "embft.classifier_uri" not in took.data.tags
    assert MlflowClient(uri).get_model_version_by_alias("twins", "champion").run_id == trained.info.run_id
    assert report.main(["twins", "--tracking-uri", uri, "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / "twins" / "report.md").read_text()
    took_lines = [line for line in text.splitlines() if "took a twin run's training" in line]
    assert len(took_lines) == 1 and took.data.params["variant.name"] in took_lines[0], text

    variant = took.data.params["variant.name"]
    code, output = finish(start(root, *tiny_args, "name=twins", f"variant={variant}", "train.reuse_twin=false"))
    assert code == 0 and "Not training" not in output, output[-4000:]
    again = [r for r in tuned(root, "twins") if r.data.params.get("train.reuse_twin") == "False"]
    assert len(again) == 1 and "embft.trained_as" not in again[0].data.tags
    for metric in ("accuracy_cosine", "val_accuracy_cosine"):
        assert again[0].data.metrics[metric] == trained.data.metrics[metric]


def test_report_command_writes_into_experiments_by_default(root, tiny_args, twin_jobs, tmp_path):
    """`embft report NAME` reads the project store (EMBFT_ROOT) and writes ./experiments/NAME/; a
    force=true rerun of a finished config counts once, the older run listed as superseded."""
    code, output = finish(start(root, *tiny_args, "force=true"))  # twin_jobs' config, trained again
    assert code == 0 and "Skipping" not in output, output[-3000:]
    env = {**os.environ, "EMBFT_ROOT": str(root)}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-m", "embft", "report", NAME],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = tmp_path / "experiments" / NAME / "report.md"
    assert report.is_file() and (report.parent / "report.png").stat().st_size > 0
    usable = [r for r in tuned(root) if r.info.status == "FINISHED" and "accuracy_cosine" in r.data.metrics]
    configs = {r.data.tags["embft.config_hash"] for r in usable}  # force=true reran one: it counts once
    text = report.read_text()
    assert f"- Experiment(s): {NAME}" in text and f"used {len(configs)} runs" in text, text[:1500]
    superseded = len(usable) - len(configs)
    assert superseded >= 1 and f"{superseded} FINISHED, superseded by a newer FINISHED run" in text, text[:1500]


def test_optuna_trials_run_in_parallel_through_joblib(tmp_path, tiny_args):
    import optuna

    args = [
        "-m",
        "experiment=search",
        *tiny_args[1:4],
        "name=par_search",
        "hydra/launcher=joblib",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2",
        "train.max_train_queries=12",
        "eval.max_test_rows=120",
        "eval.samples_per_label=8",
        "eval.n_experiments=2",
        "train.num_train_epochs=1",
        "train.train_group_size=choice(4,8)",
    ]
    code, output = finish(start(tmp_path, *args))
    assert code == 0, output[-4000:]
    study = optuna.load_study(study_name="par_search", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    first, second = sorted(tuned(tmp_path, "par_search"), key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time, "the two trials' runs overlap in time"
    assert first.data.tags["embft.sweep"] == second.data.tags["embft.sweep"]
