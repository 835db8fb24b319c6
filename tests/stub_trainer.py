"""A trainer backend registered through config alone (`train.backend=stub_trainer.CopyTrainer`): it
"trains" by saving the base model unchanged, so its tuned scores must equal the baseline's."""

from __future__ import annotations

import time
from pathlib import Path

from embft.encoding.model_folder import save_sentence_transformer
from embft.training.base import Prepared, TrainResult

CALLS: list[str] = []


class CopyTrainer:
    def check(self, cfg) -> None:
        CALLS.append("check")

    def twin_reason(self, cfg):
        CALLS.append("twin_reason")
        return None

    def prepare(self, ctx) -> Prepared:
        CALLS.append("prepare")
        return Prepared(
            n_queries=len(ctx.splits.train),
            labelled_texts=len(ctx.splits.train),
            tags={"stub.rows": str(len(ctx.splits.train))},
        )

    def train(self, ctx, prepared, callbacks=()) -> TrainResult:
        CALLS.append("train")
        start = time.perf_counter()
        model_dir = Path(ctx.out_dir) / "model"
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        cfg = ctx.cfg
        save_sentence_transformer(
            Path(ctx.model_path), model_dir, cfg.model.pooling, cfg.model.normalize, ctx.encode_settings
        )
        seconds = max(time.perf_counter() - start, 1e-6)
        return TrainResult(model_dir, seconds, prepared.n_queries, prepared.n_queries / seconds, 1, "fp32", "cpu")

    def live_encoder(self, ctx, model):
        raise NotImplementedError("the stub has no live model")


class NotATrainer:
    pass
