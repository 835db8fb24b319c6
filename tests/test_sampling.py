"""The one stratified sampler (embft.sampling): a cap is a cap, every class keeps its share, the same
arguments give the same rows, and the samplers that were right before still pick the same rows."""

import numpy as np
import pandas as pd
import pytest

from embft import sampling
from embft.evaluation.classification import eval_rows


def _frame(sizes: list[int]) -> pd.DataFrame:
    labels = np.repeat(np.arange(len(sizes)), sizes)
    order = np.random.default_rng(0).permutation(len(labels))  # classes interleaved, as in a real split
    return pd.DataFrame({"text": [f"t{i}" for i in range(len(labels))], "label": labels[order]})


def _plain_stratified(frame: pd.DataFrame, max_rows: int, seed: int) -> pd.DataFrame:
    """What cap_test did: each class's share rounded, so the sum can pass the cap."""
    sample = frame.groupby("label", group_keys=False).sample(frac=max_rows / len(frame), random_state=seed)
    return sample.sort_index().reset_index(drop=True)


@pytest.mark.parametrize(
    ("sizes", "cap"),
    [([3] * 5, 8), ([100, 100, 100, 107], 300), ([3, 3, 3, 1000], 40), ([7, 7, 7, 7, 7, 7], 15)],
)
def test_a_cap_is_never_exceeded_even_where_rounding_each_class_overshoots(sizes, cap):
    frame = _frame(sizes)
    for seed in range(5):
        capped = sampling.capped(frame, cap, seed)
        assert len(capped) <= cap
        assert capped["text"].is_unique and set(capped["text"]) <= set(frame["text"])
        # stratified: each class within one row of its share
        share = frame["label"].value_counts() * cap / len(frame)
        counts = capped["label"].value_counts().reindex(share.index, fill_value=0)
        assert ((counts - share).abs() <= 1).all(), (counts.tolist(), share.tolist())
        assert capped.equals(sampling.capped(frame, cap, seed))


def test_the_overshooting_mixes_are_real():
    """The mixes above do overshoot with the old per-class rounding (the 301-under-300 of a job log)."""
    assert len(_plain_stratified(_frame([3] * 5), 8, 0)) == 10
    assert len(_plain_stratified(_frame([100, 100, 100, 107]), 300, 0)) == 301


def test_within_the_cap_the_rows_are_those_of_before():
    frame = _frame([400, 250, 250, 100])
    for cap, seed in ((100, 1), (500, 2), (333, 3)):
        old = _plain_stratified(frame, cap, seed)
        if len(old) <= cap:
            assert sampling.capped(frame, cap, seed).equals(old)
    assert sampling.capped(frame, None, 0) is frame and sampling.capped(frame, 5000, 0) is frame


def test_the_scored_rows_obey_max_validation_rows():
    class Splits:
        validation = _frame([100, 100, 100, 107])
        test = _frame([500, 500, 501, 501])

    class Eval:
        max_validation_rows, max_test_rows, seed = 300, 2000, 42

    assert len(eval_rows(Splits, "validation", Eval)) <= 300
    assert len(eval_rows(Splits, "test", Eval)) <= 2000


def test_per_class_and_in_shares_pick_the_rows_they_picked_before():
    frame = _frame([60, 30, 9, 1])
    shuffled = frame.sample(frac=1.0, random_state=7)  # the support set's and training texts' old code
    old_support = shuffled.groupby("label").head(20).sort_index()[["text", "label"]].reset_index(drop=True)
    assert sampling.per_class(frame, 20, 7).equals(old_support)
    share = shuffled["label"].value_counts(normalize=True)
    quota = (share * 40).round().astype(int).clip(lower=2)
    old_texts = shuffled[shuffled.groupby("label").cumcount() < shuffled["label"].map(quota)]
    assert sampling.in_shares(frame, 40, 7).equals(old_texts.sort_index()[["text", "label"]].reset_index(drop=True))
    assert len(sampling.in_shares(frame, None, 7)) == len(frame)
