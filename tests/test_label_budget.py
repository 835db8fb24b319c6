"""train.per_class: N labelled texts of every class, the same rows for every backend, strict (FlagEmbedding's
records and the served classifier's support set read only those texts' labels), refused in one line where the
data or the loss cannot give it, before any store is opened."""

from types import SimpleNamespace

import pandas as pd
import pytest

from embft.errors import EmbftError


def _frame(n_per_class: dict[int, int]) -> pd.DataFrame:
    rows = [(f"text {label} {i}", label) for label, n in n_per_class.items() for i in range(n)]
    return pd.DataFrame(rows, columns=["text", "label"])


def _splits(train: pd.DataFrame, validation: pd.DataFrame | None = None):
    from embft.data import Splits

    labels = sorted(train["label"].unique())
    validation = (
        validation if validation is not None else _frame({c: 2 for c in labels}).assign(text=lambda f: "v" + f["text"])
    )
    return Splits(
        train=train,
        test=validation.copy(),
        validation=validation,
        label_names=[f"class{c}" for c in range(max(labels) + 1)],
        source="test",
    )


def test_per_class_gives_n_texts_of_every_class_seeded_the_same_for_every_backend(compose) -> None:
    from embft.training.labelled import budget_rows

    train = _frame({0: 500, 1: 30, 2: 9})
    st = compose(["train=sentence_transformers", "train.per_class=8", "train.seed=3"]).train
    fe = compose(["train.per_class=8", "train.seed=3", "train.max_train_queries=1000"]).train  # per_class wins
    picked = budget_rows(train, st)
    assert picked["label"].value_counts().to_dict() == {0: 8, 1: 8, 2: 8}  # not shares: the rare class gets 8
    assert picked.equals(budget_rows(train, fe)) and set(picked["text"]) <= set(train["text"])
    other_seed = compose(["train.per_class=8", "train.seed=4"]).train
    assert not picked.equals(budget_rows(train, other_seed))


@pytest.mark.parametrize(
    "overrides,counts,expected",
    [
        (["train.per_class=10"], {0: 40, 1: 7, 2: 3}, "train.per_class=10: class 'class2' has 3 train rows"),
        (
            ["train=sentence_transformers", "train.per_class=1"],
            {0: 40, 1: 40},
            "train.per_class=1: train.backend=sentence_transformers draws a same-class positive",
        ),
        (["train=setfit", "train.per_class=1"], {0: 40, 1: 40}, "each class needs at least 2 labelled texts"),
    ],
)
def test_a_budget_the_data_or_the_loss_cannot_give_is_refused_in_one_line(compose, overrides, counts, expected):
    from embft.training.labelled import check_budget

    with pytest.raises(EmbftError, match=expected) as err:
        check_budget(compose(overrides), _splits(_frame(counts)))
    assert "\n" not in str(err.value)


def test_a_class_without_validation_rows_is_refused(compose) -> None:
    from embft.training.labelled import check_budget

    splits = _splits(
        _frame({0: 20, 1: 20, 2: 20}), validation=_frame({0: 2, 1: 2}).assign(text=lambda f: "v" + f["text"])
    )
    with pytest.raises(EmbftError, match="class 'class2' has no validation rows"):
        check_budget(compose(["train.per_class=4"]), splits)
    check_budget(compose(["train.per_class=4"]), _splits(_frame({0: 20, 1: 20, 2: 20})))  # every class: fine
    # label_text pairing draws no same-class positive: one text a class is a budget it can train on
    check_budget(compose(["train.per_class=1", "data.pairing=label_text"]), _splits(_frame({0: 20, 1: 20, 2: 20})))


def test_flagembedding_records_read_only_the_budgeted_texts(compose, tmp_path) -> None:
    """At a per-class budget FlagEmbedding's positives and negatives come from the same N x classes texts
    (before, 100 queries read ~800 texts' labels); train_labelled_texts counts exactly those."""
    import json

    from embft.training.base import TrainContext
    from embft.training.flagembedding.trainer import FlagEmbeddingTrainer
    from embft.training.labelled import budget_rows

    train = _frame({0: 60, 1: 60, 2: 60, 3: 60})
    cfg = compose(["train.per_class=5", "train.train_group_size=4"])
    ctx = TrainContext(cfg, _splits(train), "m", tmp_path, tmp_path / "cache", "k", {}, lambda texts: None)
    prepared = FlagEmbeddingTrainer().prepare(ctx)
    pool = set(budget_rows(train, cfg.train)["text"])
    records = [json.loads(line) for line in (prepared.data / "train.jsonl").read_text().splitlines()]
    read = {t for r in records for t in (r["query"], *r["pos"], *r["neg"])}
    assert read <= pool and {r["query"] for r in records} == pool  # every budgeted text is a query once
    assert prepared.labelled_texts == len(pool) == 20 and prepared.n_queries == 20


def test_the_support_set_from_training_is_the_budget(compose) -> None:
    from embft.serving.models import support_rows
    from embft.training.labelled import budget_rows

    train = _frame({0: 60, 1: 60, 2: 60})
    cfg = compose(["train.per_class=6", "tracking.support_from_training=true", "tracking.support_per_class=null"])
    support = support_rows(SimpleNamespace(train=train), cfg)
    assert set(support["text"]) == set(budget_rows(train, cfg.train)["text"]) and len(support) == 18


def test_a_job_short_of_its_budget_fails_before_the_store_is_opened(compose, tmp_path) -> None:
    from embft.app import run_job, start
    from test_data import synthetic, write

    folder = write(tmp_path / "data", synthetic(n_per_class=30), synthetic(seed=1))
    with pytest.raises(EmbftError, match=r"train.per_class=40: class '[\w/]+' has 2\d train rows"):
        run_job(compose([f"data.local_dir={folder}", "train.per_class=40"]))
    assert not (tmp_path / "mlruns").exists()
    job = start(compose([f"data.local_dir={folder}", "train.per_class=4"]))
    assert job.params["train.per_class"] == 4 and job.params["train.max_train_queries"] is None  # per_class wins
