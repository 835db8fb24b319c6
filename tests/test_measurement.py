"""How embft measures: a validation split kept out of everything training sees, one encoder
setting for both sides of a comparison, and out-of-range values refused before any work."""

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import make_tiny_bert
from embft.app import run_job
from embft.config import DataConfig, EvalConfig
from embft.data import load_splits
from embft.errors import EmbftError
from embft.evaluation.classification import make_task
from embft.training.flagembedding.records import prepare_records
from test_data import synthetic, write


def _splits_with_duplicates(tmp_path):
    train = synthetic(n_per_class=40)
    # Every text twice: a held-out copy must take its twin out of train as well.
    train = pd.concat([train, train], ignore_index=True)
    folder = write(tmp_path / "d", train, synthetic(seed=1))
    return load_splits(DataConfig(name="local", local_dir=str(folder), validation=0.25, seed=3))


def test_validation_is_stratified_seeded_and_recorded(tmp_path):
    splits = _splits_with_duplicates(tmp_path)
    again = _splits_with_duplicates(tmp_path)
    assert splits.validation.equals(again.validation)
    assert splits.validation["label"].value_counts().tolist() == [20] * 4  # 25% of 80 rows per class
    notes = splits.notes
    assert notes["validation_rows"] == len(splits.validation) == 80
    assert len(notes["validation_fingerprint"]) == 16 and "data.validation=0.25" in notes["validation_source"]
    assert not set(splits.train["text"]) & set(splits.validation["text"])


def test_validation_rows_never_reach_records_negatives_or_knn_support(tmp_path):
    splits = _splits_with_duplicates(tmp_path)
    held_out = set(splits.validation["text"])
    rng = np.random.default_rng(0)
    folders = [
        prepare_records(
            splits,
            cache_dir=tmp_path / "cache",
            dataset_name="d",
            no_in_batch_neg=True,
            encode=lambda texts: rng.normal(size=(len(texts), 8)),
            model_key="m",
            pairing=pairing,
            group_size=4,
            seed=0,
            max_queries=None,
            prompt="",
            batch_size=None,
        )
        for pairing in ("examples", "hard")
    ]
    for folder in folders:
        records = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
        seen = {t for r in records for t in [r["query"], *r["pos"], *r["neg"]]}
        assert seen and not seen & held_out, folder.name
    mined = np.load(next((tmp_path / "cache" / "hard_negatives").glob("*/neighbours.npy")))
    assert mined.shape[0] == len(splits.train) and mined.max() < len(splits.train)  # indices into train only

    task = make_task(splits, EvalConfig(max_validation_rows=None), "d")
    support = set(task.dataset["train"]["text"])
    assert support == set(splits.train["text"]) and not support & held_out
    assert set(task.dataset["validation"]["text"]) == held_out


def test_dataset_own_validation_split_is_used(tmp_path):
    folder = write(tmp_path / "d", synthetic(), synthetic(seed=1))
    synthetic(n_per_class=5, seed=2).to_csv(folder / "dev.csv", index=False)
    splits = load_splits(DataConfig(name="local", local_dir=str(folder), validation_split="dev"))
    assert len(splits.validation) == 20 and len(splits.train) == 48
    assert "split dev" in splits.notes["validation_source"] and "dev.csv" in splits.notes["validation_source"]


def test_validation_smaller_than_the_classes_is_refused(tmp_path):
    folder = write(tmp_path / "d", synthetic(), synthetic(seed=1))
    with pytest.raises(EmbftError, match=r"data.validation=3 holds out 3 of 48 rows.*4 classes"):
        load_splits(DataConfig(name="local", local_dir=str(folder), validation=3))


BAD_VALUES = [
    ("train.temperature=-1", "train.temperature=-1.0: must be > 0"),
    ("train.learning_rate=0", "train.learning_rate=0.0: must be > 0"),
    ("train.train_group_size=1", "train.train_group_size=1: must be >= 2"),
    ("train.num_train_epochs=0", "train.num_train_epochs=0.0: must be > 0"),
    ("train.per_device_train_batch_size=0", "train.per_device_train_batch_size=0: must be >= 1"),
    ("train.same_dataset_batch_size=0", "train.same_dataset_batch_size=0: must be >= 1"),
    ("train.warmup_ratio=1", "train.warmup_ratio=1.0: must be in [0, 1)"),
    ("train.max_train_queries=0", "train.max_train_queries=0: must be >= 1"),
    ("train.nproc_per_node=0", "train.nproc_per_node=0: must be >= 1"),
    ("eval.k=0", "eval.k=0: must be >= 1"),
    ("eval.samples_per_label=0", "eval.samples_per_label=0: must be >= 1"),
    ("eval.n_experiments=0", "eval.n_experiments=0: must be >= 1"),
    ("eval.max_seq_length=0", "eval.max_seq_length=0: must be >= 1"),
    ("eval.batch_size=0", "eval.batch_size=0: must be >= 1"),
    ("eval.max_validation_rows=0", "eval.max_validation_rows=0: must be >= 1"),
    ("data.validation=0", "data.validation=0.0: must be a fraction in (0, 1)"),
    ("data.validation=2.5", "data.validation=2.5: must be a fraction"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_out_of_range_value_fails_before_any_work(compose, tmp_path, override, message):
    cfg = compose(["experiment=smoke", "data.local_dir=/nonexistent", override])
    with pytest.raises(EmbftError) as err:
        run_job(cfg)
    assert str(err.value).startswith(message)
    assert mlflow.active_run() is None
    assert not (tmp_path / "mlruns").exists(), "refused before the store is even opened"


@pytest.mark.parametrize(
    "override",
    [
        "model.pooling=foo",
        "train.loss=fast",
        "train.precision=fp16",
        "data.pairing=random",
        "train.device=tpu",
        "eval.method=svm",
        "eval.metric=dot",
        "eval.objective=train",
    ],
)
def test_wrong_choice_fails_at_composition(compose, override):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose([override])
    assert "expected one of" in str(err.value.__cause__)


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.temperature=-1", "train.temperature=-1.0: must be > 0"),
        ("model.pooling=foo", "Invalid value 'foo', expected one of"),
    ],
)
def test_command_line_refuses_a_bad_value_in_seconds_with_one_line(tmp_path, override, expected):
    """Refused before any work: no data, model or MLflow store is opened (each records a call in
    the job's process and fails), and the error is one line."""
    env = {**os.environ, "EMBFT_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    opened = tmp_path / "opened.txt"
    done = subprocess.run(
        [sys.executable, "-c", _REFUSED_BEFORE_ANY_WORK, str(opened), override],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert not opened.exists(), f"opened before refusing {override}: {opened.read_text().split()}\n{output[-2000:]}"
    assert done.returncode == 1 and expected in output and "Traceback" not in output, output[-2000:]
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()


# `python -m embft ARGS` (argv: RECORD ARGS) in which whatever opens the data, a model or the MLflow
# store appends its name to the file RECORD and raises.
_REFUSED_BEFORE_ANY_WORK = """
import runpy, sys
from pathlib import Path

import mlflow
import embft.data, embft.encoding.model_folder, embft.encoding.encoders, embft.tracking.mlflow_runs

record = Path(sys.argv.pop(1))


def opened(name):
    def call(*args, **kwargs):
        with record.open("a") as out:
            out.write(name + "\\n")
        raise RuntimeError(f"{name} was called")

    return call


for owner, names in [
    (embft.data, ["load_splits"]),
    (embft.encoding.model_folder, ["resolve_model_path", "sentence_transformer"]),
    (embft.encoding.encoders, ["build_encoder"]),
    (embft.tracking.mlflow_runs, ["setup"]),
    (mlflow, ["set_tracking_uri", "start_run", "get_experiment_by_name", "create_experiment"]),
    (mlflow.MlflowClient, ["__init__"]),
]:
    for name in names:
        setattr(owner, name, opened(f"{owner.__name__}.{name}"))
runpy.run_module("embft", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_both_sides_of_a_job_are_encoded_identically(compose, tmp_path, monkeypatch):
    """The baseline and the tuned model come from one builder with one EncodeSettings, the encoders
    are equal in every setting that matters, and the tuned folder keeps the evaluation length."""
    import embft.encoding.encoders as encoders

    model = make_tiny_bert(tmp_path / "tiny")
    folder = write(tmp_path / "data", synthetic(n_per_class=16), synthetic(seed=1))
    built = []
    real_build = encoders.build_encoder

    def spy(path, pooling, normalize, settings, device=None):
        encoder = real_build(path, pooling, normalize, settings, device)
        built.append((path, (pooling, normalize, settings), encoders.describe_encoder(encoder)))
        return encoder

    monkeypatch.setattr(encoders, "build_encoder", spy)
    cfg = compose(
        [
            "experiment=smoke",
            "model.package=null",
            f"model.name_or_path={model}",
            f"data.local_dir={folder}",
            "train.keep_model=true",
            "eval.max_seq_length=48",
            "train.query_max_len=16",
            "train.passage_max_len=16",
            "train.device=cpu",
        ]
    )
    value = run_job(cfg)
    assert len(built) == 2
    (base_path, base_settings, base_desc), (tuned_path, tuned_settings, tuned_desc) = built
    assert base_path == str(model) and tuned_path.endswith("model")
    assert base_settings == tuned_settings and base_settings[2].max_seq_length == 48
    assert base_desc == tuned_desc and base_desc["max_seq_length"] == 48

    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(tuned_path, device="cpu").max_seq_length == 48  # saved with the evaluation length
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    run = [
        r
        for r in client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
        if r.data.tags["embft.role"] == "finetune"
    ][0]
    assert value == run.data.metrics["val_accuracy_cosine"]  # the objective is the validation score
    assert run.data.params["eval.max_seq_length"] == "48" and "accuracy_cosine" in run.data.metrics
