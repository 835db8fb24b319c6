"""Class-stratified, seeded samples of a labelled frame (columns `text`, `label`): the one place a job
picks rows by class. The same arguments give the same rows; rows keep their original order.

- `per_class`: up to n rows of every class (the served classifier's support set);
- `in_shares`: about n rows, each class in its share, a floor per class (the texts a backend trains on);
- `capped`: at most n rows, each class in its share (the validation and test rows scored).
"""

from __future__ import annotations

from typing import Optional

import pandas as pd


def _shuffled(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    return frame.sample(frac=1.0, random_state=seed)


def _in_order(picked: pd.DataFrame) -> pd.DataFrame:
    return picked.sort_index()[["text", "label"]].reset_index(drop=True)


def per_class(frame: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Up to `n` rows of each label (a class with fewer gives all of its rows)."""
    shuffled = _shuffled(frame, seed)
    return _in_order(shuffled.groupby("label").head(n))


def in_shares(frame: pd.DataFrame, n: Optional[int], seed: int, at_least: int = 2) -> pd.DataFrame:
    """`n` rows (all when None or larger), each class in its share rounded, at least `at_least` of a class
    where it has them; the rounding and the floor may give a few rows more or less than `n`."""
    if n is None or n >= len(frame):
        return frame[["text", "label"]].reset_index(drop=True)
    shuffled = _shuffled(frame, seed)
    share = shuffled["label"].value_counts(normalize=True)
    quota = (share * n).round().astype(int).clip(lower=at_least)
    return _in_order(shuffled[shuffled.groupby("label").cumcount() < shuffled["label"].map(quota)])


def capped(frame: pd.DataFrame, max_rows: Optional[int], seed: int) -> pd.DataFrame:
    """At most `max_rows` rows, each class in its share (`frame` itself when None or it is smaller).

    Each class's count is its share rounded (pandas' `sample(frac=)`), so the sum can pass the cap by a
    few rows: those are taken back, one each, from the classes rounded up the most. Where the sum stays
    within the cap these are the same rows as a plain stratified `sample(frac=)`."""
    if max_rows is None or len(frame) <= max_rows:
        return frame
    frac = max_rows / len(frame)
    sample = frame.groupby("label", group_keys=False).sample(frac=frac, random_state=seed)
    excess = len(sample) - max_rows
    if excess > 0:
        rounded_up = sample["label"].value_counts() - frame["label"].value_counts() * frac
        for label in rounded_up.sort_values(ascending=False, kind="stable").index[:excess]:
            sample = sample.drop(sample.index[sample["label"] == label][-1])
    return sample.sort_index().reset_index(drop=True)
