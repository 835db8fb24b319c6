"""Code the trainer backends share (a backend never imports another one): the one-process check, the
view of a model being trained as the evaluation encodes, and the run block of a Hugging Face style
trainer (a scratch output folder, the quiet arguments, the timed train, the model saved whole)."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from embft.config import Config
from embft.errors import EmbftError
from embft.training.base import TrainContext, TrainResult


def check_single_process(cfg: Config) -> None:
    if cfg.train.nproc_per_node != 1:
        raise EmbftError(
            f"train.nproc_per_node={cfg.train.nproc_per_node}: train.backend={cfg.train.backend} trains in one "
            "process here; use train.backend=flagembedding for torchrun."
        )


def quiet_arguments(work: Path, t: Any) -> dict[str, Any]:
    """The training arguments every backend sets alike: output to the scratch folder, the job's seed
    and logging steps, no checkpoints, no reporting integrations (embft logs to MLflow itself)."""
    return {
        "output_dir": str(work),
        "seed": t.seed,
        "logging_steps": t.logging_steps,
        "save_strategy": "no",
        "report_to": "none",
    }


def train_and_save(ctx: TrainContext, prefix: str, build: Callable[[Path], Any], model: Any) -> tuple[Any, float, Path]:
    """(trainer, training seconds, saved folder): `build(work)` makes the trainer with the scratch folder
    `work` (under the job's folder, removed afterwards whatever happens); its train() is timed alone,
    then `model` is saved whole to <out_dir>/model with the evaluation's encode settings."""
    from embft.encoding.model_folder import save_whole

    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{prefix}.", dir=ctx.out_dir))
    try:
        trainer = build(work)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        final = ctx.out_dir / "model"
        save_whole(model, final, ctx.encode_settings)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return trainer, seconds, final


def live_sentence_transformer(
    embedder: Any,
    model_path: str,
    pooling: str,
    normalize: bool,
    max_seq_length: Optional[int] = None,
    precision: str = "fp32",
):
    """A SentenceTransformer over the Trainer's live encoder (`embedder.model`: FlagEmbedding's
    embedder wraps the Hugging Face encoder being trained), sharing its weights: no copy, every
    optimizer step is seen. Pooling and normalization as the job's model, the evaluation's length and
    precision (bf16 autocast); config and tokenizer come from `model_path`. Always torch: an ONNX
    export would copy the weights at every scoring (the run's tag embft.live_encoding says so)."""
    from sentence_transformers import models

    from embft.encoding.encoders import encoder_class
    from embft.encoding.model_folder import assemble_sentence_transformer

    encoder = embedder.model

    class _LiveTransformer(models.Transformer):
        def _load_model(self, *args: Any, **kwargs: Any):  # sentence-transformers' loading hook
            return encoder

    transformer = _LiveTransformer(model_path, max_seq_length=max_seq_length)
    device = str(next(encoder.parameters()).device)
    return assemble_sentence_transformer(transformer, pooling, normalize, device, encoder_class(precision))


def live_view(ctx: TrainContext, model: Any) -> Any:
    """The model being trained (a SentenceTransformer) seen as the evaluation encodes: its Hugging Face
    encoder's weights, shared, at the evaluation's max_seq_length (training may use a shorter one) and precision."""
    m, settings = ctx.cfg.model, ctx.encode_settings
    encoder = SimpleNamespace(model=model[0].auto_model)
    return live_sentence_transformer(
        encoder, ctx.model_path, m.pooling, m.normalize, settings["max_seq_length"], settings.get("precision", "fp32")
    )


def trained_result(
    trainer: Any, seconds: float, final: Path, batch_size: int, precision: str, device: str, metrics: dict
) -> TrainResult:
    """A Hugging Face style trainer's run as a TrainResult: queries from its optimizer steps, its logged losses."""
    n_queries = trainer.state.global_step * batch_size
    return TrainResult(
        model_dir=final,
        seconds=seconds,
        n_queries=n_queries,
        queries_per_second=n_queries / seconds if seconds else float("nan"),
        effective_batch_size=batch_size,
        precision=precision,
        device=device,
        losses=[(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e and "step" in e],
        metrics=metrics,
    )
