"""A run's scoring identity: what its scores were measured on and how, as one short value.

Two runs' `val_accuracy_cosine` compare only when they were scored on the same rows of the same data,
by the same classifier and encoder settings, at the same label budget: a trec run's score beside an
sst5 run's says which dataset is easier, not which run is better. Every fine-tuned run is tagged
`embft.scoring_id` (a hash of the parts below) with each part as `embft.scoring.<part>`; "best"
(tracking.log_model=best, the registry's champion) compares only runs that share it.

Parts: the dataset (data.name and the content fingerprint of its splits after the hold-out), the rows
scored (count and fingerprint of the validation and test rows after the caps), the evaluation (method,
k, metric, samples per label, experiments, seed) and the encoding (precision, backend, length; not the
model's pooling, which comes with the model being chosen), and the label budget (BUDGET_KEYS: a new budget
setting is one entry there). Not the model, the trainer or its hyperparameters: those are what "best" chooses.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import OmegaConf

from embft import names
from embft.data import Splits, frame_fingerprint
from embft.evaluation.classification import eval_rows

# The settings that fix how many labelled texts training may read (None: unset, left out of the value).
BUDGET_KEYS = ("train.max_train_queries", "train.per_class")


def scoring_parts(cfg: Any, splits: Splits, encode: Any) -> dict[str, str]:
    """The parts of a job's scoring identity, as strings (they are logged as tags)."""
    e = cfg.eval
    parts = {"dataset": str(cfg.data.name), "data_fingerprint": splits.fingerprint()}
    for split in ("validation", "test"):
        rows = eval_rows(splits, split, e)
        parts[f"{split}_rows"] = str(len(rows))
        parts[f"{split}_fingerprint"] = frame_fingerprint(rows)
    parts["evaluation"] = (
        f"{e.method} k={e.k} {e.metric}, {e.samples_per_label} per label x {e.n_experiments} experiments, seed {e.seed}"
    )
    # Not the model's pooling/normalization: they come with the model (conf/model/), which runs may differ in.
    parts["encoding"] = f"{encode.precision} {encode.backend}, {encode.max_seq_length} tokens"
    budget = {key: OmegaConf.select(cfg, key, default=None) for key in BUDGET_KEYS}
    parts["budget"] = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in budget.items() if v is not None) or "all"
    return parts


def scoring_id(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def scoring_tags(cfg: Any, splits: Splits, encode: Any) -> dict[str, str]:
    """`embft.scoring_id` and its parts (`embft.scoring.<part>`), for a fine-tuned run's tags."""
    parts = scoring_parts(cfg, splits, encode)
    return {names.SCORING_ID: scoring_id(parts), **{names.scoring_part(k): v for k, v in parts.items()}}
