"""SetFit as a trainer backend (`train.backend=setfit`): SetFit's own Trainer with its defaults (pairs by
oversampling, CosineSimilarityLoss, a scikit-learn logistic-regression head) on train.max_train_queries
texts of the train split. The body is scored by the same MTEB kNN as every backend; the head, refitted and
scored at the evaluation's length (eval.max_seq_length), end to end as `setfit_head_accuracy`, its own metric."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np

from embft.config import Config
from embft.errors import EmbftError
from embft.training.base import Prepared, TrainContext, TrainResult
from embft.training.common import check_single_process, live_view, quiet_arguments, train_and_save

log = logging.getLogger(__name__)
HEAD = "setfit_head"


class SetFitTrainer:
    def check(self, cfg: Config) -> None:
        t = cfg.train
        if str(t.loss) != "cosine_similarity":
            raise EmbftError(f"train.loss={t.loss}: train.backend=setfit trains with cosine_similarity (its default).")
        if t.margin is not None:
            raise EmbftError(
                f"train.margin={t.margin}: SetFit's CosineSimilarityLoss has no margin; set train.margin=null."
            )
        if not float(t.num_train_epochs).is_integer():
            raise EmbftError(f"train.num_train_epochs={t.num_train_epochs}: SetFit takes whole epochs.")
        check_single_process(cfg)

    def twin_reason(self, cfg: Config) -> Optional[str]:
        return None

    def prepare(self, ctx: TrainContext) -> Prepared:
        from embft.training.labelled import budget_rows

        t = ctx.cfg.train
        rows = budget_rows(ctx.splits.train, t)
        return Prepared(n_queries=len(rows), labelled_texts=len(rows), data=rows)

    def train(self, ctx: TrainContext, prepared: Prepared, callbacks: Sequence[Any] = ()) -> TrainResult:
        import datasets
        from setfit import SetFitModel, Trainer, TrainingArguments
        from sklearn.linear_model import LogisticRegression

        from embft.encoding.model_folder import sentence_transformer
        from embft.training.callbacks import use_progress_bar

        cfg, t = ctx.cfg, ctx.cfg.train
        # The body as every backend builds it (the job's pooling); SetFit's default head.
        body = sentence_transformer(ctx.model_path, cfg.model.pooling, cfg.model.normalize, t.query_max_len, t.device)
        model = SetFitModel(model_body=body, model_head=LogisticRegression())

        def build(work: Path) -> Any:
            args = TrainingArguments(
                **quiet_arguments(work, t),
                batch_size=t.per_device_train_batch_size,
                num_epochs=int(t.num_train_epochs),
                body_learning_rate=t.learning_rate,
                warmup_proportion=t.warmup_ratio,
                use_amp=t.precision == "bf16",
                **({} if t.num_iterations is None else {"num_iterations": int(t.num_iterations)}),
            )
            dataset = datasets.Dataset.from_pandas(prepared.data, preserve_index=False)
            trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=list(callbacks))
            _quiet_progress(trainer, use_progress_bar)
            log.info(
                "Fine-tuning %s with SetFit on %d labelled texts: batch %d, body lr %g, %d epoch(s), %s",
                cfg.model.name,
                len(dataset),
                t.per_device_train_batch_size,
                t.learning_rate,
                int(t.num_train_epochs),
                t.device,
            )
            return trainer  # its train(): the body on generated pairs, then the head on the body's embeddings

        trainer, seconds, final = train_and_save(ctx, "setfit", build, model.model_body)
        start = time.perf_counter()
        _fit_head_at(model, prepared.data, ctx.encode_settings.get("max_seq_length"))
        seconds += time.perf_counter() - start
        state = trainer.st_trainer.state if hasattr(trainer, "st_trainer") else None
        n_pairs = (state.global_step if state else 0) * t.per_device_train_batch_size
        return TrainResult(
            model_dir=final,
            seconds=seconds,
            n_queries=n_pairs,  # pairs the body trained on
            queries_per_second=n_pairs / seconds if seconds else float("nan"),
            effective_batch_size=t.per_device_train_batch_size,
            precision=str(t.precision),
            device=str(t.device),
            losses=[  # SetFit logs the body's loss as `embedding_loss`
                (int(e["step"]), float(e.get("loss", e.get("embedding_loss"))))
                for e in (state.log_history if state else [])
                if "step" in e and ("loss" in e or "embedding_loss" in e)
            ],
            head=lambda texts: _predict_at(model, texts, ctx.encode_settings.get("max_seq_length")),
            head_name=HEAD,
        )

    def live_encoder(self, ctx: TrainContext, model: Any) -> Any:
        return live_view(ctx, model)


@contextmanager
def _body_length(model: Any, max_seq_length: Optional[int]):
    """The body encodes at `max_seq_length` (None: as trained) inside the block, at its training length after."""
    body = model.model_body
    trained_length = body.max_seq_length
    body.max_seq_length = max_seq_length or trained_length
    try:
        yield
    finally:
        body.max_seq_length = trained_length


def _fit_head_at(model: Any, rows: Any, max_seq_length: Optional[int]) -> None:
    """Refit the head on the body's embeddings at the evaluation's length (SetFit's Trainer fitted it at
    the training length, train.query_max_len), with SetFit's own head fitting, on the same labelled texts:
    the head is then fitted and scored on embeddings of the same length, as every other classifier."""
    with _body_length(model, max_seq_length):
        model.fit(rows["text"].tolist(), rows["label"].tolist(), num_epochs=1, show_progress_bar=False)


def _predict_at(model: Any, texts: Sequence[str], max_seq_length: Optional[int]) -> np.ndarray:
    """The head's labels with the body encoding at the evaluation's length, as every other classifier
    the job scores encodes (the head was fitted at that length too: _fit_head_at)."""
    with _body_length(model, max_seq_length):
        return np.asarray(model.predict(list(texts), as_numpy=True))


def _quiet_progress(trainer: Any, use_progress_bar: Any) -> None:
    st_trainer = getattr(trainer, "st_trainer", None)
    if st_trainer is not None:
        use_progress_bar(st_trainer)
