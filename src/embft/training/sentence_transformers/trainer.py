"""sentence-transformers as a trainer backend (`train.backend=sentence_transformers`): its
SentenceTransformerTrainer with a loss for labelled texts (`train.loss`, embft.training.sentence_transformers.losses)
on train.max_train_queries texts of the train split, batched by its label-grouped sampler."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from embft import names
from embft.config import Config
from embft.errors import EmbftError
from embft.training.base import Prepared, TrainContext, TrainResult
from embft.training.common import check_single_process, live_view, quiet_arguments, train_and_save, trained_result
from embft.training.sentence_transformers.losses import LOSSES

log = logging.getLogger(__name__)


class SentenceTransformersTrainer:
    def check(self, cfg: Config) -> None:
        t = cfg.train
        spec = LOSSES.get(str(t.loss))
        if spec is None:
            raise EmbftError(f"train.loss={t.loss}: train.backend=sentence_transformers takes {', '.join(LOSSES)}.")
        if t.margin is not None and not spec.takes_margin():
            raise EmbftError(f"train.margin={t.margin}: train.loss={t.loss} has no margin; set train.margin=null.")
        if not spec.pairs and (t.per_device_train_batch_size < 4 or t.per_device_train_batch_size % 2):
            # the label-grouped sampler's rule: every batch holds >= 2 classes with >= 2 texts each
            raise EmbftError(
                f"train.per_device_train_batch_size={t.per_device_train_batch_size}: train.loss={t.loss} batches "
                "by label and needs an even batch of at least 4 texts."
            )
        check_single_process(cfg)

    def check_data(self, cfg: Config, splits: Any) -> None:
        """Refuse, before the store is opened, a batch larger than the labelled texts (label-grouped batches
        drop the last partial one, so none would be left)."""
        t = cfg.train
        if str(t.loss) in LOSSES and not LOSSES[str(t.loss)].pairs and t.get("per_class") is None:
            n = len(splits.train) if t.max_train_queries is None else min(t.max_train_queries, len(splits.train))
            if n < t.per_device_train_batch_size:
                raise EmbftError(
                    f"{n} labelled texts fill no batch of {t.per_device_train_batch_size}: raise "
                    "train.max_train_queries or lower train.per_device_train_batch_size."
                )

    def twin_reason(self, cfg: Config) -> Optional[str]:
        return None  # the twin rule is about FlagEmbedding's no_in_batch_neg suffix

    def prepare(self, ctx: TrainContext) -> Prepared:
        from embft.training.labelled import budget_rows

        t = ctx.cfg.train
        rows = budget_rows(ctx.splits.train, t)
        spec = LOSSES[str(t.loss)]
        data = pair_rows(rows, t.seed) if spec.pairs else rows
        return Prepared(n_queries=len(data), labelled_texts=len(rows), data=data)

    def train(self, ctx: TrainContext, prepared: Prepared, callbacks: Sequence[Any] = ()) -> TrainResult:
        import datasets
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from sentence_transformers.sentence_transformer.training_args import BatchSamplers

        from embft.encoding.model_folder import sentence_transformer
        from embft.training.callbacks import use_progress_bar

        cfg, t = ctx.cfg, ctx.cfg.train
        spec = LOSSES[str(t.loss)]
        model = sentence_transformer(ctx.model_path, cfg.model.pooling, cfg.model.normalize, t.query_max_len, t.device)
        dataset = datasets.Dataset.from_pandas(prepared.data, preserve_index=False)
        metrics: dict[str, float] = {}

        def build(work: Path) -> Any:
            args = SentenceTransformerTrainingArguments(
                **quiet_arguments(work, t),
                num_train_epochs=t.num_train_epochs,
                per_device_train_batch_size=t.per_device_train_batch_size,
                learning_rate=t.learning_rate,
                warmup_ratio=t.warmup_ratio,
                data_seed=t.seed,
                bf16=t.precision == "bf16",
                use_cpu=t.device == "cpu",
                # pairs: any batch; single texts: each batch >= 2 classes (the last partial one dropped)
                batch_sampler=BatchSamplers.BATCH_SAMPLER if spec.pairs else BatchSamplers.GROUP_BY_LABEL,
                dataloader_drop_last=not spec.pairs,
            )
            trainer = SentenceTransformerTrainer(
                model=model, args=args, train_dataset=dataset, loss=spec.build(model, t), callbacks=list(callbacks)
            )
            use_progress_bar(trainer)
            metrics.update({} if spec.pairs else classes_per_batch(trainer, dataset))
            log.info(
                "Fine-tuning %s with sentence-transformers: %s on %d %s (%d labelled texts), batch %d, lr %g, %s on %s",
                cfg.model.name,
                t.loss,
                len(dataset),
                "pairs" if spec.pairs else "texts",
                prepared.labelled_texts,
                t.per_device_train_batch_size,
                t.learning_rate,
                t.precision,
                t.device,
            )
            return trainer

        trainer, seconds, final = train_and_save(ctx, "sentence-transformers", build, model)
        return trained_result(
            trainer, seconds, final, t.per_device_train_batch_size, str(t.precision), str(t.device), metrics
        )

    def live_encoder(self, ctx: TrainContext, model: Any) -> Any:
        return live_view(ctx, model)


def pair_rows(rows: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Each text once with a text of its class (label 1) and once with a text of another class (label 0)."""
    rng = np.random.default_rng(seed)
    texts, labels = rows["text"].tolist(), rows["label"].to_numpy()
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    first, second, same = [], [], []
    for i, c in enumerate(labels):
        mates = by_class[c][by_class[c] != i]
        others = np.flatnonzero(labels != c)
        for pool, label in ((mates, 1), (others, 0)):
            if len(pool):
                first.append(texts[i])
                second.append(texts[int(rng.choice(pool))])
                same.append(label)
    return pd.DataFrame({"sentence1": first, "sentence2": second, "label": same})


def classes_per_batch(trainer: Any, dataset: Any) -> dict[str, float]:
    """Distinct classes per batch of one epoch of the trainer's own batch sampler (sentence-transformers'
    issues 2920, 3668, 4013: a label-grouped sampler once gave one-class batches, so zero gradients)."""
    import torch

    args = trainer.args
    sampler = trainer.get_batch_sampler(
        dataset,
        batch_size=args.per_device_train_batch_size,
        drop_last=args.dataloader_drop_last,
        valid_label_columns=["label"],
        generator=torch.Generator(),
        seed=args.seed,
    )
    labels = np.asarray(dataset["label"])
    counts = [len(set(labels[list(batch)])) for batch in sampler]
    if not counts:
        raise EmbftError(
            f"{len(dataset)} labelled texts fill no batch of {args.per_device_train_batch_size}: raise "
            "train.max_train_queries or lower train.per_device_train_batch_size."
        )
    if min(counts) < 2:
        log.warning(
            "%d of %d batches hold a single class: the loss has nothing to contrast there", counts.count(1), len(counts)
        )
    return {names.CLASSES_PER_BATCH: float(np.mean(counts)), names.MIN_CLASSES_PER_BATCH: float(min(counts))}
