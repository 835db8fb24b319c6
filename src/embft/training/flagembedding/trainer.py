"""FlagEmbedding as a trainer backend (`train.backend=flagembedding`, the default): its records, its
runner (in-process or under torchrun), its twin rule, and a view of its live model for callbacks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Optional

from embft import names
from embft.config import Config
from embft.data import Splits
from embft.training.base import Prepared, TrainContext, TrainResult
from embft.training.common import live_sentence_transformer

LOSSES = ("stock", "groupwise")


class FlagEmbeddingTrainer:
    """FlagEmbedding's EncoderOnlyEmbedderRunner on `symmetric_class` records (the seed's study)."""

    def check(self, cfg: Config) -> None:
        from embft.errors import EmbftError
        from embft.training.flagembedding.runner import check_parallel

        if str(cfg.train.loss) not in LOSSES:
            raise EmbftError(
                f"train.loss={cfg.train.loss}: train.backend=flagembedding takes {' or '.join(LOSSES)} "
                "(the label-aware losses are train.backend=sentence_transformers's)."
            )
        check_parallel(cfg.train, cfg.variant)

    def check_data(self, cfg: Config, splits: Splits) -> None:
        """Refuse, before the store is opened, a batch the training queries cannot fill."""
        from embft.training.flagembedding.train import check_batches

        if cfg.train.get("per_class") is None:  # a per_class budget is checked where it is drawn
            cap = cfg.train.max_train_queries
            check_batches(cfg, len(splits.train) if cap is None else min(cap, len(splits.train)))

    def twin_reason(self, cfg: Config) -> Optional[str]:
        from embft.training.flagembedding.runner import inert_suffix_reason

        return inert_suffix_reason(cfg.train, cfg.variant)

    def prepare(self, ctx: TrainContext) -> Prepared:
        """The records from the train split only (cached by content and settings)."""
        from embft.training.flagembedding.records import prepare_records
        from embft.training.labelled import budget_rows

        cfg = ctx.cfg
        # train.per_class: a strict budget, every record drawn from those texts (each one query once)
        pool = None if cfg.train.per_class is None else budget_rows(ctx.splits.train, cfg.train)
        records_dir = prepare_records(
            ctx.splits,
            cache_dir=ctx.cache_dir,
            dataset_name=cfg.data.name,
            no_in_batch_neg=cfg.variant.no_in_batch_neg,
            encode=ctx.encode,
            model_key=ctx.model_key,
            group_size=cfg.train.train_group_size,
            seed=cfg.train.seed,
            pool=pool,
            max_queries=None if pool is not None else cfg.train.max_train_queries,
            prompt="",
            batch_size=cfg.train.same_dataset_batch_size,
            pairing=str(cfg.data.pairing),
        )
        n_records, texts = 0, set()
        with (records_dir / "train.jsonl").open() as fh:
            for line in fh:
                record = json.loads(line)
                n_records += 1
                texts.update([record["query"], *record["pos"], *record["neg"]])
        # the train texts whose labels the records read (label_text pairing's class descriptions are not)
        labelled = texts & set((ctx.splits.train if pool is None else pool)["text"])
        return Prepared(
            n_queries=n_records,
            labelled_texts=len(labelled),
            data=records_dir,
            tags={names.RECORDS_DIR: str(records_dir)},
        )

    def train(self, ctx: TrainContext, prepared: Prepared, callbacks: Sequence[Any] = ()) -> TrainResult:
        from embft.training.flagembedding.train import train

        return train(
            ctx.cfg,
            prepared.data,
            ctx.model_path,
            prepared.n_queries,
            ctx.out_dir,
            ctx.encode_settings,
            callbacks=tuple(callbacks),
        )

    def live_encoder(self, ctx: TrainContext, model: Any) -> Any:
        m, settings = ctx.cfg.model, ctx.encode_settings
        return live_sentence_transformer(
            model, ctx.model_path, m.pooling, m.normalize, settings["max_seq_length"], settings.get("precision", "fp32")
        )
