"""Data preparation: load a labelled dataset, validate it, and write FlagEmbedding training records."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
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
RECORD_TYPE = "symmetric_class"
NO_IN_BATCH_NEG_SUFFIX = "no_in_batch_neg"


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


def _read_local(folder: Path, split: str) -> tuple[pd.DataFrame, str]:
    path = _find_split_file(folder, split)
    try:
        frame = READERS[path.suffix](path)
    except (ValueError, pd.errors.EmptyDataError, OSError) as err:
        raise EmbftError(f"Cannot read {path}: {err}. Check that it is a valid {path.suffix[1:]} file.") from err
    if frame.empty:
        raise EmbftError(f"{path} has no rows: give it labelled examples.")
    return frame, str(path)


def _read_hub(path: str, revision: Optional[str], split: str) -> pd.DataFrame:
    import datasets

    try:
        return datasets.load_dataset(path, revision=revision, split=split).to_pandas()
    except (ConnectionError, OSError, ValueError) as err:
        raise EmbftError(
            f"Cannot load dataset {path!r} (revision {revision}) split {split!r} from the Hugging Face Hub "
            f"({type(err).__name__}). Offline, point data.local_dir at a local copy, e.g. "
            f"data.local_dir=../shared/data/ag_news."
        ) from err


def _clean(
    frame: pd.DataFrame, where: str, text_col: str, label_col: str, max_empty: float
) -> tuple[pd.DataFrame, int]:
    for col, role in ((text_col, "text"), (label_col, "label")):
        if col not in frame.columns:
            raise EmbftError(f"{where} has no column {col!r} (columns: {list(frame.columns)}): set data.{role}_column.")
    frame = frame[[text_col, label_col]].rename(columns={text_col: "text", label_col: "label"})
    if frame["label"].isna().any():
        raise EmbftError(
            f"{where}: {int(frame['label'].isna().sum())} rows have no label in column {label_col!r}; fill or drop them."
        )
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


def _check_positives(train: pd.DataFrame, where: str) -> None:
    counts = train["label"].value_counts()
    lonely = counts[counts < 2].index.tolist()
    if lonely:
        raise EmbftError(
            f"{where}: class(es) {lonely} have a single example, so no positive can be drawn; "
            f"add examples, lower data.validation or drop the class."
        )


def load_splits(cfg: DataConfig) -> Splits:
    """Read train, test (and validation) from `cfg.local_dir` when set, else from the Hub; validate them.

    Without `cfg.validation_split`, `cfg.validation` rows are held out of train (stratified, seeded).
    """
    names = {"train": cfg.train_split, "test": cfg.test_split}
    if cfg.validation_split:
        names["validation"] = cfg.validation_split
    if cfg.local_dir:
        folder = Path(cfg.local_dir).expanduser().resolve()
        if not folder.is_dir():
            raise EmbftError(f"data.local_dir={cfg.local_dir!r}: no such folder ({folder}).")
        read = {role: _read_local(folder, split) for role, split in names.items()}
        raw = {role: frame for role, (frame, _) in read.items()}
        src = {role: where for role, (_, where) in read.items()}
        source = f"local:{folder}"
    else:
        if not cfg.hub_path:
            raise EmbftError(f"data={cfg.name}: set data.local_dir (or data.hub_path for a Hub dataset).")
        raw = {role: _read_hub(cfg.hub_path, cfg.hub_revision, split) for role, split in names.items()}
        src = {role: f"{cfg.hub_path}[{split}]" for role, split in names.items()}
        source = f"hub:{cfg.hub_path}@{cfg.hub_revision}"

    cleaned, empty = {}, {}
    for role, frame in raw.items():
        cleaned[role], empty[role] = _clean(frame, src[role], cfg.text_column, cfg.label_column, cfg.max_empty_fraction)
    frames, mapping = _label_ids(cleaned, src["train"])
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
    _check_positives(train, train_src)
    unseen = sorted(set(test["label"]) - set(train["label"]))
    if unseen:
        raise EmbftError(f"{test_src}: labels {unseen} never occur in train; kNN cannot predict them.")

    if "validation" in frames:
        validation = frames["validation"]
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

    _check_positives(train, f"{train_src} (after holding out the validation rows)")

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


def build_records(
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    group_size: int,
    seed: int,
    max_queries: Optional[int] = None,
    prompt: str = "",
    batch_size: Optional[int] = None,
    pairing: str = "examples",
    label_names: Optional[Sequence[str]] = None,
    neighbours: Optional[np.ndarray] = None,
) -> list[dict]:
    """FlagEmbedding records `{query, pos, neg, prompt, type}`, one per query.

    examples:   pos = another text of the query's class, neg = group_size-1 texts of other classes.
    label_text: pos = the query's class name/description, neg = the other classes' ones.
    hard:       like examples, but neg = the other-class texts nearest the query; `neighbours[i]`
                lists candidate indices for row i, nearest first (see `mine_hard_negatives`).
    `prompt` is always written: without it FlagEmbedding prefixes queries with the string "None".
    """
    labels_arr = np.asarray(labels)
    rng = np.random.default_rng(seed)
    by_class = {c: np.flatnonzero(labels_arr == c) for c in np.unique(labels_arr)}
    n_neg = group_size - 1
    if pairing not in ("examples", "label_text", "hard"):
        raise EmbftError(f"data.pairing={pairing!r}: choose examples, label_text or hard.")
    if pairing == "label_text":
        if not label_names:
            raise EmbftError("data.pairing=label_text needs data.label_names (a name or description per class).")
        if n_neg > len(by_class) - 1:
            # FlagEmbedding fills a short group by repeating the negatives it has (AbsDataset).
            log.warning(
                "data.pairing=label_text: %d classes give %d negatives per query; FlagEmbedding will repeat "
                "them to fill train.train_group_size=%d (set train.train_group_size=%d to avoid repeats).",
                len(by_class),
                len(by_class) - 1,
                group_size,
                len(by_class),
            )
        n_neg = min(n_neg, len(by_class) - 1)
    else:
        fewest = min(len(labels_arr) - len(idx) for idx in by_class.values())
        if n_neg > fewest:
            raise EmbftError(
                f"train.train_group_size={group_size} needs {n_neg} negatives per query but some class has only "
                f"{fewest} texts of other classes; lower train.train_group_size."
            )
    if pairing == "hard" and neighbours is None:
        raise ValueError("pairing='hard' needs the mined neighbours")

    order = rng.permutation(len(labels_arr))
    if max_queries is not None:
        order = order[:max_queries]
    records = []
    for i in order:
        cls = labels_arr[i]
        same = by_class[cls]
        if pairing == "label_text":
            others = [c for c in by_class if c != cls]
            pos = [label_names[cls]]
            neg = [label_names[c] for c in rng.choice(others, size=n_neg, replace=False)]
        else:
            pos_idx = i
            while pos_idx == i:
                pos_idx = same[rng.integers(len(same))]
            pos = [texts[pos_idx]]
            if pairing == "hard":
                candidates = [j for j in neighbours[i] if labels_arr[j] != cls][:n_neg]
                neg_idx = np.asarray(candidates)
            else:
                neg_idx = np.empty(0, dtype=int)
                while len(neg_idx) < n_neg:  # rejection sampling: cheap while classes are balanced-ish
                    draw = rng.choice(len(labels_arr), size=2 * n_neg, replace=False)
                    neg_idx = np.unique(np.concatenate([neg_idx, draw[labels_arr[draw] != cls]]))
                neg_idx = rng.permutation(neg_idx)[:n_neg]
            neg = [texts[j] for j in neg_idx]
        record = {"query": texts[i], "pos": pos, "neg": neg, "prompt": prompt, "type": RECORD_TYPE}
        if batch_size is not None:
            record["batch_size"] = batch_size
        records.append(record)
    return records


def mine_hard_negatives(embeddings: np.ndarray, labels: Sequence[int], n_candidates: int) -> np.ndarray:
    """For each row, the indices of the nearest other-class rows (cosine), nearest first."""
    labels_arr = np.asarray(labels)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    result = np.empty((len(unit), n_candidates), dtype=np.int64)
    for start in range(0, len(unit), 1024):  # blocks keep the similarity matrix small
        sims = unit[start : start + 1024] @ unit.T
        block_labels = labels_arr[start : start + 1024]
        sims[block_labels[:, None] == labels_arr[None, :]] = -np.inf
        top = np.argpartition(-sims, n_candidates, axis=1)[:, :n_candidates]
        top_sims = np.take_along_axis(sims, top, axis=1)
        result[start : start + 1024] = np.take_along_axis(top, np.argsort(-top_sims, axis=1), axis=1)
    return result


def records_key(splits: Splits, **settings: Any) -> str:
    payload = json.dumps({"data": splits.fingerprint(), **settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def write_atomic_dir(final: Path, fill: Callable[[Path], None]) -> Path:
    """Build a folder under a temporary name and rename it into place; a finished folder is reused.

    Concurrent builders race on the rename; the loser discards its copy.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        fill(tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_records(records: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def prepare_records(
    splits: Splits,
    *,
    cache_dir: Path,
    dataset_name: str,
    no_in_batch_neg: bool,
    encode: Optional[Callable[[list[str]], np.ndarray]] = None,
    model_key: str = "",
    **settings: Any,
) -> Path:
    """Write (or reuse) the records folder for these settings and return it.

    The folder name ends in `no_in_batch_neg` when asked: FlagEmbedding reads that suffix of a
    training folder as "use only each query's own negatives".
    `encode` is needed for pairing='hard' (negatives mined with the base model, cached per model).
    """
    pairing = settings.get("pairing", "examples")
    key = records_key(splits, model=model_key if pairing == "hard" else "", **settings)
    name = f"{dataset_name}-{key}" + (f"-{NO_IN_BATCH_NEG_SUFFIX}" if no_in_batch_neg else "")
    final = cache_dir / "records" / name
    if final.is_dir():
        log.info("Training records: cache hit %s", final)
        return final

    texts = splits.train["text"].tolist()
    labels = splits.train["label"].to_numpy()
    neighbours = None
    if pairing == "hard":
        if encode is None:
            raise ValueError("pairing='hard' needs an encoder")
        folder = cache_dir / "hard_negatives" / records_key(splits, model=model_key)
        if not folder.is_dir():
            log.info("Mining hard negatives for %d texts with the base model", len(texts))
            mined = mine_hard_negatives(encode(texts), labels, n_candidates=64)
            write_atomic_dir(folder, lambda tmp: np.save(tmp / "neighbours.npy", mined))
        neighbours = np.load(folder / "neighbours.npy")
    records = build_records(texts, labels, neighbours=neighbours, label_names=splits.label_names, **settings)
    write_atomic_dir(final, lambda tmp: write_records(records, tmp / "train.jsonl"))
    log.info("Training records: wrote %d to %s", len(records), final)
    return final
