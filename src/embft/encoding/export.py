"""A fine-tuned SentenceTransformer folder exported for serving (`tracking.serve_backend`).

The export runs once, in the job, into the model folder itself; `SERVE_FILE` in the folder says which
backend and file a loader opens (`serve_load_kwargs`), so loading needs no export and no network.
The backends are sentence-transformers' own: `backend="onnx"` (Optimum + ONNX Runtime) with
`export_dynamic_quantized_onnx_model` for int8, `backend="openvino"` (optimum-intel) with static int8
quantization calibrated on the job's own train texts (sentence-transformers' helper would download GLUE).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import platform
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embft.errors import EmbftError

log = logging.getLogger(__name__)

# Written into an exported folder: {"backend": torch|onnx|openvino, "file_name": the file under the folder}.
SERVE_FILE = "embft_serve_backend.json"
# serve_backend -> (sentence-transformers backend, the modules it needs, the pip extra that installs them)
BACKENDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "torch": ("torch", (), ""),
    "onnx": ("onnx", ("onnxruntime", "optimum.onnxruntime"), "sentence-transformers[onnx]"),
    "onnx_int8": ("onnx", ("onnxruntime", "optimum.onnxruntime"), "sentence-transformers[onnx]"),
    "openvino": ("openvino", ("openvino", "optimum.intel"), "sentence-transformers[openvino]"),
    "openvino_int8": ("openvino", ("openvino", "optimum.intel", "nncf"), "sentence-transformers[openvino]"),
}
# What a served model's environment needs beside torch, per sentence-transformers backend (pinned as installed).
SERVE_PACKAGES = {
    "onnx": ("onnxruntime", "optimum", "optimum-onnx"),
    "openvino": ("openvino", "openvino-tokenizers", "optimum", "optimum-intel"),
}
CALIBRATION_TEXTS = 300  # as sentence-transformers' OpenVINO helper (OVQuantizationConfig's num_samples)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


def check_serve_backend(backend: str, key: str = "tracking.serve_backend") -> None:
    """One line before any work: an unknown backend, or one whose packages are not installed."""
    if backend not in BACKENDS:
        raise EmbftError(f"{key}={backend}: choose one of {', '.join(BACKENDS)}.")
    _, modules, extra = BACKENDS[backend]
    missing = [m for m in modules if not _installed(m)]
    if missing:
        raise EmbftError(f"{key}={backend} needs {', '.join(missing)}: pip install '{extra}' (or use {key}=torch).")


def onnx_quantization_config() -> str:
    """ONNX Runtime's dynamic int8 preset for this CPU: VNNI's full 8-bit range where it has VNNI, else
    the avx2 preset (7-bit range, no u8s8 overflow on CPUs without VNNI), arm64 on ARM."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "arm64"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return "avx512_vnni" if "avx512_vnni" in flags else "avx2"


def serve_spec(model_dir: Path) -> dict[str, str]:
    """What an exported folder is served with ({"backend": "torch"} for a folder never exported)."""
    path = Path(model_dir) / SERVE_FILE
    return json.loads(path.read_text()) if path.is_file() else {"backend": "torch"}


def serve_load_kwargs(model_dir: Path) -> dict[str, Any]:
    """SentenceTransformer(model_dir, **these) loads the served backend with no export (the pyfunc model
    repeats these lines: it imports nothing from embft)."""
    spec = serve_spec(model_dir)
    if spec["backend"] == "torch":
        return {}
    return {"backend": spec["backend"], "model_kwargs": {"file_name": spec["file_name"]}}


def load_served(model_dir: Path, device: str = "cpu") -> Any:
    """The folder's SentenceTransformer with the backend it is served with, as the served model loads it."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device=device, local_files_only=True, **serve_load_kwargs(model_dir))


def export_for_serving(model_dir: Path, backend: str, calibration_texts: Sequence[str] = ()) -> dict[str, str]:
    """Export the SentenceTransformer folder `model_dir` to `backend` in place (onnx/ or openvino/ beside
    the weights) and record it in SERVE_FILE; returns the record. One line (EmbftError) when it fails."""
    check_serve_backend(backend)
    model_dir = Path(model_dir)
    if backend == "torch":
        spec = {"backend": "torch"}
    else:
        try:
            spec = _export(model_dir, backend, list(calibration_texts))
        except EmbftError:
            raise
        except Exception as err:  # the exporters raise many types (unsupported op, architecture, ...)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise EmbftError(
                f"tracking.serve_backend={backend}: exporting {model_dir} failed ({type(err).__name__}: {first[:200]}); "
                "use tracking.serve_backend=torch."
            ) from err
    (model_dir / SERVE_FILE).write_text(json.dumps(spec, indent=1, sort_keys=True))
    return spec


def _export(model_dir: Path, backend: str, texts: list[str]) -> dict[str, str]:
    from sentence_transformers import SentenceTransformer

    st_backend = BACKENDS[backend][0]
    modules = json.loads((model_dir / "modules.json").read_text()) if (model_dir / "modules.json").is_file() else []
    if not any(m.get("type", "").endswith("Transformer") for m in modules):
        raise EmbftError(
            f"tracking.serve_backend={backend}: {model_dir} holds no Transformer module to export "
            "(a static-embedding model is served by torch); use tracking.serve_backend=torch."
        )
    # "Saving the exported model is heavily recommended": it is saved below, into the folder.
    logging.getLogger("sentence_transformers.backend.utils").setLevel(logging.ERROR)
    model = SentenceTransformer(str(model_dir), device="cpu", backend=st_backend, local_files_only=True)
    if backend == "onnx":
        _save_backend_files(model, model_dir, "onnx")
        return {"backend": "onnx", "file_name": "onnx/model.onnx"}
    if backend == "openvino":
        _save_backend_files(model, model_dir, "openvino")
        return {"backend": "openvino", "file_name": "openvino/openvino_model.xml"}
    if backend == "onnx_int8":
        from sentence_transformers.backend import export_dynamic_quantized_onnx_model

        preset = onnx_quantization_config()
        export_dynamic_quantized_onnx_model(model, preset, str(model_dir), file_suffix=f"qint8_{preset}")
        return {"backend": "onnx", "file_name": f"onnx/model_qint8_{preset}.onnx", "quantization": preset}
    return _export_openvino_int8(model, model_dir, texts)


def _save_backend_files(model: Any, model_dir: Path, sub: str) -> None:
    """Only the exported backend folder (`onnx/`, `openvino/`) is added to model_dir: saved beside it, then moved."""
    with tempfile.TemporaryDirectory(dir=model_dir.parent) as tmp:
        model.save_pretrained(tmp)
        if (model_dir / sub).exists():
            shutil.rmtree(model_dir / sub)
        shutil.move(str(Path(tmp) / sub), str(model_dir / sub))


def _export_openvino_int8(model: Any, model_dir: Path, texts: list[str]) -> dict[str, str]:
    """Static int8 (OpenVINO's NNCF), calibrated on up to CALIBRATION_TEXTS of the job's own train texts,
    tokenized at the model's max_seq_length (sentence-transformers' helper downloads GLUE for this)."""
    import datasets
    from optimum.intel.openvino import OVConfig, OVQuantizationConfig, OVQuantizer

    if not texts:
        raise EmbftError("tracking.serve_backend=openvino_int8 needs calibration texts (the job's train texts).")
    texts = texts[:CALIBRATION_TEXTS]
    length = model.max_seq_length or 128
    calibration = datasets.Dataset.from_dict({"text": texts}).map(
        lambda batch: model.tokenizer(batch["text"], padding="max_length", max_length=length, truncation=True),
        batched=True,
        remove_columns=["text"],
    )
    config = OVQuantizationConfig(num_samples=len(texts))
    quantizer = OVQuantizer.from_pretrained(model.transformers_model)
    name = "openvino_model_qint8_quantized"
    with tempfile.TemporaryDirectory(dir=model_dir.parent) as tmp:
        quantizer.quantize(calibration, save_directory=tmp, ov_config=OVConfig(quantization_config=config))
        source = Path(tmp) / "openvino" if (Path(tmp) / "openvino").is_dir() else Path(tmp)
        (model_dir / "openvino").mkdir(exist_ok=True)
        for suffix in (".xml", ".bin"):
            shutil.move(str(source / f"openvino_model{suffix}"), str(model_dir / "openvino" / f"{name}{suffix}"))
    return {"backend": "openvino", "file_name": f"openvino/{name}.xml", "quantization": "static int8"}
