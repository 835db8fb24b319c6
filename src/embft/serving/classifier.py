"""The logged classifier: a fine-tuned embedder plus a kNN over a stored support set.

MLflow logs this file as "model from code" (`mlflow.pyfunc.log_model(python_model=<this file>)`):
it is copied into the model and run at load time, so it imports nothing from embft and a served
model needs only the libraries in its pip requirements, not this project.

Artifacts: `embedder` (a SentenceTransformer folder) and `support` (an .npz with the support
set's `embeddings` and `labels`). Model config: `k`, `metric`, `label_names`, `batch_size`.

Input (checked here, after MLflow's own check against the signature, which lets a null, a number
or a list through a `string` column): at most MAX_ROWS rows, each `text` a string with something
besides whitespace; anything else raises MlflowException(INVALID_PARAMETER_VALUE), which the
scoring server answers with HTTP 400 and this message. A text is cut to TEXT_CHARS_PER_TOKEN x the
encoder's max_seq_length characters before tokenizing: the encoder reads only its first
max_seq_length tokens anyway, and tokenizing all of a 1 MB text costs ~0.7 s and ~140 MB.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from typing import Any, Optional

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

MAX_ROWS = 1_000  # rows per predict call (one HTTP request); `embft predict` sends a file in chunks of this
TEXT_CHARS_PER_TOKEN = 100  # a WordPiece token covers at most 100 characters (BERT's max_input_chars_per_word)
_SHOWN = 5  # bad rows named in a message
SERVE_FILE = "embft_serve_backend.json"  # embft.encoding.export.SERVE_FILE
# lbfgs's budget: 100 (sklearn's default) can stop short of convergence on a large support set
LOGREG_MAX_ITER = 1_000


def score_column(name: str) -> str:
    return f"score_{name}"


def _problem(value: Any) -> Optional[str]:
    if isinstance(value, str):
        if not value:
            return "empty"
        return None if value.strip() else "whitespace only"
    if value is None or (np.ndim(value) == 0 and pd.isna(value)):
        return "null"
    kind = "a number" if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) else "not a string"
    return f"{kind} ({type(value).__name__})"


def input_problem(model_input: Any) -> Optional[str]:
    """What is wrong with a predict input, in one line (rows counted from 0), or None."""
    if not isinstance(model_input, pd.DataFrame) or "text" not in model_input.columns:
        return "the input needs a `text` column"
    if len(model_input) > MAX_ROWS:
        return f"{len(model_input)} rows in one request; at most {MAX_ROWS} (MAX_ROWS): send them in several"
    return text_problem(model_input["text"].tolist())


def text_problem(texts: list) -> Optional[str]:
    """Which texts are not a string with something besides whitespace (rows counted from 0), or None."""
    bad = [(i, why) for i, value in enumerate(texts) if (why := _problem(value))]
    if not bad:
        return None
    shown = ", ".join(f"row {i} is {why}" for i, why in bad[:_SHOWN])
    more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    return f"`text` must be a non-empty string; bad in {len(bad)} of {len(texts)} rows: {shown}{more}"


def make_classifier(kind: str, k: int, metric: str) -> Any:
    """The classifier fitted on embeddings, the one factory for every kNN and logreg figure: the served
    model's, the job's measurement of it (embft.evaluation.served) and the evaluation's (MTEB's
    evaluator_model, embft.evaluation.classification) are the same code."""
    if kind == "knn":  # brute force: the same neighbours as the study's evaluation (MTEB with this sklearn kNN)
        from sklearn.neighbors import KNeighborsClassifier

        return KNeighborsClassifier(n_neighbors=int(k), metric=metric, algorithm="brute")
    if kind == "logreg":  # lbfgs on the same embeddings fits the same coefficients at every load
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=LOGREG_MAX_ITER)
    raise ValueError(f"classifier {kind!r}: knn or logreg")


def predict_labels(classifier: Any, embeddings: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(label ids, scores by class id) of a fitted classifier; a class missing from the support set scores 0."""
    proba = classifier.predict_proba(embeddings)
    scores = np.zeros((len(embeddings), width))
    scores[:, classifier.classes_] = proba
    return classifier.classes_[proba.argmax(axis=1)], scores  # what predict returns, without a 2nd search


def serve_load_kwargs(folder: str) -> dict[str, Any]:
    """The backend the job exported the embedder for (SERVE_FILE in its folder, written by
    embft.encoding.export, whose serve_load_kwargs this repeats): loaded as exported, never re-exported."""
    spec_file = os.path.join(folder, SERVE_FILE)
    if not os.path.isfile(spec_file):
        return {}
    with open(spec_file) as fh:
        spec = json.load(fh)
    if spec["backend"] == "torch":
        return {}
    return {"backend": spec["backend"], "model_kwargs": {"file_name": spec["file_name"]}}


class KnnClassifier(PythonModel):
    """predict(frame with `text`) -> `label` (id), `label_name`, and `score_<name>` per class: kNN (the share
    of the k nearest support texts in that class) or logistic regression (model config `classifier`)."""

    def load_context(self, context) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never ask the Hub
        from sentence_transformers import SentenceTransformer

        config = context.model_config
        self.label_names = list(config["label_names"])
        self.batch_size = int(config.get("batch_size", 64))
        folder = context.artifacts["embedder"]
        kwargs = serve_load_kwargs(folder)
        self.embedder = SentenceTransformer(folder, local_files_only=True, **kwargs)
        # optimum-intel's OpenVINO model holds one infer request: concurrent calls (the scoring server's
        # threads) fail with "Infer Request is busy", so they take turns; torch and ONNX Runtime run concurrently.
        self.encode_lock = threading.Lock() if kwargs.get("backend") == "openvino" else contextlib.nullcontext()
        length = self.embedder.max_seq_length  # a static model (math.inf) reads every token: cut as at 512
        self.max_chars = TEXT_CHARS_PER_TOKEN * (length if isinstance(length, int) and length else 512)
        support = np.load(context.artifacts["support"])
        from threadpoolctl import ThreadpoolController  # scikit-learn's own dependency

        self.blas = ThreadpoolController()  # scans the loaded libraries once; limit() per call is ~15 us
        self.classifier = make_classifier(config.get("classifier", "knn"), config["k"], config["metric"])
        self.classifier.fit(support["embeddings"], support["labels"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        problem = input_problem(model_input)
        if problem:
            raise MlflowException.invalid_parameter_value(problem)
        texts = [text[: self.max_chars] for text in model_input["text"].tolist()]
        width = len(self.label_names)
        if not texts:
            return pd.DataFrame(
                {
                    "label": pd.Series(dtype="int64"),
                    "label_name": pd.Series(dtype="str"),
                    **{score_column(n): pd.Series(dtype="float64") for n in self.label_names},
                }
            )
        with self.encode_lock:
            embeddings = self.embedder.encode(texts, batch_size=self.batch_size, convert_to_numpy=True)
        # One BLAS thread for the few-row distance product: on a large support set OpenBLAS runs it on two
        # threads, which then spin and starve torch's next call on 2 cores (measured in docs/performance.md).
        with self.blas.limit(limits=1, user_api="blas"):
            labels, scores = predict_labels(self.classifier, embeddings, width)
        out = pd.DataFrame({"label": labels.astype("int64"), "label_name": [self.label_names[i] for i in labels]})
        for i, name in enumerate(self.label_names):
            out[score_column(name)] = scores[:, i]
        return out


mlflow.models.set_model(KnnClassifier())
