"""Every MLflow name embft writes or reads: tags, metric names, the sweep id.

The one place to rename a tag or a metric; tracking, the app and the report import from here.
"""

from __future__ import annotations

from pathlib import Path

# Tags
ROLE = "embft.role"  # "finetune" | "baseline"
SWEEP = "embft.sweep"  # the multirun folder "<name>/<timestamp>", shared by the jobs of one sweep
CONFIG_HASH = "embft.config_hash"  # hash of the settings that decide a result (resume/skip)
BASELINE_KEY = "embft.baseline_key"  # model + data + eval settings of the untrained model's score
TWIN_KEY = "embft.twin_key"  # the config hash with an inert no_in_batch_neg suffix left out
TRAINED_AS = "embft.trained_as"  # on a run that took its twin's training: the run that trained
TWIN_REASON = "embft.twin_reason"  # why the suffix could not change that training
ARM = "embft.arm"  # the recipe of conf/arm/ a job was run with (Hydra's choice of `arm`), where it named one
# What a run's scores were measured on (embft.evaluation.scoring_id): "best" compares only runs sharing it.
SCORING_ID = "embft.scoring_id"
SCORING_PREFIX = "embft.scoring."  # its parts: embft.scoring.dataset, .validation_rows, .budget, ...
RECORDS_DIR = "records_dir"
MODEL_DIR = "model_dir"
PRECISION, DEVICE = "precision", "device"
ERROR = "error"
GIT_COMMIT = "git_commit"
OPTUNA_STUDY = "optuna.study_name"
OPTUNA_TRIAL = "optuna.trial_number"
OPTUNA_BEST = "optuna.best_trial"
OPTUNA_PARETO = "optuna.pareto"
OPTUNA_PRUNED, OPTUNA_PRUNED_STEP = "optuna.pruned", "optuna.pruned_step"
OPTUNA_STORAGE = "optuna.storage"  # on a study's parent run: where the study lives (password masked)
PARENT_KEY = "embft.parent_key"  # on a parent run: "study:<study name>" or "sweep:<sweep id>"
PARENT_RUN = "mlflow.parentRunId"  # MLflow's own nesting tag (what start_run(parent_run_id=) sets)

CLASSIFIER_URI = "embft.classifier_uri"  # the logged kNN classifier's models:/m-... URI
SUPPORT_ROWS = "embft.support_rows"  # texts in the classifier's kNN support set

ROLE_FINETUNE, ROLE_BASELINE = "finetune", "baseline"
ROLE_STUDY, ROLE_SWEEP = "study", "sweep"  # parent runs of an Optuna study / a grid sweep
# Liveness: where a job runs and its heartbeat (epoch seconds), refreshed while it is alive.
HEARTBEAT, HOST, PID, PID_NS = "embft.heartbeat", "embft.host", "embft.pid", "embft.pid_ns"
CLAIM = "embft.claim"  # "pending" while a new run checks for a live twin, "won" once it goes ahead
BACKED_OFF = "embft.backed_off_to"  # on a deleted claim: the live run that had the config

# Model Registry: the alias of a study's best model, and its version's tags
CHAMPION = "champion"
VERSION_STUDY, VERSION_TRIAL = "embft.study", "embft.trial"
VERSION_METRIC, VERSION_SCORE, VERSION_RUN = "embft.metric", "embft.score", "embft.run_id"

# Artifacts
CONFIG_ARTIFACT = "config.yaml"
DATA_NOTES_ARTIFACT = "data_notes.json"
SCORES_ARTIFACT = "mteb_scores.json"
ERROR_ARTIFACT = "error.txt"

# Metrics that do not depend on the evaluation method
TRAIN_LOSS = "train_loss"
TRAIN_SECONDS = "train_seconds"
TRAIN_QUERIES = "train_queries"
TRAIN_QPS = "train_queries_per_second"
EFFECTIVE_BATCH_SIZE = "effective_batch_size"
EVAL_SECONDS = "eval_seconds"
TRAIN_LABELLED_TEXTS = "train_labelled_texts"  # distinct labelled texts training read: the labelling cost
TRAIN_PER_CLASS = "train_per_class"  # train.per_class: the label budget, texts of every class
CLASSES_PER_BATCH = "train_classes_per_batch"  # mean distinct classes per batch (label-grouped batches)
MIN_CLASSES_PER_BATCH = "train_min_classes_per_batch"
F1 = "f1"

VALIDATION_PREFIX = "val_"
# Scores of the model while it trains (eval.every_steps), by step. Their own name: MLflow shows a
# metric's value at its highest step, so live scores under the final score's name would hide it.
LIVE_PREFIX = "live_"
LIVE_ENCODING = "embft.live_encoding"  # how live scores encode, e.g. "bf16 torch, 256 tokens" (never ONNX)


def score_metric(method: str, metric: str = "cosine") -> str:
    """`accuracy_cosine` for the study's kNN (the name says the distance), `accuracy_logreg` otherwise."""
    return f"accuracy_{metric}" if method == "knn" else f"accuracy_{method}"


def served_accuracy(classifier: str) -> str:
    """The logged classifier's end-to-end accuracy (tuned embedder + `classifier` over the support set):
    `served_accuracy_knn`, `served_accuracy_logreg`."""
    return f"served_accuracy_{classifier}"


def served_fp32_accuracy(classifier: str) -> str:
    """The same classifier end to end with the embedder in torch fp32, beside `served_accuracy_*` (which is
    measured with tracking.serve_backend): `served_fp32_accuracy_knn`."""
    return f"served_fp32_accuracy_{classifier}"


# The served classifier's texts per second, in-process with the served code on fixed validation texts:
# one text per predict call, and SERVE_BATCH texts per call.
SERVE_BATCH = 64
SERVE_TPS_ONE, SERVE_TPS_BATCH = "serve_texts_per_second_1", f"serve_texts_per_second_{SERVE_BATCH}"
SERVE_BACKEND = "embft.serve_backend"  # tag: what runs the served embedder (tracking.serve_backend, resolved)


def head_accuracy(head: str) -> str:
    """A classifier a backend trains itself, scored end to end: `setfit_head_accuracy`."""
    return f"{head}_accuracy"


def validation(metric: str) -> str:
    """The same score on the validation split: `val_accuracy_cosine`."""
    return f"{VALIDATION_PREFIX}{metric}"


def scoring_part(part: str) -> str:
    """The tag of one part of the scoring identity: `embft.scoring.dataset`."""
    return f"{SCORING_PREFIX}{part}"


def live(metric: str) -> str:
    """The score of the model while it trains, logged by step: `live_val_accuracy_cosine`."""
    return f"{LIVE_PREFIX}{metric}"


def std(metric: str) -> str:
    return f"{metric}_std"


def baseline(metric: str) -> str:
    return f"baseline_{metric}"


def delta(metric: str) -> str:
    return f"delta_{metric}"


def sweep_id(sweep_dir: str | Path) -> str:
    """The `embft.sweep` tag of a multirun: its folder's last two parts (`<name>/<timestamp>`)."""
    path = Path(sweep_dir)
    return f"{path.parent.name}/{path.name}"


# Per-class metrics (eval.method's classifier): macro-F1 beside accuracy, named for imbalanced data.
F1_MACRO = "f1_macro"


def f1_macro(metric: str, primary: bool = True) -> str:
    """Macro-F1 beside an accuracy: `f1_macro` for the job's classifier, `f1_macro_logreg` beside
    eval.also's `accuracy_logreg`."""
    return F1_MACRO if primary else f"{F1_MACRO}_{metric.removeprefix('accuracy_')}"


# The sweeper's results file in a sweep folder (the official hydra-optuna-sweeper's name); the core reads it.
RESULTS_FILE = "optimization_results.yaml"
