"""The labelled texts a single-text backend trains on: a class-stratified, seeded sample of the train
split (train.max_train_queries texts), so every backend reads the same rows for the same settings."""

from __future__ import annotations

from typing import Optional

import pandas as pd

from embft import sampling


def training_texts(train: pd.DataFrame, n: Optional[int], seed: int) -> pd.DataFrame:
    """`n` rows of `train` (all when None or larger), each class in its share, at least 2 per class where it
    has them (a positive for every text in label-aware losses); original order kept."""
    return sampling.in_shares(train, n, seed, at_least=2)
