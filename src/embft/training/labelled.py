"""The labelled texts a single-text backend trains on: a class-stratified, seeded sample of the train
split (train.max_train_queries texts), so every backend reads the same rows for the same settings."""

from __future__ import annotations

from typing import Optional

import pandas as pd


def training_texts(train: pd.DataFrame, n: Optional[int], seed: int) -> pd.DataFrame:
    """`n` rows of `train` (all when None or larger), each class in its share, at least 2 per class where it
    has them (a positive for every text in label-aware losses); original order kept."""
    if n is None or n >= len(train):
        return train[["text", "label"]].reset_index(drop=True)
    shuffled = train.sample(frac=1.0, random_state=seed)
    share = shuffled["label"].value_counts(normalize=True)
    quota = (share * n).round().astype(int).clip(lower=2)
    picked = shuffled[shuffled.groupby("label").cumcount() < shuffled["label"].map(quota)]
    return picked.sort_index()[["text", "label"]].reset_index(drop=True)
