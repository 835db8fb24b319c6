"""FlagEmbedding glue: the runner's arguments from the config, batch-size rules, and the one
function that trains with `EncoderOnlyEmbedderRunner` (in the job's process or a torchrun worker)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from embft.config import Config, Loss, TrainConfig, VariantConfig
from embft.errors import EmbftError


@dataclass
class RunnerSpec:
    """FlagEmbedding's arguments as plain JSON-able data: what `run_runner` needs, here or in a worker."""

    loss: str
    precision: str
    device: str
    model_args: dict[str, Any]
    data_args: dict[str, Any]
    training_args: dict[str, Any]
    # Set by embft.training.flagembedding.distributed.launch for torchrun workers.
    result_file: Optional[str] = None
    error_dir: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunnerOutcome:
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss averaged over processes)


def per_process_batch_size(train_cfg: TrainConfig, same_dataset: bool) -> int:
    """Queries per optimizer step in each process, as FlagEmbedding will really use them."""
    if not same_dataset:
        return train_cfg.per_device_train_batch_size
    if train_cfg.same_dataset_batch_size is not None:
        return train_cfg.same_dataset_batch_size
    return train_cfg.per_device_train_batch_size // 2  # FlagEmbedding's rule for `symmetric_*` records


def effective_batch_size(train_cfg: TrainConfig, same_dataset: bool) -> int:
    """Queries per optimizer step over all processes (DDP averages the processes' gradients)."""
    return per_process_batch_size(train_cfg, same_dataset) * train_cfg.nproc_per_node


def inert_suffix_reason(train_cfg: TrainConfig, variant_cfg: VariantConfig) -> Optional[str]:
    """Why the training folder's no_in_batch_neg suffix cannot change the trained weights under these
    settings (FlagEmbedding 1.4.2, one process), or None where it can or we have not shown it cannot.

    tests/test_train.py trains both twins of each case and compares their weights."""
    if train_cfg.nproc_per_node != 1 or train_cfg.negatives_cross_device:
        return None
    if not variant_cfg.same_dataset_within_batch:
        # AbsEmbedderCollator, the mixed-batch collator, always sends no_in_batch_neg_flag=False
        return "outside same-dataset mode FlagEmbedding never reads the suffix"
    if train_cfg.loss == Loss.stock and per_process_batch_size(train_cfg, True) == 1:
        return "one query per step, where FlagEmbedding's in-batch and per-query losses are the same sum"
    return None


def check_parallel(train_cfg: TrainConfig, variant_cfg: VariantConfig) -> None:
    """Refuse process settings that cannot work, before any data or model is touched."""
    n = train_cfg.nproc_per_node
    if n < 1:
        raise EmbftError(f"train.nproc_per_node={n}: use 1 (one process) or more.")
    if train_cfg.negatives_cross_device:
        if n == 1:
            raise EmbftError(
                "train.negatives_cross_device=true shares negatives between processes; "
                "it needs train.nproc_per_node > 1."
            )
        if variant_cfg.no_in_batch_neg:
            raise EmbftError(
                f"train.negatives_cross_device=true: variant={variant_cfg.name} trains without in-batch "
                "negatives, so there are none to share; use variant=same or no_same, or drop the flag."
            )
    if n > 1 and train_cfg.device != "cpu":
        import torch

        if torch.cuda.is_available() and n > torch.cuda.device_count():
            raise EmbftError(
                f"train.nproc_per_node={n} but {torch.cuda.device_count()} GPU(s) are visible; "
                "use at most one process per GPU."
            )


def runner_spec(
    cfg: Config, records_dir: Path, model_path: str, bare_dir: Path, precision: str, device: str
) -> RunnerSpec:
    t, m, v = cfg.train, cfg.model, cfg.variant
    return RunnerSpec(
        loss=str(t.loss),
        precision=precision,
        device=device,
        model_args={"model_name_or_path": model_path},
        data_args={
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
        training_args={
            "output_dir": str(bare_dir),
            "overwrite_output_dir": True,
            "learning_rate": t.learning_rate,
            "num_train_epochs": t.num_train_epochs,
            "per_device_train_batch_size": t.per_device_train_batch_size,
            "warmup_ratio": t.warmup_ratio,
            "temperature": t.temperature,
            "sentence_pooling_method": str(m.pooling),
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
    )


def run_runner(spec: RunnerSpec, callbacks: tuple = ()) -> RunnerOutcome:
    """Train with FlagEmbedding's runner and save the bare weights into training_args.output_dir.

    The one code path for both cases: called in the job's process, or by every torchrun worker
    (TrainingArguments then picks up RANK/WORLD_SIZE from the environment; only rank 0 saves).
    `callbacks` (transformers TrainerCallbacks) are added to FlagEmbedding's Trainer before it runs.
    """
    from FlagEmbedding.finetune.embedder.encoder_only.base import (
        EncoderOnlyEmbedderDataArguments,
        EncoderOnlyEmbedderModelArguments,
        EncoderOnlyEmbedderRunner,
        EncoderOnlyEmbedderTrainingArguments,
    )

    from embft.encoding.precision import precision_training_kwargs
    from embft.training.flagembedding.groupwise import GroupwiseEmbedderRunner

    runner_cls = GroupwiseEmbedderRunner if spec.loss == "groupwise" else EncoderOnlyEmbedderRunner
    training_args = EncoderOnlyEmbedderTrainingArguments(
        **spec.training_args, **precision_training_kwargs(spec.precision, spec.device)
    )
    runner = runner_cls(
        model_args=EncoderOnlyEmbedderModelArguments(**spec.model_args),
        data_args=EncoderOnlyEmbedderDataArguments(**spec.data_args),
        training_args=training_args,
    )
    from embft.training.callbacks import use_progress_bar

    use_progress_bar(runner.trainer)  # one bar with ETA instead of a dict per logging step
    for callback in callbacks:
        runner.trainer.add_callback(callback)
    start = time.perf_counter()
    runner.run()  # train, then save the bare weights
    seconds = time.perf_counter() - start
    losses = [(int(e["step"]), float(e["loss"])) for e in runner.trainer.state.log_history if "loss" in e]
    return RunnerOutcome(seconds=seconds, losses=losses)
