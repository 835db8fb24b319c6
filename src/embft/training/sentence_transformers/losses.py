"""The losses `train.backend=sentence_transformers` takes (`train.loss`), each built on the model being
trained with the job's settings: sentence-transformers' own label-aware losses, and supcon."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from embft.config import TrainConfig


@dataclass(frozen=True)
class LossSpec:
    make: Callable[[], type]  # the loss class (imported when used)
    pairs: bool = False  # trains on (text, text, same-class?) pairs instead of labelled single texts
    temperature: bool = False  # takes train.temperature

    def takes_margin(self) -> bool:
        return "margin" in inspect.signature(self.make()).parameters

    def build(self, model: Any, train: TrainConfig) -> Any:
        kwargs: dict[str, Any] = {}
        if train.margin is not None:  # null: the loss's own default margin (logged as the loss's config)
            kwargs["margin"] = float(train.margin)
        if self.temperature:
            kwargs["temperature"] = float(train.temperature)
        return self.make()(model, **kwargs)


def _st(name: str) -> Callable[[], type]:
    def load() -> type:
        from sentence_transformers import losses

        return getattr(losses, name)

    return load


def _supcon() -> type:
    from embft.training.sentence_transformers.supcon import SupConLoss

    return SupConLoss


LOSSES: dict[str, LossSpec] = {
    "batch_all_triplet": LossSpec(_st("BatchAllTripletLoss")),
    "batch_hard_triplet": LossSpec(_st("BatchHardTripletLoss")),
    "batch_semi_hard_triplet": LossSpec(_st("BatchSemiHardTripletLoss")),
    "batch_hard_soft_margin_triplet": LossSpec(_st("BatchHardSoftMarginTripletLoss")),
    "contrastive": LossSpec(_st("ContrastiveLoss"), pairs=True),
    "supcon": LossSpec(_supcon, temperature=True),
}
