"""`embft predict`: classify the `text` column of a csv/jsonl/parquet file with a logged classifier."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from embft.errors import EmbftError

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def file_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise EmbftError(f"{path}: unknown file type {path.suffix!r}; use .csv, .jsonl or .parquet.")
    return fmt


def read_table(path: Path) -> pd.DataFrame:
    fmt = file_format(path)
    if not path.is_file():
        raise EmbftError(f"{path}: no such file.")
    readers = {  # a csv's texts stay strings ("42" is a text); its empty cells are null, refused by predict
        "csv": lambda p: pd.read_csv(p, dtype={"text": str}),
        "jsonl": lambda p: pd.read_json(p, lines=True, dtype={"text": object}),
        "parquet": pd.read_parquet,
    }
    frame = readers[fmt](path)
    if "text" not in frame.columns:
        raise EmbftError(f"{path}: needs a `text` column (has {', '.join(map(str, frame.columns)) or 'none'}).")
    return frame


def write_table(frame: pd.DataFrame, fmt: str, out: Optional[Path]) -> None:
    if fmt == "parquet":
        if out is None:
            raise EmbftError("Parquet output needs --out FILE.")
        frame.to_parquet(out, index=False)
    elif fmt == "csv":
        frame.to_csv(out if out else sys.stdout, index=False)
    else:
        text = frame.to_json(orient="records", lines=True, force_ascii=False)
        if out:
            out.write_text(text)
        else:
            sys.stdout.write(text)


def predict_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="embft predict",
        description="Classify the `text` column of a csv/jsonl/parquet file with a logged classifier; "
        "writes the input columns plus label, label_name and score_<name> per class.",
    )
    parser.add_argument("model_uri", help="models:/NAME@champion, models:/m-..., runs:/RUN_ID/classifier, or a folder")
    parser.add_argument("input", type=Path)
    parser.add_argument(
        "--out",
        type=Path,
        help="output file (format from its suffix); default: stdout, input's format. Input "
        "columns named like an output column are kept as <name>_input",
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store for models:/ and runs:/ URIs (default: MLFLOW_TRACKING_URI, "
        "else the project's sqlite store)",
    )
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        frame = read_table(args.input)
        fmt = file_format(args.out) if args.out else file_format(args.input)
        model = load_classifier(args.model_uri, args.tracking_uri)
        labels = predict_in_chunks(model, frame[["text"]], args.input)
        # An input column named like an output one (e.g. a gold `label`) is kept as `<name>_input`.
        frame = frame.rename(columns={c: f"{c}_input" for c in labels.columns if c in frame.columns})
        write_table(pd.concat([frame.reset_index(drop=True), labels.reset_index(drop=True)], axis=1), fmt, args.out)
    except EmbftError as err:
        print(f"embft predict: {err}", file=sys.stderr)
        return 1
    return 0


def predict_in_chunks(model: Any, texts: pd.DataFrame, source: Path) -> pd.DataFrame:
    """The classifier's predictions for a whole file, MAX_ROWS rows per call (a served model's cap per
    request); a bad text stops it before any work with the message the server gives (rows from 0)."""
    from mlflow.exceptions import MlflowException

    from embft.serving.classifier import MAX_ROWS, text_problem

    problem = text_problem(texts["text"].tolist())
    if problem:
        raise EmbftError(f"{source}: {problem}")
    try:
        chunks = [model.predict(texts.iloc[s : s + MAX_ROWS]) for s in range(0, len(texts), MAX_ROWS)]
    except MlflowException as err:  # e.g. MLflow's check against the model's signature
        raise EmbftError(f"{source}: {err.message.strip().splitlines()[0]}") from err
    if not chunks:
        return model.predict(texts)
    return pd.concat(chunks, ignore_index=True)


def load_classifier(model_uri: str, tracking_uri: Optional[str] = None):
    import mlflow
    from mlflow.exceptions import MlflowException

    from embft.config import default_tracking_uri

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EmbftError(f"cannot load {model_uri} from {uri}: {first}") from err
