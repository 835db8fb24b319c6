"""Device and precision choice for training and encoding: CUDA or CPU, bf16 where it runs natively.

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
from typing import Union

import torch

from embft.errors import EmbftError

log = logging.getLogger(__name__)

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def pick_device(requested: str) -> str:
    """ "cuda" or "cpu" for `requested` in auto | cpu | cuda."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise EmbftError("train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu.")
    return str(requested)


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


def concrete_precision(requested: str, native: bool) -> str:
    """The one rule for `auto`: bf16 where the device runs it natively, else fp32 (training and evaluation)."""
    return ("bf16" if native else "fp32") if requested == "auto" else requested


def pick_precision(requested: str, device: Union[str, torch.device]) -> str:
    """ "bf16" or "fp32" for `requested` in auto | fp32 | bf16; auto is bf16 where the device runs it natively."""
    from embft.config import Precision, choice

    requested = str(choice(Precision, requested, "precision"))
    native = bf16_supported(device)
    if requested == "auto":
        chosen = concrete_precision(requested, native)
        log.info("precision=auto on %s: %s (native bf16: %s)", device, chosen, native)
        return chosen
    if requested == "bf16" and not native:
        log.warning("precision=bf16 on %s, which has no native bf16: expect it to be far slower than fp32", device)
    log.info("precision=%s on %s", requested, device)
    return str(requested)


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
