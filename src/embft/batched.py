"""Per-query ("groupwise") scoring for FlagEmbedding's no-in-batch-negatives loss, and precision choice.

FlagEmbedding's `_compute_no_in_batch_neg_loss` scores every query against every passage of the
batch, (B, d) x (d, B*G), then gathers each query's own G scores: B times the needed work and a
(B, B*G) matrix. `GroupwiseEmbedderModel` scores each query against its own group only,
(B, 1, d) x (B, d, G) -> (B, G), with the same loss (cross-entropy, positive at index 0).
Use `GroupwiseEmbedderRunner` in place of `EncoderOnlyEmbedderRunner` to train with it.

Mixed precision with transformers 4.57 (checked by experiment):
- On a machine without CUDA, `TrainingArguments(bf16=True)` raises "Your setup doesn't support
  bf16/gpu" unless `use_cpu=True` is passed too; with it the Trainer picks its "cpu_amp" backend
  and runs the forward under `torch.autocast("cpu", dtype=torch.bfloat16)` (weights stay fp32).
- `TrainingArguments` writes `ACCELERATE_MIXED_PRECISION=bf16` into `os.environ` and never clears
  it, so a later fp32 run in the same process still gets a bf16-autocast forward from accelerate.
  `precision_training_kwargs` resets the variable; call it for every run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch
from FlagEmbedding.finetune.embedder.encoder_only.base import EncoderOnlyEmbedderRunner
from FlagEmbedding.finetune.embedder.encoder_only.base.modeling import BiEncoderOnlyEmbedderModel
from torch import Tensor
from transformers import PreTrainedTokenizer

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def groupwise_scores(q_reps: Tensor, p_reps: Tensor, temperature: float) -> Tensor:
    """Scores (B, G) of each query against its own G passages.

    q_reps: (B, d); p_reps: (B*G, d), query i's group in rows i*G .. i*G+G-1 (FlagEmbedding's layout).
    """
    n_queries, dim = q_reps.shape
    group = p_reps.size(0) // n_queries
    groups = p_reps.reshape(n_queries, group, dim)
    return torch.bmm(q_reps.unsqueeze(1), groups.transpose(1, 2)).squeeze(1) / temperature


class GroupwiseEmbedderModel(BiEncoderOnlyEmbedderModel):
    """`BiEncoderOnlyEmbedderModel` whose no-in-batch-negatives loss scores only each query's own group.

    Adds no parameters or state, so an instance of the parent class can be re-classed to it.
    """

    def _compute_no_in_batch_neg_loss(
        self, q_reps: Tensor, p_reps: Tensor, teacher_targets: Optional[Tensor] = None,
        compute_score_func=None, **kwargs,
    ) -> tuple[Tensor, Tensor]:
        """(local scores (B, G), mean cross-entropy with the positive at index 0), as the stock method."""
        if teacher_targets is not None or compute_score_func is not None:
            return super()._compute_no_in_batch_neg_loss(
                q_reps, p_reps, teacher_targets=teacher_targets, compute_score_func=compute_score_func, **kwargs
            )
        scores = groupwise_scores(q_reps, p_reps, self.temperature)
        targets = torch.zeros(scores.size(0), device=scores.device, dtype=torch.long)
        return scores, self.compute_loss(scores, targets)


class GroupwiseEmbedderRunner(EncoderOnlyEmbedderRunner):
    """`EncoderOnlyEmbedderRunner` that trains a `GroupwiseEmbedderModel`."""

    def load_tokenizer_and_model(self) -> tuple[PreTrainedTokenizer, GroupwiseEmbedderModel]:
        tokenizer, model = super().load_tokenizer_and_model()
        if type(model) is not BiEncoderOnlyEmbedderModel:
            raise TypeError(f"expected a BiEncoderOnlyEmbedderModel from FlagEmbedding, got {type(model).__name__}")
        # The subclass only overrides a method, so swapping the class of the fully loaded model is exact
        # and keeps FlagEmbedding's own loading code (freezing, gradient checkpointing hooks) in charge.
        model.__class__ = GroupwiseEmbedderModel
        return tokenizer, model


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_supported(device: Union[str, torch.device]) -> bool:
    """Whether `device` runs bf16 matmuls natively (CUDA with bf16, or a CPU with AMX / AVX512-BF16).

    Without them PyTorch emulates bf16 on the CPU, hundreds of times slower than fp32.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind != "cpu":
        return False
    flags = _cpu_flags()
    if flags:
        return any(f in flags for f in CPU_BF16_FLAGS)
    # No /proc/cpuinfo (not Linux): ask PyTorch's private CPU probes where they exist.
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def pick_precision(requested: str, device: Union[str, torch.device]) -> str:
    """"bf16" or "fp32" for `requested` in auto | fp32 | bf16; auto is bf16 where the device runs it natively."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision={requested!r}: choose one of {', '.join(PRECISIONS)}.")
    native = bf16_supported(device)
    if requested == "auto":
        chosen = "bf16" if native else "fp32"
        log.info("precision=auto on %s: %s (native bf16: %s)", device, chosen, native)
        return chosen
    if requested == "bf16" and not native:
        log.warning("precision=bf16 on %s, which has no native bf16: expect it to be far slower than fp32", device)
    log.info("precision=%s on %s", requested, device)
    return requested


def precision_training_kwargs(precision: str, device: Union[str, torch.device]) -> dict[str, bool]:
    """`TrainingArguments` flags for `precision` ("bf16" or "fp32") on `device`.

    Side effect: sets ACCELERATE_MIXED_PRECISION to match, undoing the value an earlier
    `TrainingArguments(bf16=True)` in this process left behind (see the module docstring).
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r}: resolve it with pick_precision first.")
    bf16 = precision == "bf16"
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if bf16 else "no"
    return {"bf16": bf16, "use_cpu": torch.device(device).type == "cpu"}
