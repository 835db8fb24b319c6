"""Bad input: one clear error naming what is wrong, refused before the MLflow store is opened where the
data, the model and the settings tell (no run, no parent run, no store file), else a FAILED run and
nothing half-written."""

import os
import subprocess
import sys
from pathlib import Path

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
        (
            "unknown-model",
            [f"data.local_dir={good}", "model.package=null", "model.name_or_path=nobody/no-such-model"],
            "nobody/no-such-model.*model=minilm",
        ),
        (
            "no-weights",
            [f"data.local_dir={good}", "model.package=null", f"model.name_or_path={no_weights}"],
            "has no weights",
        ),
        (
            "same-batch-zero",
            [f"data.local_dir={good}", "variant=same", "train.per_device_train_batch_size=1"],
            "same_dataset_batch_size",
        ),
    ]


@pytest.mark.parametrize(
    "case",
    range(7),
    ids=[
        "missing-folder",
        "missing-column",
        "one-class",
        "group-too-large",
        "unknown-model",
        "no-weights",
        "same-batch-zero",
    ],
)
def test_bad_input_fails_cleanly(compose, tmp_path, case, monkeypatch):
    import mlflow

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name, overrides, message = bad_cases(tmp_path)[case]
    cfg = compose(["experiment=smoke", f"name=bad_{name}", *overrides])
    with pytest.raises(EmbftError, match=message):
        run_job(cfg)
    assert mlflow.active_run() is None
    if name in FOUND_IN_TRAINING:  # the trainer's own data, drawn in the run
        assert_one_failed_run(tmp_path, f"bad_{name}", message)
    else:
        assert not (tmp_path / "mlruns").exists(), "refused before the store is opened: no record at all"
    assert not leftovers(tmp_path / "out"), "nothing may be left in the job's folder"


FOUND_IN_TRAINING = ("group-too-large",)  # the records' negatives per class: known once they are drawn


def leftovers(folder: Path) -> list[Path]:
    """Everything in a job's output folder, hidden temporary folders (.flagembedding.*, .model.*) included."""
    return sorted(folder.iterdir()) if folder.is_dir() else []


def assert_one_failed_run(root: Path, experiment: str, message: str):
    """The job's one fine-tune run is FAILED, with the error as tag `error` and artifact `error.txt`."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    tuned = [r for r in runs if r.data.tags.get("embft.role") == "finetune"]
    assert [r.info.status for r in tuned] == ["FAILED"]
    assert not any(r.info.status == "RUNNING" for r in runs)
    import re

    assert re.search(message, tuned[0].data.tags["error"])
    error_txt = Path(client.download_artifacts(tuned[0].info.run_id, "error.txt", str(root / "downloaded")))
    text = error_txt.read_text()
    assert text.startswith("Traceback") and re.search(message, text), text[-2000:]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    from conftest import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_errors"))


def fake_training(spec, callbacks=()):
    """Stands in for FlagEmbedding: 'trains' by copying the start model where the runner saves."""
    import shutil

    from embft.training.flagembedding.runner import RunnerOutcome

    shutil.copytree(spec.model_args["model_name_or_path"], spec.training_args["output_dir"], dirs_exist_ok=True)
    return RunnerOutcome(seconds=1.0, losses=[(1, 1.0)])


def half_written_training(spec, callbacks=()):
    (Path(spec.training_args["output_dir"]) / "model.safetensors").write_bytes(b"half")
    raise RuntimeError("disk full while training")


def half_written_save(self, path, *args, **kwargs):
    (Path(path) / "config.json").write_text("{")
    raise OSError("disk full while saving")


@pytest.mark.slow  # no real training, but a model load and an MTEB baseline: ~15 s each
@pytest.mark.parametrize("where", ["training", "saving"])
def test_failure_mid_training_leaves_no_model_folder(compose, tmp_path, tiny_bert, monkeypatch, where):
    """Training or the model's save dies half-way: the run is FAILED with error.txt, and neither a
    `model` folder nor a temporary one is left in the job's folder."""
    from sentence_transformers import SentenceTransformer

    import embft.training.flagembedding.train

    if where == "training":
        monkeypatch.setattr(embft.training.flagembedding.train, "run_runner", half_written_training)
    else:
        monkeypatch.setattr(embft.training.flagembedding.train, "run_runner", fake_training)
        monkeypatch.setattr(SentenceTransformer, "save", half_written_save)
    good = write(tmp_path / "good", synthetic(), synthetic(seed=1))
    cfg = compose(
        [
            "experiment=smoke",
            "name=mid_training",
            f"data.local_dir={good}",
            f"model.name_or_path={tiny_bert}",
            "model.package=null",
            "train.keep_model=true",
        ]
    )
    with pytest.raises((RuntimeError, OSError), match=f"disk full while {where}"):
        run_job(cfg)
    assert_one_failed_run(tmp_path, "mid_training", f"disk full while {where}")
    assert (tmp_path / "out").is_dir(), "training started in the job's folder"
    assert not leftovers(tmp_path / "out"), f"left behind: {leftovers(tmp_path / 'out')}"


def test_unwritable_tracking_location(compose, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        # root (as CI runs) writes through permissions; nobody, root included, can create folders in /proc.
        target = locked if not os.access(locked, os.W_OK) else Path("/proc/embft-unwritable")
        good = write(tmp_path / "good", synthetic(), synthetic(seed=1))  # the data is read before the store
        cfg = compose(["experiment=smoke", f"data.local_dir={good}", f"tracking.uri=sqlite:///{target}/sub/mlflow.db"])
        with pytest.raises(EmbftError, match=f"cannot write to {target}/sub .*choose a writable location"):
            run_job(cfg)
    finally:
        locked.chmod(0o700)


def test_tracking_location_that_is_a_file(compose, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    good = write(tmp_path / "good", synthetic(), synthetic(seed=1))
    cfg = compose(["experiment=smoke", f"data.local_dir={good}", f"tracking.uri=sqlite:///{blocker}/mlflow.db"])
    with pytest.raises(EmbftError, match="choose a writable location"):
        run_job(cfg)


def test_command_line_prints_one_line_and_exits_non_zero(tmp_path):
    env = {**os.environ, "EMBFT_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-m", "embft", f"data.local_dir={tmp_path}/missing"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "no such folder" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_debug_shows_the_traceback(tmp_path):
    env = {**os.environ, "EMBFT_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-m", "embft", f"data.local_dir={tmp_path}/missing", "debug=true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in output and "EmbftError" in output and "no such folder" in output


@pytest.fixture(scope="module")
def bad_input_root(tmp_path_factory, tiny_bert) -> tuple[Path, list]:
    tmp = tmp_path_factory.mktemp("bad_input_cli")
    good = write(tmp / "good", synthetic(), synthetic(seed=1))
    tiny = [f"data.local_dir={good}", "model.package=null", f"model.name_or_path={tiny_bert}"]
    return tmp, tiny


CLI_CASES = {  # each as a user types it; what the one line must say
    "wrong-data-path": (["data.local_dir=/nonexistent/folder"], "data.local_dir='/nonexistent/folder': no such folder"),
    "missing-label-column": (["data.label_column=category"], "no column 'category'"),
    "unknown-model": (["model.name_or_path=nobody/no-such-model"], "Cannot get model 'nobody/no-such-model'"),
    "setfit-with-supcon": (["train=setfit", "train.loss=supcon"], "train.backend=setfit trains with cosine_similarity"),
    "batch-larger-than-data": (
        ["train=sentence_transformers", "train.per_device_train_batch_size=64"],
        "16 labelled texts fill no batch of 64",
    ),
    "fe-setting-on-supcon": (
        ["train=sentence_transformers", "variant=same_nib"],
        "variant=same_nib: only train.backend=flagembedding reads it",
    ),
    "database-down": (
        ["tracking.uri=postgresql://embft:secret@127.0.0.1:9/embft"],
        r"tracking.uri=postgresql\+psycopg2://embft:\*\*\*@127.0.0.1:9/embft: the database does not answer",
    ),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_bad_input_is_refused_before_the_store_is_opened(bad_input_root, case):
    """`python -m embft` with a bad input: exit 1 with one line naming it, in seconds, and the store left
    as it was: no mlflow.db, no experiment, no run, no parent run (issue 34 item 7)."""
    import re
    import time

    root, tiny = bad_input_root
    overrides, message = CLI_CASES[case]
    named = {o.split("=")[0] for o in overrides}
    tiny = [o for o in tiny if o.split("=")[0] not in named]  # the case's value, not the tiny default
    env = {**os.environ, "EMBFT_ROOT": str(root / case), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "embft", "experiment=smoke", *tiny, *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert re.search(message, output), output[-3000:]
    assert "Traceback" not in output and "secret" not in output, output[-3000:]
    assert time.monotonic() - began < 60, "refused in seconds, not after a store's retries"
    assert not (root / case / "mlruns").exists(), f"the store was touched: {sorted((root / case).rglob('mlruns*'))}"


def test_unknown_config_key_is_hydras_error(tmp_path):
    env = {**os.environ, "EMBFT_ROOT": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "embft", "train.lr=1"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "Key 'lr' not in 'TrainConfig'" in done.stderr
