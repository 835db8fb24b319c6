"""What the console shows: embft's own lines, libraries only at WARNING and above."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Keep the log about what embft does: libraries speak at WARNING and above."""
    for name in ("FlagEmbedding", "mteb", "sentence_transformers", "datasets", "transformers", "filelock", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("FlagEmbedding.abc.finetune.embedder.AbsRunner").setLevel(logging.ERROR)  # per-rank banner
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per logged model file
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*|.*`max_length` is ignored.*")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()  # FlagEmbedding's JSON loading; training and encoding keep theirs
