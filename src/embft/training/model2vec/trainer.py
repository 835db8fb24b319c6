"""A static-embedding arm (`train.backend=model2vec`): model2vec distils the job's base model into one vector
per token (offline, from the base model's folder: `StaticEmbedding.from_distillation`, cached per base
model), then sentence-transformers' trainer fine-tunes those vectors on the same labelled texts as every
single-text backend with a label-aware triplet loss (`train.loss`), in label-grouped batches. The saved
folder is a SentenceTransformer (StaticEmbedding, then Normalize), so the MTEB kNN evaluation and the
served classifiers encode it as they encode every arm; a text's vector is the mean of its tokens'
vectors, with no attention, hence tens of times the texts per second of a transformer."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from embft.config import Config
from embft.errors import EmbftError
from embft.training.base import Prepared, TrainContext, TrainResult

log = logging.getLogger(__name__)
# train.loss -> sentence-transformers' loss class for labelled single texts (margin: train.margin, null = its default)
LOSSES = {
    "batch_all_triplet": "BatchAllTripletLoss",
    "batch_hard_triplet": "BatchHardTripletLoss",
    "batch_semi_hard_triplet": "BatchSemiHardTripletLoss",
    "batch_hard_soft_margin_triplet": "BatchHardSoftMarginTripletLoss",
}
PCA_DIMS = 256  # model2vec's default width of the distilled vectors
DISTILLED = "model2vec_distilled"  # cache folder (per base model) and the seconds its distillation took


class Model2VecTrainer:
    def check(self, cfg: Config) -> None:
        from embft.training.common import check_single_process

        t = cfg.train
        if str(t.loss) not in LOSSES:
            raise EmbftError(f"train.loss={t.loss}: train.backend=model2vec takes {', '.join(LOSSES)}.")
        if t.margin is not None and str(t.loss) == "batch_hard_soft_margin_triplet":
            raise EmbftError(f"train.margin={t.margin}: train.loss={t.loss} has no margin; set train.margin=null.")
        if t.per_device_train_batch_size < 4 or t.per_device_train_batch_size % 2:
            raise EmbftError(
                f"train.per_device_train_batch_size={t.per_device_train_batch_size}: train.backend=model2vec batches "
                "by label and needs an even batch of at least 4 texts."
            )
        if str(t.precision) == "bf16":
            raise EmbftError("train.precision=bf16: a static-embedding model trains in fp32; set train.precision=fp32.")
        serve = str(cfg.tracking.get("serve_backend", "torch"))
        if serve != "torch":
            raise EmbftError(
                f"tracking.serve_backend={serve}: a static-embedding model has no transformer to export "
                "(it is a table lookup and a mean); set tracking.serve_backend=torch."
            )
        check_single_process(cfg)

    def twin_reason(self, cfg: Config) -> Optional[str]:
        return None

    def prepare(self, ctx: TrainContext) -> Prepared:
        from embft.training.labelled import budget_rows

        rows = budget_rows(ctx.splits.train, ctx.cfg.train)
        return Prepared(n_queries=len(rows), labelled_texts=len(rows), data=rows)

    def train(self, ctx: TrainContext, prepared: Prepared, callbacks: Sequence[Any] = ()) -> TrainResult:
        import datasets
        import sentence_transformers.losses as st_losses
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from sentence_transformers.sentence_transformer.training_args import BatchSamplers

        from embft.training.callbacks import use_progress_bar
        from embft.training.common import quiet_arguments, train_and_save, trained_result

        cfg, t = ctx.cfg, ctx.cfg.train
        model, distill_seconds = distilled_model(ctx)
        dataset = datasets.Dataset.from_pandas(prepared.data, preserve_index=False)
        loss_cls = getattr(st_losses, LOSSES[str(t.loss)])
        loss = loss_cls(model) if t.margin is None else loss_cls(model, margin=float(t.margin))

        def build(work: Path) -> Any:
            args = SentenceTransformerTrainingArguments(
                **quiet_arguments(work, t),
                num_train_epochs=t.num_train_epochs,
                per_device_train_batch_size=t.per_device_train_batch_size,
                learning_rate=t.learning_rate,
                warmup_ratio=t.warmup_ratio,
                data_seed=t.seed,
                use_cpu=True,  # a lookup and a mean: moving batches to a GPU costs more than the work
                batch_sampler=BatchSamplers.GROUP_BY_LABEL,  # each batch >= 2 classes (the last partial one dropped)
                dataloader_drop_last=True,
            )
            trainer = SentenceTransformerTrainer(
                model=model, args=args, train_dataset=dataset, loss=loss, callbacks=list(callbacks)
            )
            use_progress_bar(trainer)
            log.info(
                "Fine-tuning the static embeddings distilled from %s: %s on %d labelled texts, batch %d, lr %g",
                cfg.model.name,
                t.loss,
                len(dataset),
                t.per_device_train_batch_size,
                t.learning_rate,
            )
            return trainer

        trainer, seconds, final = train_and_save(ctx, "model2vec", build, model)
        return trained_result(
            trainer, seconds, final, t.per_device_train_batch_size, "fp32", "cpu", {"distill_seconds": distill_seconds}
        )

    def live_encoder(self, ctx: TrainContext, model: Any) -> Any:
        return model  # the SentenceTransformer being trained: a static model encodes the same at any length


def distilled_model(ctx: TrainContext) -> tuple[Any, float]:
    """(a SentenceTransformer: the base model distilled to static embeddings, then Normalize where the job's
    model normalizes; the seconds the distillation took). Cached under ctx.cache_dir per base model (its
    weights fingerprint is in ctx.model_key), since distilling encodes the whole vocabulary once."""
    import hashlib

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, StaticEmbedding

    key = hashlib.sha256(json.dumps([ctx.model_key, PCA_DIMS]).encode()).hexdigest()[:16]
    folder = Path(ctx.cache_dir) / DISTILLED / key
    seconds_file = folder / f"{DISTILLED}.json"
    if not seconds_file.is_file():
        start = time.perf_counter()
        log.info(
            "Distilling %s into static embeddings (model2vec, %d dims; once per base model)", ctx.model_path, PCA_DIMS
        )
        try:
            static = StaticEmbedding.from_distillation(ctx.model_path, device="cpu", pca_dims=PCA_DIMS)
        except Exception as err:  # model2vec raises many types (tokenizer kind, architecture)
            raise EmbftError(
                f"train.backend=model2vec: cannot distil {ctx.model_path} ({type(err).__name__}: {str(err)[:200]})."
            ) from err
        SentenceTransformer(modules=[static], device="cpu").save(str(folder))
        seconds_file.write_text(json.dumps({"seconds": time.perf_counter() - start}))
    seconds = float(json.loads(seconds_file.read_text())["seconds"])
    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    if ctx.cfg.model.normalize:
        model.append(Normalize())
    return model, seconds
