"""The labelled texts a job trains on: a class-stratified, seeded sample of the train split, so every
backend reads the same rows for the same settings.

Two budgets: `train.per_class=N` (N texts of every class, as SetFit's users count them; strict: every
backend, FlagEmbedding's records included, and the served classifier's support set read only these
texts' labels) and `train.max_train_queries` (a total, each class in its share; FlagEmbedding draws
its positives and negatives from the whole split). per_class wins when both are set."""

from __future__ import annotations

from typing import Any, Optional

import pandas as pd

from embft import sampling
from embft.errors import EmbftError


def training_texts(train: pd.DataFrame, n: Optional[int], seed: int) -> pd.DataFrame:
    """`n` rows of `train` (all when None or larger), each class in its share, at least 2 per class where it
    has them (a positive for every text in label-aware losses); original order kept."""
    return sampling.in_shares(train, n, seed, at_least=2)


def per_class_texts(train: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    """`per_class` rows of every class of `train`, seeded by `seed`; original order kept. A class with
    fewer rows is refused (check_budget says so before any work)."""
    return sampling.per_class(train, per_class, seed)


def budget_rows(train: pd.DataFrame, train_cfg: Any) -> pd.DataFrame:
    """The labelled texts a job's budget gives it: train.per_class of every class when set, else
    train.max_train_queries in class shares; seeded by train.seed."""
    if train_cfg.per_class is not None:
        return per_class_texts(train, int(train_cfg.per_class), int(train_cfg.seed))
    return training_texts(train, train_cfg.max_train_queries, int(train_cfg.seed))


def needs_two_per_class(cfg: Any) -> bool:
    """Does the job's training draw a same-class positive for a text (every backend but FlagEmbedding
    with data.pairing=label_text, whose positive is the class's description)?"""
    return not (str(cfg.train.backend) == "flagembedding" and str(cfg.data.pairing) == "label_text")


def check_budget(cfg: Any, splits: Any) -> None:
    """Refuse a train.per_class budget the data or the loss cannot give, in one line naming the class and its
    count: a class with fewer train rows than N, N < 2 where a positive is drawn from the budget, a
    class without validation rows (its score would not be measured)."""
    per_class = cfg.train.per_class
    if per_class is None:
        return
    names = list(splits.label_names)

    def class_name(i: int) -> str:
        return names[i].split(":")[0].strip() if i < len(names) else str(i)

    if per_class < 2 and needs_two_per_class(cfg):
        raise EmbftError(
            f"train.per_class={per_class}: train.backend={cfg.train.backend} draws a same-class positive for every "
            "text, so each class needs at least 2 labelled texts; use train.per_class>=2."
        )
    counts = splits.train["label"].value_counts()
    short = sorted(((int(c), int(n)) for c, n in counts.items() if n < per_class), key=lambda item: item[1])
    if short:
        cls, n = short[0]
        more = f" (and {len(short) - 1} more class(es) under {per_class})" if len(short) > 1 else ""
        raise EmbftError(
            f"train.per_class={per_class}: class {class_name(cls)!r} has {n} train rows (after holding out "
            f"validation){more}; lower train.per_class to at most {n} or add rows."
        )
    in_val = set(splits.validation["label"])
    missing = [c for c in sorted(set(splits.train["label"])) if c not in in_val]
    if missing:
        raise EmbftError(
            f"data={cfg.data.name}: class {class_name(missing[0])!r} has no validation rows "
            f"({len(missing)} class(es) without any): raise data.validation or give a validation split with every class."
        )
