"""A job's identity: the config hash that skipping a finished job, twins and "running elsewhere" match on.

The settings that decide a result, as the job's backend reads them:
- switches and locations never enter (NEVER_HASHED): where things go, whether the model folder is kept
  or a twin's training may be taken, force, debug, what a search is told;
- a backend's own settings (config.BACKEND_SETTINGS, e.g. FlagEmbedding's variant and group size) enter
  only for that backend, so `variant=` cannot make a supcon job another job;
- data.local_dir enters as the content fingerprint of the split files it holds, so one folder under
  two spellings (or two machines' mounts) is one job;
- of `tracking` (where runs go, what is logged), only the settings that change the served scores a run
  logs (SCORED_TRACKING: the served backend, the deployed classifiers' support set), off their defaults;
- the keys of the schema every store was hashed with (FIRST_KEYS, frozen) enter as they are, and a key
  added since only where it differs from the schema's default: a new key never needs a list entry, and
  rerunning an older study's command still finds its finished jobs.
Stores hashed by earlier rules stay findable: `legacy_hash` is what embft 0a42dc7 gave the same config and
`unsupported_hash` what the rule before the support set entered gave it; the app's finished-run lookup asks
for each, and takes a run only where its logged support-set settings are the job's (`same_served_settings`):
migration computed per job, no table to keep.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import metadata
from typing import Any, Optional

from embft.config import (
    BACKEND_SETTINGS,
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrackingConfig,
    TrainConfig,
    VariantConfig,
)

GROUPS = {"model": ModelConfig, "data": DataConfig, "variant": VariantConfig, "train": TrainConfig, "eval": EvalConfig}
# Never part of a job's identity: locations, bookkeeping and switches that cannot change a score.
NEVER_HASHED = frozenset(
    {"paths", "tracking", "optuna", "force", "debug", "objectives", "data.root", "train.reuse_twin"}
)
# Hashed at one value whatever it is set to, the value the studies' stores were hashed with (every
# conf/experiment/ file sets keep_model: false); a job hashed with the other value is found by legacy_hash.
HASHED_AT = {"train.keep_model": False}
# The schema's keys when stores were first hashed as a whole (embft 0a42dc7, less the keys that were
# already neutral then). Frozen: a key added later enters only off its default (see module doc).
FIRST_KEYS = frozenset(
    {"name"}
    | {f"model.{k}" for k in ("name", "name_or_path", "revision", "package", "pooling", "normalize")}
    | {"model.query_instruction"}
    | {
        f"data.{k}"
        for k in (
            "name",
            "hub_path",
            "hub_revision",
            "local_dir",
            "text_column",
            "label_column",
            "label_names",
            "train_split",
            "test_split",
            "validation",
            "validation_split",
            "seed",
            "pairing",
            "max_empty_fraction",
        )
    }
    | {f"variant.{k}" for k in ("name", "same_dataset_within_batch", "no_in_batch_neg")}
    | {
        f"train.{k}"
        for k in (
            "train_group_size",
            "temperature",
            "learning_rate",
            "num_train_epochs",
            "per_device_train_batch_size",
            "same_dataset_batch_size",
            "loss",
            "query_max_len",
            "passage_max_len",
            "pad_to_multiple_of",
            "warmup_ratio",
            "seed",
            "max_train_queries",
            "logging_steps",
            "precision",
            "device",
            "keep_model",
        )
    }
    | {
        f"eval.{k}"
        for k in (
            "name",
            "method",
            "k",
            "metric",
            "samples_per_label",
            "n_experiments",
            "max_test_rows",
            "max_validation_rows",
            "max_seq_length",
            "batch_size",
            "seed",
            "objective",
        )
    }
)


def _default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            value = f.default
            return getattr(value, "value", value)  # a StrEnum as its string, as resolved configs hold it
    return dataclasses.MISSING  # not in the schema (e.g. a top-level extra): always hashed


def owned_elsewhere(key: str, backend: str) -> bool:
    """A setting only another backend reads."""
    return any(key in settings for owner, settings in BACKEND_SETTINGS.items() if owner != backend)


def _digest(chosen: dict) -> str:
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Settings of `tracking` the served scores depend on (a run logs its deployed classifiers' accuracy):
# hashed where they differ from TrackingConfig's defaults, so every hash written at the defaults holds.
SCORED_TRACKING = ("serve_backend", "support_per_class", "support_from_training")


def _scored_tracking(resolved: dict, keys: tuple[str, ...] = SCORED_TRACKING) -> dict[str, Any]:
    tracking = resolved.get("tracking") or {}
    return {k: tracking[k] for k in keys if k in tracking and tracking[k] != _default(TrackingConfig, k)}


def same_served_settings(params: dict[str, Any], logged_params: dict[str, str]) -> bool:
    """Did a stored run (its logged params) score its served classifiers with these settings (a job's
    flattened params)? For runs found by a hash that did not hold them; a param a run lacks was at its default."""
    for key in SCORED_TRACKING:
        default = _default(TrackingConfig, key)
        if str(params.get(f"tracking.{key}", default)) != logged_params.get(f"tracking.{key}", str(default)):
            return False
    return True


def config_hash(resolved: dict, data_fingerprint: Optional[str] = None) -> str:
    """The job's identity (module doc). `data_fingerprint`: the content of data.local_dir's split files
    (embft.data.folder_fingerprint), in place of the path as typed."""
    return _hash(resolved, data_fingerprint, SCORED_TRACKING)


def unsupported_hash(resolved: dict, data_fingerprint: Optional[str] = None) -> str:
    """What config_hash gave before the support set entered it (only tracking.serve_backend did): the
    hash of stores written then, taken only with same_served_settings."""
    return _hash(resolved, data_fingerprint, ("serve_backend",))


def _hash(resolved: dict, data_fingerprint: Optional[str], scored_tracking: tuple[str, ...]) -> str:
    backend = str((resolved.get("train") or {}).get("backend", "flagembedding"))
    chosen: dict[str, Any] = {}
    for top, value in resolved.items():
        if top in NEVER_HASHED:
            continue
        if not isinstance(value, dict):
            if top in FIRST_KEYS or value != _default(Config, top):  # extras (not in the schema) always
                chosen[top] = value
            continue
        cls = GROUPS.get(top)
        group = {}
        for key, v in value.items():
            dotted = f"{top}.{key}"
            if dotted in NEVER_HASHED or owned_elsewhere(dotted, backend):
                continue
            v = HASHED_AT.get(dotted, v)
            if dotted == "data.local_dir" and v and data_fingerprint:
                v = f"content:{data_fingerprint}"
            if dotted in FIRST_KEYS or cls is None or v != _default(cls, key):
                group[key] = v
        if group:
            chosen[top] = group
    tracking = _scored_tracking(resolved, scored_tracking)
    if tracking:
        chosen["tracking"] = {k: str(v) for k, v in tracking.items()}
    return _digest(chosen)


def twin_key(resolved: dict, data_fingerprint: Optional[str] = None) -> str:
    """config_hash with the variant reduced to its batching mode, for a job whose no_in_batch_neg
    suffix cannot change training (embft.training.flagembedding.runner.inert_suffix_reason); FlagEmbedding's
    version is in it because that argument is about its code."""
    variant = {"same_dataset_within_batch": resolved["variant"]["same_dataset_within_batch"]}
    reduced = {**resolved, "variant": variant, "FlagEmbedding": metadata.version("FlagEmbedding")}
    return config_hash(reduced, data_fingerprint)


# ------------------------------------------------------------------------------- the earlier rule

# What embft 0a42dc7 hashed: everything but these top-level keys and data.root, and these keys at
# these values (then added "neutral" one by one). Frozen: it describes stores already written.
_LEGACY_LOCATIONS = ("paths", "tracking", "optuna", "force", "debug", "objectives")
_LEGACY_NEUTRAL = {
    ("train", "backend"): "flagembedding",
    ("train", "nproc_per_node"): 1,
    ("train", "negatives_cross_device"): False,
    ("train", "reuse_twin"): True,
    ("train", "margin"): None,
    ("eval", "every_steps"): None,
    ("eval", "also"): [],
    ("data", "folder"): None,
    ("data", "hub_label_column"): None,
    ("eval", "precision"): "fp32",
    ("eval", "backend"): "torch",
}


def legacy_hash(resolved: dict) -> Optional[str]:
    """The hash embft 0a42dc7 gave this config (data.local_dir as typed, keep_model and reuse_twin as
    set), or None where the config uses a key that code did not have (no store can hold it)."""
    chosen: dict[str, Any] = {}
    for top, value in resolved.items():
        if top in _LEGACY_LOCATIONS:
            continue
        if not isinstance(value, dict):
            if top in FIRST_KEYS or _default(Config, top) is dataclasses.MISSING:
                chosen[top] = value
            elif value != _default(Config, top):
                return None
            continue
        group = {}
        for key, v in value.items():
            if (top, key) == ("data", "root"):
                continue
            if (top, key) in _LEGACY_NEUTRAL:
                if v != _LEGACY_NEUTRAL[(top, key)]:
                    group[key] = v
                continue
            if f"{top}.{key}" not in FIRST_KEYS and top in GROUPS:
                if v != _default(GROUPS[top], key):
                    return None  # a setting that code could not run
                continue
            group[key] = v
        chosen[top] = group
    return _digest(chosen)
