"""The reference arm (`train.backend=untrained`): no fine-tuning. The job saves the base model as it is, so
its tuned scores are the untrained model's and its deployed classifiers (a logistic regression or kNN over
the untrained embeddings, fitted on the same labelled texts as every arm's) are the baseline a fine-tuning
method has to beat at that budget."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from embft.config import Config
from embft.errors import EmbftError
from embft.training.base import Prepared, TrainContext, TrainResult


class UntrainedTrainer:
    def check(self, cfg: Config) -> None:
        from embft.training.common import check_single_process

        for key in ("every_steps", "live_evals"):
            if cfg.eval[key]:
                raise EmbftError(
                    f"eval.{key}={cfg.eval[key]}: train.backend=untrained has no training steps to score live; "
                    f"set eval.{key}=null."
                )
        check_single_process(cfg)

    def twin_reason(self, cfg: Config) -> Optional[str]:
        return None

    def prepare(self, ctx: TrainContext) -> Prepared:
        from embft.training.labelled import budget_rows

        rows = budget_rows(ctx.splits.train, ctx.cfg.train)  # the labels its deployed classifiers read
        return Prepared(n_queries=0, labelled_texts=len(rows))

    def train(self, ctx: TrainContext, prepared: Prepared, callbacks: Sequence[Any] = ()) -> TrainResult:
        from embft.encoding.model_folder import save_sentence_transformer

        cfg = ctx.cfg
        model_dir = Path(ctx.out_dir) / "model"
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        save_sentence_transformer(
            Path(ctx.model_path), model_dir, cfg.model.pooling, cfg.model.normalize, ctx.encode_settings
        )
        # No training: 0 seconds and 0 queries (saving the folder is not training time).
        return TrainResult(model_dir, 0.0, 0, 0.0, 0, "fp32", "cpu")

    def live_encoder(self, ctx: TrainContext, model: Any) -> Any:
        raise EmbftError("train.backend=untrained has no live model (it does not train).")
