"""The trainer interface: what a training backend does for a job, and what it hands back.

`train.backend` selects one: a name in BACKENDS, or the dotted path of any class with these methods
(`package.module.Class`, imported as Hydra imports a `_target_`), so adding a trainer is one module
and one config file. The app calls only this interface: check, twin_reason, prepare, train and
live_encoder, and where a backend has it check_data(cfg, splits) (the loaded data against the settings,
before the store is opened); it names no backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np

from embft.config import Config
from embft.data import Splits
from embft.errors import EmbftError

BACKENDS = {
    "flagembedding": "embft.training.flagembedding.trainer.FlagEmbeddingTrainer",
    "sentence_transformers": "embft.training.sentence_transformers.trainer.SentenceTransformersTrainer",
    "setfit": "embft.training.setfit.trainer.SetFitTrainer",
    "model2vec": "embft.training.model2vec.trainer.Model2VecTrainer",
    "untrained": "embft.training.untrained.trainer.UntrainedTrainer",
}
DEFAULT_BACKEND = "flagembedding"


@dataclass
class TrainResult:
    model_dir: Path  # a SentenceTransformer folder, saved whole (evaluated as the baseline is)
    seconds: float
    n_queries: int
    queries_per_second: float
    effective_batch_size: int
    precision: str
    device: str
    losses: list[tuple[int, float]] = field(default_factory=list)
    labelled_texts: Optional[int] = None  # distinct labelled texts training read (the app fills it from Prepared)
    # A classifier the backend trains itself (SetFit's head): texts -> label ids, scored by the app on the
    # validation and test rows as `<head_name>_accuracy`, never mixed with the embedder's kNN score.
    head: Optional[Callable[[list[str]], np.ndarray]] = None
    head_name: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)  # logged to the job's run
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. train_classes_per_batch


@dataclass
class TrainContext:
    """What a trainer gets from the job: its config, the labelled rows and where things go."""

    cfg: Config
    splits: Splits  # train is the only split a trainer may read (validation and test are for scoring)
    model_path: str  # the base model's folder
    out_dir: Path  # the job's folder: the trained model goes under it
    cache_dir: Path
    model_key: str  # the base model as cache keys see it (weights fingerprint included)
    encode_settings: dict[str, Any]  # how the trained model is evaluated; saved into its folder
    encode: Callable[[Sequence[str]], np.ndarray]  # the base model's embeddings (e.g. mined negatives)


@dataclass
class Prepared:
    """What a trainer's prepare stage made for its train stage."""

    n_queries: int  # training examples the train stage reads
    labelled_texts: int  # distinct labelled texts they hold: the labelling cost (queries, positives, negatives)
    data: Any = None  # the backend's own (FlagEmbedding: its records folder)
    tags: dict[str, str] = field(default_factory=dict)  # logged to the job's run


@runtime_checkable
class Trainer(Protocol):
    def check(self, cfg: Config) -> None:
        """Refuse settings this backend cannot run (EmbftError, one line) before any data or model work."""

    def twin_reason(self, cfg: Config) -> Optional[str]:
        """Why this config trains exactly what a twin config trains (embft.tracking.twins), else None."""

    def prepare(self, ctx: TrainContext) -> Prepared:
        """Training data from ctx.splits.train (cached as the backend sees fit)."""

    def train(self, ctx: TrainContext, prepared: Prepared, callbacks: Sequence[Any] = ()) -> TrainResult:
        """Fine-tune; `callbacks` are transformers TrainerCallbacks (live metrics, pruning)."""

    def live_encoder(self, ctx: TrainContext, model: Any) -> Any:
        """A SentenceTransformer over the model a callback sees mid-training, sharing its weights."""


def load_trainer(backend: str) -> Trainer:
    """The trainer `train.backend` names; one line naming the value and the choices otherwise."""
    from hydra.utils import get_class

    target = BACKENDS.get(backend, backend)
    if "." not in target:
        raise EmbftError(
            f"train.backend={backend}: choose one of {', '.join(BACKENDS)}, or give a trainer class's "
            "dotted path (package.module.Class, see embft.training.base.Trainer)."
        )
    try:
        trainer = get_class(target)()
    except Exception as err:  # Hydra wraps an ImportError of the module in its own error
        raise EmbftError(f"train.backend={backend}: cannot load {target} ({err}).") from err
    if not isinstance(trainer, Trainer):
        missing = [m for m in ("check", "twin_reason", "prepare", "train", "live_encoder") if not hasattr(trainer, m)]
        raise EmbftError(
            f"train.backend={backend}: {target} is not a trainer (missing {', '.join(missing)}; "
            "see embft.training.base.Trainer)."
        )
    return trainer
