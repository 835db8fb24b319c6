"""Training: fine-tune with FlagEmbedding's runner (in-process, or under torchrun with
train.nproc_per_node > 1) and save the result whole as a SentenceTransformer folder."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from embft.config import Config
from embft.encoding.model_folder import save_sentence_transformer
from embft.encoding.precision import pick_device, pick_precision
from embft.errors import EmbftError
from embft.training.base import TrainResult
from embft.training.flagembedding.runner import check_parallel, per_process_batch_size, run_runner, runner_spec

log = logging.getLogger(__name__)


def check_batches(cfg: Config, n_records: int) -> int:
    """Queries per step over all processes; one line where the settings or `n_records` training queries
    fill no step (FlagEmbedding would build no batch at all and its Trainer fail obscurely)."""
    t, v = cfg.train, cfg.variant
    per_process = per_process_batch_size(t, v.same_dataset_within_batch)
    if per_process < 1:
        raise EmbftError(
            f"train.per_device_train_batch_size={t.per_device_train_batch_size} gives batch {per_process} in same-dataset "
            f"mode (FlagEmbedding halves it for symmetric records); use at least 2 or set train.same_dataset_batch_size."
        )
    batch = per_process * t.nproc_per_node
    if v.same_dataset_within_batch and n_records < batch:
        raise EmbftError(
            f"{n_records} training queries do not fill one step of {batch} queries ({t.nproc_per_node} process(es) x "
            f"{per_process}); raise train.max_train_queries or lower the batch size."
        )
    return batch


def train(
    cfg: Config,
    records_dir: Path,
    model_path: str,
    n_records: int,
    out_dir: Path,
    encode_settings: Optional[dict[str, Any]] = None,
    callbacks: tuple = (),
) -> TrainResult:
    """Fine-tune with FlagEmbedding's EncoderOnlyEmbedderRunner and save to `out_dir/model`.

    With train.nproc_per_node > 1 the runner runs in torchrun's workers (embft.training.flagembedding.distributed); the
    conversion to a SentenceTransformer folder (with `encode_settings`) happens here either way.
    `callbacks` run in this process only, so they need nproc_per_node == 1.
    """
    t, m, v = cfg.train, cfg.model, cfg.variant
    check_parallel(t, v)
    nproc = t.nproc_per_node
    per_process = per_process_batch_size(t, v.same_dataset_within_batch)
    batch = check_batches(cfg, n_records)
    device = pick_device(t.device)
    precision = pick_precision(t.precision, device)

    out_dir.mkdir(parents=True, exist_ok=True)
    bare_dir = Path(tempfile.mkdtemp(prefix=".flagembedding.", dir=out_dir))
    try:
        spec = runner_spec(cfg, records_dir, model_path, bare_dir, precision, device)
        log.info(
            "Fine-tuning %s on %d queries: %s, batch %d queries/step%s, group %d, %s on %s, loss %s",
            m.name,
            n_records,
            v.name,
            batch,
            f" ({nproc} processes x {per_process})" if nproc > 1 else "",
            t.train_group_size,
            precision,
            device,
            t.loss,
        )
        if nproc == 1:
            outcome = run_runner(spec, callbacks)
        else:
            if callbacks:  # torchrun workers have neither the MLflow run nor the validation data
                log.warning("train.nproc_per_node=%d: live metrics, evaluation and pruning are off", nproc)
            from embft.training.flagembedding.distributed import launch

            outcome = launch(spec, nproc, device, work_parent=out_dir)
        final = out_dir / "model"
        save_sentence_transformer(bare_dir, final, m.pooling, m.normalize, encode_settings)
    finally:
        shutil.rmtree(bare_dir, ignore_errors=True)
    # Same-dataset mode drops each epoch's last partial (global) batch.
    per_epoch = (n_records // batch) * batch if v.same_dataset_within_batch else n_records
    n_queries = int(per_epoch * t.num_train_epochs)
    return TrainResult(
        model_dir=final,
        seconds=outcome.seconds,
        n_queries=n_queries,
        queries_per_second=n_queries / outcome.seconds if outcome.seconds else float("nan"),
        effective_batch_size=batch,
        precision=precision,
        device=device,
        losses=list(outcome.losses),
    )
