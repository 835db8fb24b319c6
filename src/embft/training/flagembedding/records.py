"""FlagEmbedding's training records from a job's train split: one JSON object a line, a query with a
same-class positive and other-class negatives (examples, label_text or mined hard pairing), cached
by content and settings in a folder whose name may end in no_in_batch_neg."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from embft.data import Splits, frame_fingerprint
from embft.errors import EmbftError

log = logging.getLogger(__name__)

RECORD_TYPE = "symmetric_class"
NO_IN_BATCH_NEG_SUFFIX = "no_in_batch_neg"


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
    pool: Optional[pd.DataFrame] = None,
    **settings: Any,
) -> Path:
    """Write (or reuse) the records folder for these settings and return it.

    The folder name ends in `no_in_batch_neg` when asked: FlagEmbedding reads that suffix of a
    training folder as "use only each query's own negatives".
    `encode` is needed for pairing='hard' (negatives mined with the base model, cached per model).
    `pool` (a strict label budget, train.per_class): queries, positives, negatives and mined negatives
    all come from these rows only, instead of the whole train split.
    """
    pairing = settings.get("pairing", "examples")
    scope = {} if pool is None else {"pool": frame_fingerprint(pool)}  # absent: keys of earlier records hold
    key = records_key(splits, model=model_key if pairing == "hard" else "", **scope, **settings)
    name = f"{dataset_name}-{key}" + (f"-{NO_IN_BATCH_NEG_SUFFIX}" if no_in_batch_neg else "")
    final = cache_dir / "records" / name
    if final.is_dir():
        log.info("Training records: cache hit %s", final)
        return final

    rows = splits.train if pool is None else pool
    texts = rows["text"].tolist()
    labels = rows["label"].to_numpy()
    neighbours = None
    if pairing == "hard":
        if encode is None:
            raise ValueError("pairing='hard' needs an encoder")
        folder = cache_dir / "hard_negatives" / records_key(splits, model=model_key, **scope)
        if not folder.is_dir():
            log.info("Mining hard negatives for %d texts with the base model", len(texts))
            mined = mine_hard_negatives(encode(texts), labels, n_candidates=64)
            write_atomic_dir(folder, lambda tmp: np.save(tmp / "neighbours.npy", mined))
        neighbours = np.load(folder / "neighbours.npy")
    records = build_records(texts, labels, neighbours=neighbours, label_names=splits.label_names, **settings)
    write_atomic_dir(final, lambda tmp: write_records(records, tmp / "train.jsonl"))
    log.info("Training records: wrote %d to %s", len(records), final)
    return final
