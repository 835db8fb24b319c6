"""The data configs beside ag_news (emotion, trec, sst5): offline from one data root with no path on
the command line, label names in the loader's id order, and bad input refused in one line naming
the dataset, the split and the class."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from embft.config import DataConfig, EvalConfig
from embft.data import load_splits, local_folder
from embft.errors import EmbftError

NEW = ["emotion", "trec", "sst5"]
SHARED = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def shared_copy(name):
    if not os.path.isfile(os.path.join(SHARED, name, "train.csv")):
        pytest.skip(f"no local copy of {name} at {SHARED}")


@pytest.mark.parametrize("name", NEW)
def test_each_config_loads_offline_from_the_data_root(compose, name, monkeypatch):
    shared_copy(name)
    monkeypatch.delenv("EMBFT_DATA_ROOT", raising=False)
    cfg = compose([f"data={name}"])
    splits = load_splits(cfg.data)
    assert splits.source == f"local:{SHARED}/{name}"
    mapping = splits.notes["label_mapping"]  # string labels: ids in sorted order
    assert list(mapping) == sorted(mapping) and [n.split(":")[0] for n in splits.label_names] == list(mapping)
    own = name != "trec"
    assert splits.notes["validation_source"].startswith("held out" if not own else f"data={name}, split validation")
    assert cfg.data.hub_path and cfg.data.hub_label_column


def test_local_dir_wins_and_env_root_moves_every_config(compose, tmp_path, monkeypatch):
    shared_copy("trec")
    cfg = compose(["data=trec", f"data.local_dir={SHARED}/emotion"])
    assert local_folder(cfg.data) == __import__("pathlib").Path(SHARED, "emotion")
    (tmp_path / "trec").mkdir()
    monkeypatch.setenv("EMBFT_DATA_ROOT", str(tmp_path))
    assert local_folder(compose(["data=trec"]).data) == tmp_path / "trec"
    monkeypatch.setenv("EMBFT_DATA_ROOT", str(tmp_path / "elsewhere"))
    assert local_folder(compose(["data=trec"]).data) is None  # no copy there: the Hub
    assert local_folder(compose(["data=ag_news"]).data) is None  # its copy is a sample: never by default


def test_without_a_copy_the_hub_error_names_the_root(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose(["data=sst5", f"data.root={tmp_path}"])
    with pytest.raises(EmbftError, match=r"SetFit/sst5.*data.local_dir=data.root/sst5"):
        load_splits(cfg.data)


def test_the_data_root_is_a_location_never_hashed(compose, tmp_path):
    from embft.app import start

    pins = ["train.device=cpu", "train.precision=fp32", "eval.precision=fp32", "data=emotion"]
    assert start(compose(pins)).config_hash == start(compose([*pins, f"data.root={tmp_path}"])).config_hash
    assert start(compose(pins)).config_hash != start(compose([*pins, "data.folder=trec"])).config_hash


def test_hub_class_labels_are_read_as_names(monkeypatch):
    """A Hub ClassLabel (ids in the Hub's order) becomes its names, so Hub ids equal the local copy's."""
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["sadness", "joy"])}
    )

    def fake_load(path, revision=None, split=None):
        rows = {"text": [f"{split} {i}" for i in range(6)], "label": [0, 1, 0, 1, 0, 1]}
        return datasets.Dataset.from_dict(rows, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = DataConfig(name="emo", hub_path="x/emo", hub_label_column="label", validation_split="validation")
    splits = load_splits(cfg)
    assert splits.notes["label_mapping"] == {"joy": 0, "sadness": 1}
    assert splits.train.set_index("text")["label"]["train 0"] == 1  # Hub id 0 = sadness = sorted id 1


# --- bad input: one line naming the dataset, the split and the class -----------------------------------


def write(folder, train, test, validation=None):
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in (("train", train), ("test", test), ("validation", validation)):
        if frame is not None:
            frame.to_csv(folder / f"{name}.csv", index=False)
    return folder


def frame(counts, tag="t"):
    return pd.DataFrame(
        [{"text": f"{label} {tag} {i}", "label": label} for label, n in counts.items() for i in range(n)]
    )


def cfg(folder, **kw):
    return DataConfig(name="toy", local_dir=str(folder), **kw)


def one_line(err):
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_class_too_small_for_the_hold_out(tmp_path):
    train = frame({"joy": 20, "fear": 3})
    folder = write(tmp_path, train, frame({"joy": 2, "fear": 2}, "test"))
    with pytest.raises(EmbftError) as err:
        load_splits(cfg(folder, validation=0.5))
    assert all(s in one_line(err) for s in ("data=toy", "split train", "['fear']", "after holding out"))
    with pytest.raises(EmbftError) as err:
        load_splits(cfg(write(tmp_path / "b", frame({"joy": 20, "fear": 1}), frame({"joy": 2}, "test"))))
    assert all(s in one_line(err) for s in ("data=toy", "split train", "['fear']", "single example"))


def test_a_validation_class_that_train_lacks(tmp_path):
    folder = write(
        tmp_path, frame({"joy": 20, "fear": 20}), frame({"joy": 2}, "test"), frame({"joy": 2, "love": 1}, "v")
    )
    with pytest.raises(EmbftError) as err:
        load_splits(cfg(folder, validation_split="validation"))
    assert all(s in one_line(err) for s in ("data=toy", "split validation", "['love']", "never occur in train"))
    test_only = write(tmp_path / "t", frame({"joy": 20, "fear": 20}), frame({"joy": 2, "love": 2}, "test"))
    with pytest.raises(EmbftError, match=r"data=toy, split test .*\['love'\] never occur in train"):
        load_splits(cfg(test_only))


@pytest.mark.parametrize("blank", [None, "", "   "], ids=["missing", "empty", "blank"])
def test_a_label_column_with_empty_values(tmp_path, blank):
    train = frame({"joy": 20, "fear": 20})
    train.loc[[3, 7], "label"] = blank
    with pytest.raises(EmbftError) as err:
        load_splits(cfg(write(tmp_path, train, frame({"joy": 2}, "test"))))
    assert all(s in one_line(err) for s in ("data=toy", "split train", "2 rows have no label", "rows 3, 7"))


def test_a_class_too_small_for_the_knn_support_set(tmp_path):
    from embft.evaluation.classification import check_support

    splits = load_splits(cfg(write(tmp_path, frame({"joy": 40, "fear": 9}), frame({"joy": 2}, "test"))))
    check_support(splits, EvalConfig(samples_per_label=8), "toy")
    with pytest.raises(EmbftError) as err:
        check_support(splits, EvalConfig(samples_per_label=16), "toy")
    assert all(s in one_line(err) for s in ("data=toy", "split train", "'fear' (8 rows)", "eval.samples_per_label=16"))


# --- one smoke job per new config, offline, no path on the command line ----------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_smoke_job_runs_offline(name, tmp_path):
    shared_copy(name)
    env = {**os.environ, "EMBFT_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env["EMBFT_DATA_ROOT"] = SHARED  # EMBFT_ROOT moves the project root away from ../shared/data
    # A smaller smoke: the study's model, a few queries, capped rows; minutes on two CPU cores.
    args = [
        "experiment=smoke",
        f"data={name}",
        "train.max_train_queries=8",
        "eval.max_test_rows=60",
        "eval.max_validation_rows=60",
        "tracking.log_model=none",
        "eval.n_experiments=1",
    ]
    done = subprocess.run([sys.executable, "-m", "embft", *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("smoke")
    (run,) = client.search_runs([exp.experiment_id], "tags.`embft.role` = 'finetune'")
    assert run.info.status == "FINISHED" and {"f1_macro", "val_f1_macro", "baseline_f1_macro"} <= set(run.data.metrics)
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"confusion_matrix_test.png", "baseline_confusion_matrix_validation.png", "per_class_test.json"} <= files
