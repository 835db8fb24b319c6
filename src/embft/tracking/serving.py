"""Models in MLflow: log a job's fine-tuned embedder and its kNN classifier; `embft predict`.

Per job (when `tracking.log_model` asks for it), two logged models in the job's run:
- `embedder`: the fine-tuned SentenceTransformer, MLflow's sentence_transformers flavor;
- `classifier`: a pyfunc (embft/tracking/knn_classifier.py, logged as code) = that embedder + the job's
  kNN (eval.k, eval.metric) over a support set embedded from the train split + the label names.
Over a tracking server both upload through its artifact proxy (`mlflow-artifacts:`), so a
worker needs no disk shared with the server. The run gets tag `embft.classifier_uri`, which the
registry (embft.tracking.registry) registers.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from embft import names
from embft.config import LogModel, choice
from embft.errors import EmbftError
from embft.tracking import mlflow_runs

log = logging.getLogger(__name__)

INPUT_EXAMPLE = pd.DataFrame({"text": ["Stocks rallied after the central bank held rates steady."]})
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def _pins(*packages: str) -> list[str]:
    """Explicit pip requirements (exact installed versions): MLflow's inference would load the
    model in a subprocess to find them, slowly, and may guess wrong for a local build (torch+cpu)."""
    pins = []
    for package in packages:
        version = metadata.version(package).split("+")[0]
        pins.append(f"{package}=={version}")
    return pins


def support_set(train: pd.DataFrame, per_class: Optional[int], seed: int) -> pd.DataFrame:
    """The classifier's support rows: all of `train` (per_class None) or up to `per_class` rows
    of each label, sampled with `seed`; order kept so the same arguments give the same rows."""
    if per_class is None:
        return train[["text", "label"]].reset_index(drop=True)
    if per_class < 1:
        raise EmbftError(
            f"tracking.support_per_class={per_class}: use a positive number, or null for the whole train split."
        )
    shuffled = train.sample(frac=1.0, random_state=seed)
    return shuffled.groupby("label").head(per_class).sort_index()[["text", "label"]].reset_index(drop=True)


def support_source(splits: Any, cfg: Any) -> pd.DataFrame:
    """The rows a job's support set is drawn from: the train split, or with tracking.support_from_training
    the labelled texts its trainer read."""
    if not cfg.tracking.support_from_training:
        return splits.train
    from embft.training.labelled import training_texts

    return training_texts(splits.train, cfg.train.max_train_queries, cfg.train.seed)


def support_rows(splits: Any, cfg: Any) -> pd.DataFrame:
    """The served classifier's support set for a job (tracking.support_per_class, support_from_training)."""
    return support_set(support_source(splits, cfg), cfg.tracking.support_per_class, cfg.eval.seed)


def embed(model: Any, texts: Sequence[str], batch_size: int) -> np.ndarray:
    return model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True)


def classifier_signature(label_names: Sequence[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from embft.tracking.knn_classifier import score_column

    outputs = [ColSpec("long", "label"), ColSpec("string", "label_name")]
    outputs += [ColSpec("double", score_column(n)) for n in label_names]
    # MLflow checks the column and its type before predict(); KnnClassifier.predict refuses what
    # this cannot say (null, empty or whitespace-only texts, a number MLflow let through, > MAX_ROWS).
    return ModelSignature(inputs=Schema([ColSpec("string", "text", required=True)]), outputs=Schema(outputs))


def log_models(
    model_dir: Path,
    train: pd.DataFrame,
    label_names: Sequence[str],
    *,
    k: int,
    metric: str,
    support_per_class: Optional[int],
    seed: int,
    batch_size: int = 64,
    classifier: str = "knn",
) -> str:
    """Log `embedder` and `classifier` (kNN or logistic regression over the support set, `classifier`)
    into the active run; return the classifier's model URI."""
    import mlflow
    from mlflow.models import infer_signature
    from sentence_transformers import SentenceTransformer

    # On the CPU, where a served model usually runs: the support set's vectors are those it computes.
    embedder = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    example = INPUT_EXAMPLE["text"].tolist()
    mlflow.sentence_transformers.log_model(
        embedder,
        name="embedder",
        signature=infer_signature(example, embed(embedder, example, batch_size)),
        input_example=example,
        pip_requirements=_pins("sentence-transformers", "transformers", "torch"),
    )
    support = support_set(train, support_per_class, seed)
    missing = sorted(set(range(len(label_names))) - set(support["label"]))
    if missing:
        log.warning("The classifier's support set has no rows of label(s) %s: it never predicts them", missing)
    with tempfile.TemporaryDirectory() as tmp:
        support_file = Path(tmp) / "support.npz"
        np.savez(
            support_file,
            embeddings=embed(embedder, support["text"], batch_size),
            labels=support["label"].to_numpy(dtype=np.int64),
        )
        info = mlflow.pyfunc.log_model(
            name="classifier",
            python_model=str(Path(__file__).with_name("knn_classifier.py")),
            artifacts={"embedder": str(model_dir), "support": str(support_file)},
            model_config={
                "classifier": str(classifier),
                "k": int(k),
                "metric": str(metric),
                "label_names": list(label_names),
                "batch_size": int(batch_size),
            },
            signature=classifier_signature(label_names),
            input_example=INPUT_EXAMPLE,
            pip_requirements=_pins(
                "mlflow", "sentence-transformers", "transformers", "torch", "scikit-learn", "pandas", "numpy"
            ),
        )
    mlflow.set_tags({names.CLASSIFIER_URI: info.model_uri, names.SUPPORT_ROWS: str(len(support))})
    log.info(
        "Logged the embedder and the %s classifier (%d support rows): %s", classifier, len(support), info.model_uri
    )
    return info.model_uri


def _group_tags(run: Any) -> dict[str, str]:
    """The runs this one competes with for `best`: its Optuna study (all workers), else its sweep."""
    tags = run.data.tags
    if tags.get(names.OPTUNA_STUDY):
        return {names.OPTUNA_STUDY: tags[names.OPTUNA_STUDY]}
    if tags.get(names.SWEEP):
        return {names.SWEEP: tags[names.SWEEP]}
    return {}


def is_best_so_far(metric: str) -> bool:
    """For log_model=best: does the active run beat (or tie) every FINISHED run of its study or
    sweep on `metric`? The final best always does when it runs, so it always gets its model; an
    earlier leader logs too (a few extra models), which spares keeping every job's folder (on
    every worker's disk) until the sweep ends."""
    import mlflow

    client = mlflow.MlflowClient()
    run = client.get_run(mlflow.active_run().info.run_id)
    if metric not in run.data.metrics:
        log.warning("tracking.log_model=best: this run has no %s yet; logging its model anyway", metric)
        return True
    group = _group_tags(run)
    if not group:
        return True  # a single job is the best of its own
    others = [  # a pruned leader, or one without a validation score, never blocks a complete winner
        r
        for r in mlflow_runs.find_runs(run.info.experiment_id, {**group, names.ROLE: names.ROLE_FINETUNE})
        if r.info.run_id != run.info.run_id and mlflow_runs.eligible_for_best(r, metric)
    ]
    value = run.data.metrics[metric]
    return all(value >= r.data.metrics[metric] for r in others)


def log_job_models(model_dir: Path, splits: Any, cfg: Any) -> Optional[str]:
    """Called inside the job's run after its metrics are logged, before the model folder is removed.

    Returns the classifier's URI, or None when `tracking.log_model` says not to log."""
    from embft.tracking.registry import objective_metric

    mode = cfg.tracking.log_model
    mode = str(choice(LogModel, mode, "tracking.log_model"))
    if mode == "none":
        return None
    metric = objective_metric(cfg)
    if mode == "best" and not is_best_so_far(metric):
        log.info("Not logging the model: its %s trails a finished run of this sweep (tracking.log_model=best)", metric)
        return None
    return log_models(
        Path(model_dir),
        support_source(splits, cfg),
        splits.label_names,
        k=cfg.eval.k,
        metric=cfg.eval.metric,
        support_per_class=cfg.tracking.support_per_class,
        seed=cfg.eval.seed,
        batch_size=cfg.eval.batch_size,
        classifier=str(cfg.tracking.classifier),
    )


def served_scores(model_dir: Path, splits: Any, cfg: Any) -> dict[str, float]:
    """What each classifier `tracking.classifier` can log would score end to end on the job's validation and
    test rows: the embedder loaded as the served model loads it (CPU, the folder's own settings), texts cut
    as it cuts them, the same support set and the same fitted classifier code (knn_classifier.make_classifier).
    Metrics `served_accuracy_<kind>` and `val_served_accuracy_<kind>`."""
    from sentence_transformers import SentenceTransformer

    from embft.config import ServedClassifier
    from embft.evaluation.classification import eval_rows
    from embft.tracking.knn_classifier import TEXT_CHARS_PER_TOKEN, make_classifier, predict_labels

    embedder = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    max_chars = TEXT_CHARS_PER_TOKEN * (embedder.max_seq_length or 512)
    batch = cfg.eval.batch_size
    support = support_rows(splits, cfg)
    fitted = {
        kind.value: make_classifier(kind.value, cfg.eval.k, str(cfg.eval.metric)).fit(
            embed(embedder, support["text"], batch), support["label"].to_numpy()
        )
        for kind in ServedClassifier
    }
    out = {}
    for split, prefix in (("test", ""), ("validation", names.VALIDATION_PREFIX)):
        rows = eval_rows(splits, split, cfg.eval)
        vectors = embed(embedder, [t[:max_chars] for t in rows["text"]], batch)
        for kind, classifier in fitted.items():
            labels, _ = predict_labels(classifier, vectors, len(splits.label_names))
            out[prefix + names.served_accuracy(kind)] = float(np.mean(labels == rows["label"].to_numpy()))
    return out


# ---- embft predict -----------------------------------------------------------------------


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

    from embft.tracking.knn_classifier import MAX_ROWS, text_problem

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
