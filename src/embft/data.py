"""Data loading: read a labelled dataset (local files or the Hub), validate it, and hold out the validation
split. Training records are written by each trainer (FlagEmbedding's: training/flagembedding/records.py)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from embft.config import DataConfig
from embft.errors import EmbftError

log = logging.getLogger(__name__)

READERS: dict[str, Callable[[Path], pd.DataFrame]] = {
    ".csv": pd.read_csv,
    ".jsonl": lambda p: pd.read_json(p, lines=True),
    ".json": lambda p: pd.read_json(p, lines=True),
    ".parquet": pd.read_parquet,
}


def frame_fingerprint(frame: pd.DataFrame) -> str:
    return hashlib.sha256(
        pd.util.hash_pandas_object(frame[["text", "label"]], index=False).values.tobytes()
    ).hexdigest()[:16]


@dataclass
class Splits:
    """Validated splits with columns `text` (str) and `label` (int id).

    `train` feeds the training records, mined negatives and the kNN support set; `validation` is
    disjoint from it (no shared text) and scores every choice; `test` is for the final figure.
    """

    train: pd.DataFrame
    test: pd.DataFrame
    label_names: list[str]
    source: str
    validation: pd.DataFrame = field(default_factory=lambda: pd.DataFrame({"text": [], "label": []}))
    notes: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Content hash of the splits: the cache key of everything derived from them."""
        digest = hashlib.sha256()
        frames = (self.train, self.test) if self.validation.empty else (self.train, self.test, self.validation)
        for frame in frames:
            digest.update(pd.util.hash_pandas_object(frame[["text", "label"]], index=False).values.tobytes())
        digest.update(json.dumps(self.label_names).encode())
        return digest.hexdigest()[:16]


def _find_split_file(folder: Path, split: str) -> Path:
    found = sorted(p for p in folder.glob(f"{split}.*") if p.suffix in READERS)
    if not found:
        raise EmbftError(
            f"No {split} file in {folder}: expected {split}.csv, {split}.jsonl or {split}.parquet "
            f"(set data.local_dir to the folder that holds them)."
        )
    return found[0]


def folder_fingerprint(cfg: DataConfig) -> Optional[str]:
    """The bytes of the split files data.local_dir holds (None without local_dir): a job's identity
    names the data, not how its path was spelled (`../shared/data/x`, its absolute path, another
    machine's mount). Read before the data is loaded; hashed once per (file, size, mtime) in a process."""
    if not cfg.local_dir:
        return None
    folder = local_folder(cfg)
    assert folder is not None  # local_dir set: local_folder found it or raised
    splits = [cfg.train_split, cfg.test_split, *([cfg.validation_split] if cfg.validation_split else [])]
    files = [_find_split_file(folder, split) for split in splits]
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _files_digest(stats)


@functools.cache
def _files_digest(stats: tuple) -> str:
    digest = hashlib.sha256()
    for path, _, _ in stats:
        digest.update(Path(path).suffix.encode() + b"\0")  # the reader a file gets is part of the data
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _read_local(folder: Path, split: str) -> tuple[pd.DataFrame, str]:
    path = _find_split_file(folder, split)
    try:
        frame = READERS[path.suffix](path)
    except (ValueError, pd.errors.EmptyDataError, OSError) as err:
        raise EmbftError(f"Cannot read {path}: {err}. Check that it is a valid {path.suffix[1:]} file.") from err
    if frame.empty:
        raise EmbftError(f"{path} has no rows: give it labelled examples.")
    return frame, str(path)


def _read_hub(cfg: DataConfig, split: str) -> pd.DataFrame:
    import datasets

    path, revision = cfg.hub_path, cfg.hub_revision
    try:
        dataset = datasets.load_dataset(path, revision=revision, split=split)
    except (ConnectionError, OSError, ValueError) as err:
        local = f"data.root/{cfg.folder} (now {cfg.root})" if cfg.folder else "../shared/data/ag_news"
        raise EmbftError(
            f"Cannot load dataset {path!r} (revision {revision}) split {split!r} from the Hugging Face Hub "
            f"({type(err).__name__}). Offline, point data.local_dir at a local copy, e.g. "
            f"data.local_dir={local}."
        ) from err
    frame = dataset.to_pandas()
    column = cfg.hub_label_column
    if column:
        if column not in frame.columns:
            raise EmbftError(
                f"{path}[{split}] has no column {column!r} (columns: {list(frame.columns)}): set data.hub_label_column."
            )
        feature = dataset.features[column]
        if isinstance(feature, datasets.ClassLabel):  # ids in the Hub's order -> names, sorted into ids as locally
            frame[column] = feature.int2str(frame[column].tolist())
        if column != cfg.label_column:
            frame = frame.drop(columns=[cfg.label_column], errors="ignore").rename(columns={column: cfg.label_column})
    return frame


def data_root(cfg: DataConfig) -> Optional[Path]:
    """data.root as a folder (None when unset). A DataConfig built in code carries the schema's default
    unresolved; it is resolved here as composition would."""
    root = cfg.root
    if root and "${" in root:
        from omegaconf import OmegaConf

        from embft.config import register_configs

        register_configs()  # the embft_root resolver
        root = OmegaConf.create({"root": root}).root
    return Path(root).expanduser().resolve() if root else None


def local_folder(cfg: DataConfig) -> Optional[Path]:
    """Where the local copy is: data.local_dir (must exist), else data.root/data.folder where that
    folder exists, else None (the Hub)."""
    if cfg.local_dir:
        folder = Path(cfg.local_dir).expanduser().resolve()
        if not folder.is_dir():
            raise EmbftError(f"data.local_dir={cfg.local_dir!r}: no such folder ({folder}).")
        return folder
    root = data_root(cfg) if cfg.folder else None
    if root is not None and (root / cfg.folder).is_dir():
        return root / cfg.folder
    return None


def _clean(
    frame: pd.DataFrame, where: str, text_col: str, label_col: str, max_empty: float
) -> tuple[pd.DataFrame, int]:
    for col, role in ((text_col, "text"), (label_col, "label")):
        if col not in frame.columns:
            raise EmbftError(f"{where} has no column {col!r} (columns: {list(frame.columns)}): set data.{role}_column.")
    frame = frame[[text_col, label_col]].rename(columns={text_col: "text", label_col: "label"})
    labels = frame["label"]
    # A blank string is as missing as NaN: it would otherwise become a class of its own.
    missing = labels.isna() | (labels.astype("string").str.strip() == "").fillna(False)
    if missing.any():
        rows = ", ".join(str(i) for i in missing[missing].index[:5])
        raise EmbftError(
            f"{where}: {int(missing.sum())} rows have no label in column {label_col!r} (rows {rows}"
            f"{', ...' if missing.sum() > 5 else ''}); fill or drop them."
        )
    if not pd.api.types.is_numeric_dtype(labels):
        frame = frame.assign(label=labels.astype(str).str.strip())
    texts = frame["text"].astype("string").str.strip()
    empty = texts.isna() | (texts == "")
    n_empty = int(empty.sum())
    if n_empty > max_empty * len(frame):
        raise EmbftError(
            f"{where}: {n_empty} of {len(frame)} rows have an empty {text_col!r}; fix the data "
            f"(or raise data.max_empty_fraction, now {max_empty})."
        )
    frame = frame.assign(text=texts.astype(object))[~empty].reset_index(drop=True)
    return frame, n_empty


def _label_ids(frames: dict[str, pd.DataFrame], where: str) -> tuple[dict[str, pd.DataFrame], Optional[dict]]:
    """Integer labels stay; any other labels are mapped to ids in sorted order (one mapping for all splits)."""
    both = pd.concat([f["label"] for f in frames.values()])
    if pd.api.types.is_integer_dtype(both) or (pd.api.types.is_float_dtype(both) and (both == both.round()).all()):
        return {k: f.assign(label=f["label"].astype(int)) for k, f in frames.items()}, None
    mapping = {str(name): i for i, name in enumerate(sorted(both.astype(str).unique()))}
    log.info("%s: string labels mapped to ids %s", where, mapping)
    return {k: f.assign(label=f["label"].astype(str).map(mapping).astype(int)) for k, f in frames.items()}, mapping


def hold_out_validation(train: pd.DataFrame, size: float, seed: int, where: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train without the held-out rows, validation): class-stratified, seeded, deterministic.

    `size` < 1 is a fraction of the train rows, else a number of rows.
    """
    from sklearn.model_selection import train_test_split

    n_classes = train["label"].nunique()
    n_val = int(round(size * len(train))) if size < 1 else int(size)
    if n_val < n_classes or n_val > len(train) - n_classes:
        raise EmbftError(
            f"data.validation={size:g} holds out {n_val} of {len(train)} rows of {where}, but the {n_classes} classes "
            f"need at least one validation and one training row each; choose a size between {n_classes} and "
            f"{len(train) - n_classes} rows (or a fraction)."
        )
    rest, val = train_test_split(train, test_size=n_val, random_state=seed, stratify=train["label"])
    return rest.sort_index().reset_index(drop=True), val.sort_index().reset_index(drop=True)


def _class_names(label_names: list[str], mapping: Optional[dict]) -> Callable[[int], Any]:
    """Label id -> the class as a person knows it: the name before ':' in data.label_names, the
    original string label, or the id itself."""
    by_id = {i: name for name, i in (mapping or {}).items()}
    by_id.update({i: name.split(":")[0].strip() for i, name in enumerate(label_names)})
    return lambda i: by_id.get(int(i), int(i))


def _check_positives(train: pd.DataFrame, where: str, name: Callable[[int], Any] = int) -> None:
    counts = train["label"].value_counts().sort_index()
    lonely = [name(i) for i in counts[counts < 2].index]
    if lonely:
        raise EmbftError(
            f"{where}: class(es) {lonely} have a single example, so no positive can be drawn; "
            f"add examples, lower data.validation or drop the class."
        )


def _check_known(frame: pd.DataFrame, train: pd.DataFrame, where: str, name: Callable[[int], Any]) -> None:
    unseen = sorted(set(frame["label"]) - set(train["label"]))
    if unseen:
        raise EmbftError(
            f"{where}: class(es) {[name(i) for i in unseen]} never occur in train; kNN cannot predict them "
            "(drop those rows or add training examples)."
        )


def load_splits(cfg: DataConfig) -> Splits:
    """Read train, test (and validation) from `cfg.local_dir` when set, else from the Hub; validate them.

    Without `cfg.validation_split`, `cfg.validation` rows are held out of train (stratified, seeded).
    """
    names = {"train": cfg.train_split, "test": cfg.test_split}
    if cfg.validation_split:
        names["validation"] = cfg.validation_split
    folder = local_folder(cfg)
    if folder is not None:
        read = {role: _read_local(folder, split) for role, split in names.items()}
        raw = {role: frame for role, (frame, _) in read.items()}
        src = {role: f"data={cfg.name}, split {names[role]} ({where})" for role, (_, where) in read.items()}
        source = f"local:{folder}"
    else:
        if not cfg.hub_path:
            where = f" (no folder {cfg.folder!r} in data.root={cfg.root})" if cfg.folder else ""
            raise EmbftError(f"data={cfg.name}: set data.local_dir (or data.hub_path for a Hub dataset){where}.")
        raw = {role: _read_hub(cfg, split) for role, split in names.items()}
        src = {role: f"data={cfg.name}, split {split} ({cfg.hub_path}[{split}])" for role, split in names.items()}
        source = f"hub:{cfg.hub_path}@{cfg.hub_revision}"

    cleaned, empty = {}, {}
    for role, frame in raw.items():
        cleaned[role], empty[role] = _clean(frame, src[role], cfg.text_column, cfg.label_column, cfg.max_empty_fraction)
    frames, mapping = _label_ids(cleaned, src["train"])
    name = _class_names(list(cfg.label_names), mapping)
    train, test = frames["train"], frames["test"]
    train_src, test_src = src["train"], src["test"]
    notes: dict[str, Any] = {f"{role}_empty_dropped": n for role, n in empty.items()}
    if mapping:
        notes["label_mapping"] = mapping
    if any(empty.values()):
        log.warning("Dropped rows with empty text: %s", ", ".join(f"{n} in {role}" for role, n in empty.items()))

    overlap = train["text"].isin(set(test["text"]))
    if overlap.any():
        log.warning("Removed %d train rows whose text also occurs in test", int(overlap.sum()))
        train = train[~overlap].reset_index(drop=True)
    notes["train_test_overlap_removed"] = int(overlap.sum())

    counts = train["label"].value_counts()
    if len(counts) < 2:
        raise EmbftError(f"{train_src}: only one class ({counts.index.tolist()}); classification needs at least two.")
    _check_positives(train, train_src, name)
    _check_known(test, train, test_src, name)

    if "validation" in frames:
        validation = frames["validation"]
        _check_known(validation, train, src["validation"], name)
        notes["validation_source"] = src["validation"]
    else:
        train, validation = hold_out_validation(train, cfg.validation, cfg.seed, train_src)
        notes["validation_source"] = f"held out of {train_src}: data.validation={cfg.validation:g}, seed {cfg.seed}"
    # A validation text must never reach training records, mined negatives or the kNN support set.
    leaked = train["text"].isin(set(validation["text"]))
    if leaked.any():
        log.info("Removed %d train rows whose text also occurs in validation", int(leaked.sum()))
        train = train[~leaked].reset_index(drop=True)
    notes["train_validation_overlap_removed"] = int(leaked.sum())
    notes.update(
        validation_rows=len(validation),
        validation_fingerprint=frame_fingerprint(validation),
        train_rows=len(train),
        test_rows=len(test),
    )

    _check_positives(train, f"{train_src} (after holding out the validation rows)", name)

    n_labels = int(max(train["label"].max(), test["label"].max(), validation["label"].max())) + 1
    if cfg.label_names:
        if len(cfg.label_names) < n_labels:
            raise EmbftError(f"data.label_names has {len(cfg.label_names)} names but labels go up to {n_labels - 1}.")
        names_ = list(cfg.label_names)
    elif mapping:
        names_ = list(mapping)
    else:
        names_ = [str(i) for i in range(n_labels)]
    return Splits(train=train, test=test, validation=validation, label_names=names_, source=source, notes=notes)
