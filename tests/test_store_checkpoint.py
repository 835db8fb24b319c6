"""scripts/store_checkpoint.py: a study's stores carried across machines through a file, the runs read back
from MLflow after the restore as they were logged; what it cannot carry (a logged model) refused."""

import importlib.util
import shutil
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "store_checkpoint.py"


@pytest.fixture(scope="module")
def checkpoint():
    spec = importlib.util.spec_from_file_location("store_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _store(root: Path) -> str:
    """An MLflow store as embft lays it out under root/mlruns, with one finished run and its artifact."""
    import mlflow

    store = root / "mlruns"
    store.mkdir(parents=True)
    client = mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db")
    experiment = client.create_experiment("study", artifact_location=str(store / "artifacts" / "study"))
    run = client.create_run(experiment, tags={"embft.config_hash": "abc"})
    client.log_metric(run.info.run_id, "val_accuracy_cosine", 0.8123)
    (root / "notes.json").write_text('{"rows": 7}')
    client.log_artifact(run.info.run_id, str(root / "notes.json"))
    client.set_terminated(run.info.run_id)
    (store / "optuna.db").write_bytes(b"trials")
    return run.info.run_id


def test_a_restored_store_gives_back_its_runs_metrics_and_artifacts(checkpoint, tmp_path) -> None:
    import mlflow

    root = tmp_path / "run"
    run_id = _store(root)
    saved = tmp_path / "repo" / "cell" / "store.tar.gz"
    names = checkpoint.save(saved, root)
    assert {"mlflow.db", "optuna.db"} <= set(names)
    shutil.rmtree(root / "mlruns")  # the next session's machine: no store
    checkpoint.restore(saved, root)
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["val_accuracy_cosine"] == 0.8123
    assert run.data.tags["embft.config_hash"] == "abc"
    notes = Path(client.download_artifacts(run_id, "notes.json", str(tmp_path / "out")))
    assert notes.read_text() == '{"rows": 7}'
    assert (root / "mlruns" / "optuna.db").read_bytes() == b"trials"


def test_what_a_checkpoint_cannot_carry_is_refused(checkpoint, tmp_path) -> None:
    root = tmp_path / "run"
    _store(root)
    saved = tmp_path / "store.tar.gz"
    checkpoint.save(saved, root)
    with pytest.raises(checkpoint.CheckpointError, match="holds a store already"):
        checkpoint.restore(saved, root)  # never over a store
    with pytest.raises(checkpoint.CheckpointError, match=f"was saved at {root} .*git worktree add {root}"):
        checkpoint.restore(saved, tmp_path / "elsewhere")  # the stores name their own paths
    model = root / "mlruns" / "artifacts" / "study" / "models" / "m-1"
    model.mkdir(parents=True)
    with pytest.raises(checkpoint.CheckpointError, match="holds a logged model"):
        checkpoint.save(tmp_path / "later.tar.gz", root)
    assert not (tmp_path / "later.tar.gz").exists()


@pytest.mark.slow
def test_an_advise_stopped_in_its_search_resumes_from_a_checkpoint_on_a_new_machine(checkpoint, tmp_path) -> None:
    """A tiny advise stopped (Ctrl-C) after its first finished search trial, its stores carried through a
    checkpoint to an empty mlruns/ (no job folders either): the rerun keeps every finished run, trains none
    of them again, and ends with the recommendation and the champion."""
    import contextlib
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    import optuna
    from test_advise import _data, _tuned, advise_overrides

    from conftest import make_tiny_bert
    from test_pipeline import embft, runs

    model, data, root = make_tiny_bert(tmp_path / "tiny"), _data(tmp_path / "alpha"), tmp_path / "root"
    args = ["-m", *advise_overrides(data, model, "alpha", "supcon,setfit")]
    env = {**os.environ, "EMBFT_ROOT": str(root), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    first = subprocess.Popen(
        [sys.executable, "-m", "embft", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # a shell's background job (CI's runner may be one) starts with SIGINT ignored: Ctrl-C's default back
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    storage, deadline = f"sqlite:///{root}/mlruns/optuna.db", time.monotonic() + 600

    def trials(url: str) -> dict[tuple[str, int], object]:
        """The finished trials of every study: (study, number) -> when it finished."""
        if not (root / "mlruns" / "optuna.db").exists():
            return {}
        try:
            names = optuna.get_all_study_names(url)
        except Exception:  # the sweeper is still creating the schema
            return {}
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return {
            (name, t.number): t.datetime_complete
            for name in names
            for t in optuna.load_study(study_name=name, storage=url).get_trials(states=states)
        }

    while not trials(storage):  # the observable state the stop waits for
        assert first.poll() is None, "the advise ended before it could be stopped"
        assert time.monotonic() < deadline, "no search trial finished in 10 min"
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)
    first.wait(timeout=300)
    done_before = trials(storage)
    # Read with sqlite3, not MLflow: MLflow keeps one engine per store URI, which would go on reading the
    # deleted file after the restore below (a new machine is a new process).
    finished = (
        "select r.run_uuid from runs r join tags t on t.run_uuid = r.run_uuid "
        "where t.key = 'embft.role' and t.value = 'finetune' and r.status = 'FINISHED'"
    )
    with contextlib.closing(sqlite3.connect(root / "mlruns" / "mlflow.db")) as db:
        before = {row[0] for row in db.execute(finished)}
    assert before, "the stop came after a finished trial"

    saved = tmp_path / "store.tar.gz"
    checkpoint.save(saved, root)
    shutil.rmtree(root / "mlruns")
    shutil.rmtree(root / "multirun", ignore_errors=True)
    checkpoint.restore(saved, root)
    # no run travels RUNNING: on the next machine nothing could tell that its process is gone
    with contextlib.closing(sqlite3.connect(root / "mlruns" / "mlflow.db")) as db:
        assert not list(db.execute("select run_uuid from runs where status = 'RUNNING'"))
    again = embft(root, *args)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]

    tuned = _tuned(runs(root, "advise_alpha_6"))
    assert before <= {r.info.run_id for r in tuned}, "every finished run kept"
    done = trials(storage)
    assert done_before.items() <= done.items(), "the searches resumed: their finished trials are the same trials"
    assert sum(1 for name, _ in done if not name.endswith("/seeds")) == 2 * 2, "2 trials an arm, not more"
    hashes = [r.data.tags["embft.config_hash"] for r in tuned if r.info.status == "FINISHED"]
    assert len(hashes) == len(set(hashes)), "no finished job trained twice"
    assert (root / "experiments" / "advise" / "alpha_6" / "advise.md").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    assert client.get_model_version_by_alias("advise_alpha_6", "champion").run_id in {r.info.run_id for r in tuned}
