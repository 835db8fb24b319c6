"""Encode settings for evaluation, and the one builder of the SentenceTransformer that evaluates.

The baseline and the fine-tuned model are both built by `build_encoder` from the same `EncodeSettings`,
so they are always encoded the same way. Two fast paths, both checked against torch fp32 in
tests/test_encoders.py:

- precision=bf16: the model's forward runs under `torch.autocast(device, bfloat16)` (weights stay
  fp32). Casting the weights instead (`model.to(torch.bfloat16)`) differs from fp32 far more,
  because LayerNorm, softmax and the pooling then run in bf16 too; autocast keeps those in fp32.
- backend=onnx: sentence-transformers' own `backend="onnx"` (Optimum exports the folder to ONNX,
  then ONNX Runtime runs it); fp32.

Measured speeds and differences, with their command, machine and date: the docs' performance page.

`auto` is resolved by `resolve_eval_settings` to a concrete value before anything is hashed or
logged, so a bf16 result is never taken for the fp32 one of the same config.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

from embft.errors import EmbftError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeSettings:
    """How evaluation encodes texts; concrete values only (see `resolve_eval_settings`)."""

    precision: str = "fp32"  # fp32 | bf16
    backend: str = "torch"  # torch | onnx
    max_seq_length: Optional[int] = None  # None: the model folder's own limit
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16") or self.backend not in ("torch", "onnx"):
            raise ValueError(
                f"EncodeSettings takes resolved values, got precision={self.precision!r}, "
                f"backend={self.backend!r}; use resolve_eval_settings"
            )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def onnx_available() -> bool:
    """Whether sentence-transformers' ONNX backend can load (ONNX Runtime and Optimum installed)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "optimum"))


def _native_bf16(device: str) -> bool:
    from embft.encoding.precision import bf16_supported

    return bf16_supported(device)


def resolve_eval_settings(
    cfg_eval: Any, device: Union[str, Any], default_max_seq_length: Optional[int] = None
) -> EncodeSettings:
    """Concrete `EncodeSettings` for `cfg_eval` (precision, backend, max_seq_length, batch_size) on `device`.

    `default_max_seq_length` applies where cfg_eval has no max_seq_length (None: the folder's own limit).

    precision=auto: bf16 where `device` runs it natively (AMX/AVX512-BF16 CPU, CUDA with bf16), else fp32.
    backend=auto: onnx for fp32 on a CPU where ONNX Runtime is installed, else torch.
    """

    def get(key: str, default: Any) -> Any:
        value = cfg_eval.get(key, default) if hasattr(cfg_eval, "get") else getattr(cfg_eval, key, default)
        return default if value is None and key in ("precision", "backend") else value

    from embft.config import Backend, Precision, choice
    from embft.encoding.precision import concrete_precision

    precision = str(choice(Precision, get("precision", "fp32"), "eval.precision"))
    backend = str(choice(Backend, get("backend", "torch"), "eval.backend"))
    kind = str(device).split(":")[0]
    native = _native_bf16(str(device))
    if precision == "auto":  # the ONNX backend runs fp32 only; elsewhere auto means what it means for training
        precision = "fp32" if backend == "onnx" else concrete_precision(precision, native)
    if backend == "auto":
        backend = "onnx" if precision == "fp32" and kind == "cpu" and onnx_available() else "torch"
    if precision == "bf16" and backend == "onnx":
        raise EmbftError(
            "eval.precision=bf16 with eval.backend=onnx: the ONNX backend runs fp32 only; "
            "use eval.backend=torch for bf16."
        )
    if backend == "onnx" and not onnx_available():
        raise EmbftError(
            "eval.backend=onnx needs ONNX Runtime and Optimum: pip install 'sentence-transformers[onnx]' "
            "(or use eval.backend=torch)."
        )
    if precision == "bf16" and not native:
        log.warning("eval.precision=bf16 on %s, which has no native bf16: expect it to be far slower than fp32", device)
    max_len = get("max_seq_length", None)
    max_len = default_max_seq_length if max_len is None else max_len
    settings = EncodeSettings(
        precision=precision,
        backend=backend,
        max_seq_length=int(max_len) if max_len is not None else None,
        batch_size=int(get("batch_size", 64)),
    )
    log.info("Evaluation encodes with %s on %s (native bf16: %s)", settings, device, native)
    return settings


def pin_eval_settings(cfg: Any, device: str, default_max_seq_length: Optional[int] = None) -> EncodeSettings:
    """Resolve cfg.eval's precision/backend on `device` and write the concrete values back into cfg,
    so that the config hash, the logged params and the baseline key all see them."""
    from omegaconf import open_dict

    settings = resolve_eval_settings(cfg.eval, device, default_max_seq_length)
    with open_dict(cfg):
        cfg.eval.precision, cfg.eval.backend = settings.precision, settings.backend
    return settings


@functools.cache
def _autocast_class():
    import torch
    from sentence_transformers import SentenceTransformer

    class Bf16AutocastSentenceTransformer(SentenceTransformer):
        """A SentenceTransformer whose forward runs under bf16 autocast, so any caller of `encode`
        (MTEB included) gets the bf16 path without passing anything; weights stay fp32."""

        def forward(self, input, **kwargs):  # noqa: A002 (the parent's name)
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return super().forward(input, **kwargs)

    return Bf16AutocastSentenceTransformer


def encoder_class(precision: str):
    """The SentenceTransformer class that encodes at `precision`: bf16 autocast, or None (the plain one, fp32)."""
    return _autocast_class() if precision == "bf16" else None


def build_encoder(path: str, pooling: str, normalize: bool, settings: EncodeSettings, device: Optional[str] = None):
    """The SentenceTransformer that evaluates the model folder `path` (a bare Hugging Face folder or a
    saved SentenceTransformer) with exactly this pooling/normalization and these encode settings."""
    from sentence_transformers.sentence_transformer.modules import Transformer

    from embft.encoding.model_folder import assemble_sentence_transformer

    if is_static(path):  # train.backend=model2vec: a token-vector table and a mean, saved whole with its Normalize
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(path, device=device, local_files_only=True)
    if settings.backend == "onnx":
        # "Saving the exported ONNX model is heavily recommended": the export is per job and takes seconds.
        logging.getLogger("sentence_transformers.backend.utils").setLevel(logging.ERROR)
    transformer = Transformer(path, max_seq_length=settings.max_seq_length, backend=settings.backend)
    positions = getattr(getattr(transformer.auto_model, "config", None), "max_position_embeddings", None)
    if settings.max_seq_length and positions and settings.max_seq_length > positions:
        raise EmbftError(
            f"eval.max_seq_length={settings.max_seq_length} is longer than the {positions} positions of the "
            f"model in {path}; set eval.max_seq_length={positions} or lower."
        )
    return assemble_sentence_transformer(transformer, pooling, normalize, device, encoder_class(settings.precision))


def is_static(path: str) -> bool:
    """Is the folder a static-embedding SentenceTransformer (its first module a StaticEmbedding)?"""
    modules = Path(path) / "modules.json"
    return modules.is_file() and "StaticEmbedding" in json.loads(modules.read_text())[0].get("type", "")


def same_encoding(base: dict[str, Any], tuned: dict[str, Any]) -> bool:
    """Do two describe_encoder results encode alike? A static model (train.backend=model2vec) is another
    architecture by design: its normalization and device must match, pooling and length do not apply."""
    if tuned.get("architecture") == "static":
        return all(base[k] == tuned[k] for k in ("normalize", "device"))
    return base == tuned


def describe_encoder(model: Any) -> dict[str, Any]:
    """What decides how a SentenceTransformer encodes: compared between the two sides of a job."""
    transformer, pooling = model[0], next((m for m in model if type(m).__name__ == "Pooling"), None)
    return {
        **({"architecture": "static"} if type(transformer).__name__ == "StaticEmbedding" else {}),
        "class": type(model).__name__,  # the bf16-autocast subclass or the plain one
        "backend": getattr(transformer, "backend", "torch"),
        "max_seq_length": model.max_seq_length,
        "pooling": pooling.get_config_dict() if pooling is not None else None,
        "normalize": any(type(m).__name__ == "Normalize" for m in model),
        "dtype": str(next(iter(model.parameters()), None).dtype) if any(True for _ in model.parameters()) else None,
        "device": str(model.device),
    }
