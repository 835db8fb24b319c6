"""``optimization_results.yaml``: the official plugin's keys (``name``, ``best_params``/``best_value``,
or ``solutions`` for several objectives) plus embft's (counts, overrides that rerun the best trial)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import optuna
from hydra.core.utils import JobReturn
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

from embft.sweeping.storage import retried_trial_numbers

from ._search_space import SearchSpace, format_value

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- objective values


def _as_float(value: Any) -> Optional[float]:
    if value is None or isinstance(value, (bool, str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


PRUNED = "pruned"  # objective_values' reason for a job that raised or returned TrialPruned


def objective_values(ret: JobReturn, n_objectives: int) -> tuple[Optional[list[float]], str]:
    """The job's objective value(s), or ``None`` and the reason the trial did not complete
    (:data:`PRUNED` for a job that raised or returned ``optuna.TrialPruned``)."""
    try:
        value = ret.return_value  # re-raises the job's exception
    except optuna.TrialPruned:
        return None, PRUNED
    except Exception as e:
        return None, f"job raised {type(e).__name__}: {e}"
    if isinstance(value, optuna.TrialPruned):
        return None, PRUNED
    if n_objectives == 1:
        raw: Sequence[Any] = [value]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        raw = value
    else:
        return None, f"expected {n_objectives} objective values, job returned {value!r}"
    if len(raw) != n_objectives:
        return None, f"expected {n_objectives} objective values, job returned {value!r}"
    values = [_as_float(v) for v in raw]
    if any(v is None for v in values):
        return None, f"job returned a non-number: {value!r}"
    if any(math.isnan(v) for v in values):  # type: ignore[arg-type]
        return None, f"job returned NaN: {value!r}"
    return values, ""  # type: ignore[return-value]


def trial_overrides(trial: FrozenTrial, space: SearchSpace) -> list[str]:
    recorded = trial.user_attrs.get("overrides")
    if recorded is not None:
        return list(recorded)
    try:  # e.g. a trial added to the study outside this sweeper
        return space.overrides(trial.params)
    except (KeyError, ValueError, IndexError):
        return [f"{k}={format_value(v)}" for k, v in trial.params.items()]


def study_results(
    study: optuna.Study,
    space: SearchSpace,
    *,
    directions: Sequence[str],
    storage: Optional[str],
    n_trials: int,
    pruner: Optional[Mapping[str, Any]],
    metric_names: Optional[Sequence[str]],
) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    results: dict[str, Any] = {
        "name": "optuna",
        "study_name": study.study_name,
        "storage": storage,
        "direction": directions[0] if len(directions) == 1 else list(directions),
        "n_trials": n_trials,
        "n_complete": len(complete),
        "n_failed": sum(t.state == TrialState.FAIL for t in trials),
        "n_pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "n_retried": len(retried_trial_numbers(trials)),
        "pruner": None if pruner is None else dict(pruner),
    }
    if metric_names is not None:
        results["metric_names"] = list(metric_names)
    if len(directions) == 1:
        best = study.best_trial if complete else None
        results.update(
            best_value=None if best is None else best.value,
            best_params=None if best is None else dict(best.params),
            best_trial_number=None if best is None else best.number,
            best_overrides=None if best is None else trial_overrides(best, space),
        )
    else:
        front = study.best_trials if complete else []
        # `solutions`: the official plugin's Pareto front; `best_trials`: embft's, with what reruns each.
        results["solutions"] = [{"params": dict(t.params), "values": list(t.values)} for t in front]
        results["best_trials"] = [
            {
                "number": t.number,
                "values": list(t.values),
                "params": dict(t.params),
                "overrides": trial_overrides(t, space),
            }
            for t in front
        ]
    return results


def write_results(results: Mapping[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    OmegaConf.save(OmegaConf.create(dict(results)), tmp)
    os.replace(tmp, path)  # readers never see a half-written file


def log_summary(results: Mapping[str, Any], results_path: Path) -> None:
    if results["n_complete"] == 0:
        log.warning("Study '%s' has no completed trial", results["study_name"])
    elif "best_value" in results:
        log.info("Best parameters: %s", results["best_params"])
        log.info(
            "Best value %s (trial %d): %s",
            results["best_value"],
            results["best_trial_number"],
            " ".join(results["best_overrides"]),
        )
    else:
        log.info("Number of Pareto solutions: %d", len(results["solutions"]))
        for solution in results["solutions"]:
            log.info("    Values: %s, Params: %s", solution["values"], solution["params"])
    log.info("Results written to %s", results_path)
