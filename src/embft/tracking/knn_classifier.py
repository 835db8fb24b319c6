"""The logged classifier: a fine-tuned embedder plus a kNN over a stored support set.

MLflow logs this file as "model from code" (`mlflow.pyfunc.log_model(python_model=<this file>)`):
it is copied into the model and run at load time, so it imports nothing from embft and a served
model needs only the libraries in its pip requirements, not this project.

Artifacts: `embedder` (a SentenceTransformer folder) and `support` (an .npz with the support
set's `embeddings` and `labels`). Model config: `k`, `metric`, `label_names`, `batch_size`.
"""

from __future__ import annotations

import os

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


def score_column(name: str) -> str:
    return f"score_{name}"


class KnnClassifier(PythonModel):
    """predict(frame with `text`) -> `label` (id), `label_name`, and `score_<name>` per class:
    the share of the k nearest support texts in that class (sklearn's predict_proba)."""

    def load_context(self, context) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never ask the Hub
        from sentence_transformers import SentenceTransformer
        from sklearn.neighbors import KNeighborsClassifier

        config = context.model_config
        self.label_names = list(config["label_names"])
        self.batch_size = int(config.get("batch_size", 64))
        self.embedder = SentenceTransformer(context.artifacts["embedder"], local_files_only=True)
        support = np.load(context.artifacts["support"])
        # brute force: the same neighbours as the study's evaluation (MTEB with this sklearn kNN).
        self.knn = KNeighborsClassifier(n_neighbors=int(config["k"]), metric=config["metric"], algorithm="brute")
        self.knn.fit(support["embeddings"], support["labels"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        texts = model_input["text"].astype(str).tolist()
        width = len(self.label_names)
        if not texts:
            return pd.DataFrame(
                {
                    "label": pd.Series(dtype="int64"),
                    "label_name": pd.Series(dtype="str"),
                    **{score_column(n): pd.Series(dtype="float64") for n in self.label_names},
                }
            )
        embeddings = self.embedder.encode(texts, batch_size=self.batch_size, convert_to_numpy=True)
        proba = self.knn.predict_proba(embeddings)
        scores = np.zeros((len(texts), width))
        scores[:, self.knn.classes_] = proba  # a class missing from the support set scores 0
        labels = self.knn.classes_[proba.argmax(axis=1)]  # what knn.predict returns, without a 2nd search
        out = pd.DataFrame({"label": labels.astype("int64"), "label_name": [self.label_names[i] for i in labels]})
        for i, name in enumerate(self.label_names):
            out[score_column(name)] = scores[:, i]
        return out


mlflow.models.set_model(KnnClassifier())
