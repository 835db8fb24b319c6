"""The Model Registry: a sweep's or a search's best classifier under a name, alias `champion`.

At the end of a sweep (SweepSummary.on_multirun_end) the best fine-tuned run of the sweep (of the
Optuna study, for a search: all its workers) by the objective is registered as a new version of
`tracking.registered_model_name`, tagged with its study, trial and score. The alias `champion`
moves to it only when it beats the current champion on the same metric; older versions stay.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from embft import names
from embft.errors import EmbftError
from embft.tracking import mlflow_runs

log = logging.getLogger(__name__)


def objective_metric(config: Any) -> str:
    """The metric the job returns to a sweeper: `val_accuracy_cosine` unless eval.objective=test says
    otherwise (a config without the key chooses on validation too: never on test by default)."""
    from omegaconf import OmegaConf

    metric = names.score_metric(str(config.eval.method), str(config.eval.metric))  # evaluation's metric_name
    objective = OmegaConf.select(config, "eval.objective", default="validation")
    return metric if str(objective) == "test" else names.validation(metric)


# ---- The one "best run" rule: who competes (competitors), the best among them (best_run), and whether
# a run leads so far (is_best_so_far, for tracking.log_model=best). A filter on who competes goes here.


def group_of(run: Any) -> dict[str, str]:
    """The runs `run` competes with for `best`: those of its Optuna study (all workers), else of its sweep
    ({} alone), scored as it was (the same embft.scoring_id: the same rows of the same data, evaluated
    alike, at the same label budget; embft.evaluation.scoring_id)."""
    tags = run.data.tags
    if tags.get(names.OPTUNA_STUDY):
        group = {names.OPTUNA_STUDY: tags[names.OPTUNA_STUDY]}
    elif tags.get(names.SWEEP):
        group = {names.SWEEP: tags[names.SWEEP]}
    else:
        return {}
    if tags.get(names.SCORING_ID):  # runs logged before the tag existed compete as before, among themselves
        group[names.SCORING_ID] = tags[names.SCORING_ID]
    return group


def champion_groups(experiment_id: str, group: dict[str, str], metric: str, name: str) -> list[tuple[dict, str]]:
    """(group, registered model name) for each champion a study or sweep gets: one under `name` when its
    runs share a scoring identity; one per dataset, `<name>-<dataset>`, when they span several datasets;
    none for a dataset whose runs were scored several ways (one line says which parts differ)."""
    runs = competitors(experiment_id, group, metric)
    scored = [r for r in runs if r.data.tags.get(names.SCORING_ID)]
    if scored and len(scored) < len(runs):
        log.info(
            "Registry: %d run(s) logged before embft tagged %s are left out of the choice",
            len(runs) - len(scored),
            names.SCORING_ID,
        )
    ids = {r.data.tags[names.SCORING_ID] for r in scored}
    if len(ids) <= 1:
        return [({**group, names.SCORING_ID: ids.pop()} if ids else group, name)]
    by_dataset: dict[str, list[Any]] = {}
    for r in scored:
        by_dataset.setdefault(r.data.tags.get(names.scoring_part("dataset"), "?"), []).append(r)
    out = []
    for dataset, same_data in sorted(by_dataset.items()):
        ids = {r.data.tags[names.SCORING_ID] for r in same_data}
        if len(ids) == 1:
            out.append(({**group, names.SCORING_ID: ids.pop()}, f"{name}-{dataset}"))
            continue
        differ = sorted(
            k[len(names.SCORING_PREFIX) :]
            for k in {k for r in same_data for k in r.data.tags if k.startswith(names.SCORING_PREFIX)}
            if len({r.data.tags.get(k) for r in same_data}) > 1
        )
        log.warning(
            "Registry: no champion for %s: its runs were scored %d ways (%s differ), so their scores do not "
            "compare; sweep one value of those settings to get one",
            dataset,
            len(ids),
            ", ".join(differ) or names.SCORING_ID,
        )
    return out


def competitors(experiment_id: str, group: dict[str, str], metric: str) -> list[Any]:
    """The group's fine-tuned runs that may be chosen by `metric`: pruned runs and runs without a
    validation score never compete (mlflow_runs.eligible_for_best)."""
    return [
        r
        for r in mlflow_runs.find_runs(experiment_id, {**group, names.ROLE: names.ROLE_FINETUNE})
        if mlflow_runs.eligible_for_best(r, metric)
    ]


def is_best_so_far(run: Any, metric: str) -> bool:
    """Does `run` beat (or tie) every competitor of its study or sweep on `metric`? A run without the
    metric yet, or without a group, is the best of its own."""
    if metric not in run.data.metrics:
        return True
    group = group_of(run)
    if not group:
        return True
    value = run.data.metrics[metric]
    others = [r for r in competitors(run.info.experiment_id, group, metric) if r.info.run_id != run.info.run_id]
    return all(value >= r.data.metrics[metric] for r in others)


def best_run(experiment_id: str, group: dict[str, str], metric: str) -> Optional[Any]:
    """The group's best complete run by `metric` (of its competitors)."""
    runs = competitors(experiment_id, group, metric)
    # Of tied runs, one that logged a classifier (a run that took its twin's training logs none), then
    # the earliest: Optuna's best trial among equal values is the first one, and so is the champion.
    return max(
        runs,
        key=lambda r: (r.data.metrics[metric], names.CLASSIFIER_URI in r.data.tags, -r.info.start_time, r.info.run_id),
        default=None,
    )


def register_best(experiment_id: str, group: dict[str, str], study: str, name: str, metric: str) -> Optional[Any]:
    """Register the group's best run's classifier under `name`; move `champion` if it is better.

    Returns the ModelVersion, or None when the best run has no logged classifier."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    best = best_run(experiment_id, group, metric)
    if best is None:
        log.warning(
            "Registry: no complete run of %s has %s and a validation score (pruned runs never compete); "
            "nothing registered",
            study,
            metric,
        )
        return None
    uri = best.data.tags.get(names.CLASSIFIER_URI)
    if not uri:
        log.warning(
            "Registry: the best run %s of %s logged no classifier (tracking.log_model=none?); nothing registered",
            best.info.run_id,
            study,
        )
        return None
    score = best.data.metrics[metric]
    tags = {
        names.VERSION_STUDY: study,
        names.VERSION_TRIAL: best.data.tags.get(names.OPTUNA_TRIAL) or best.info.run_name,
        names.VERSION_METRIC: metric,
        names.VERSION_SCORE: repr(score),
        names.VERSION_RUN: best.info.run_id,
        **({names.SCORING_ID: best.data.tags[names.SCORING_ID]} if names.SCORING_ID in best.data.tags else {}),
    }
    # Several search workers end the same study: the first registers, the others find its version.
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{best.info.run_id}'")
    if existing:
        version = max(existing, key=lambda v: int(v.version))
    else:
        version = mlflow.register_model(uri, name, tags=tags)
        log.info(
            "Registered %s version %s: run %s, %s=%.4f (%s)",
            name,
            version.version,
            best.info.run_id,
            metric,
            score,
            study,
        )
    try:
        champion = client.get_model_version_by_alias(name, names.CHAMPION)
    except MlflowException:
        champion = None
    if champion is not None and champion.version == version.version:
        return version
    refused = serve_gate(best)
    if refused:  # registered, but never the champion
        log.warning("%s@%s: version %s is not made champion: %s", name, names.CHAMPION, version.version, refused)
        return version
    if champion is None or _beats(score, metric, champion, best.data.tags.get(names.SCORING_ID)):
        client.set_registered_model_alias(name, names.CHAMPION, version.version)
        log.info("%s@%s -> version %s (%s=%.4f)", name, names.CHAMPION, version.version, metric, score)
    else:
        log.info(
            "%s@%s stays at version %s (%s=%s); version %s scores %.4f",
            name,
            names.CHAMPION,
            champion.version,
            champion.tags.get(names.VERSION_METRIC),
            champion.tags.get(names.VERSION_SCORE),
            version.version,
            score,
        )
    return version


def serve_gate(run: Any) -> Optional[str]:
    """Why `run`'s served classifier may not be champion, or None: with its tracking.serve_backend (e.g. int8)
    it scores more than tracking.max_serve_accuracy_drop below the same classifier in torch fp32 on validation."""
    params, metrics = run.data.params, run.data.metrics
    kind = params.get("tracking.classifier", "knn")
    served = metrics.get(names.validation(names.served_accuracy(kind)))
    fp32 = metrics.get(names.validation(names.served_fp32_accuracy(kind)))
    if served is None or fp32 is None:  # runs logged before both were measured
        return None
    bound = float(params.get("tracking.max_serve_accuracy_drop", 0.005))
    if fp32 - served <= bound + 1e-12:
        return None
    return (
        f"served with tracking.serve_backend={params.get('tracking.serve_backend', '?')} it scores {served:.4f} on "
        f"validation, {fp32 - served:.4f} below torch fp32 ({fp32:.4f}), more than tracking.max_serve_accuracy_drop="
        f"{bound:g}; serve it with a backend within the bound (torch, onnx) or raise the bound"
    )


def _beats(score: float, metric: str, champion: Any, scoring: Optional[str] = None) -> bool:
    if scoring and champion.tags.get(names.SCORING_ID) not in (None, scoring):
        log.warning(
            "Registry: the champion (version %s) was scored otherwise (%s %s, not %s): the scores do not "
            "compare; the newer study takes the alias",
            champion.version,
            names.SCORING_ID,
            champion.tags.get(names.SCORING_ID),
            scoring,
        )
        return True
    if champion.tags.get(names.VERSION_METRIC) != metric or names.VERSION_SCORE not in champion.tags:
        # Another objective (e.g. test accuracy before the validation split): not comparable.
        log.warning(
            "Registry: the champion (version %s) was chosen by %s, not %s; the newer study takes the alias",
            champion.version,
            champion.tags.get(names.VERSION_METRIC),
            metric,
        )
        return True
    return score > float(champion.tags[names.VERSION_SCORE])


def register_sweep_best(config: Any, experiment_id: str, sweep: str, metric: Optional[str] = None) -> Optional[Any]:
    """The hook for SweepSummary.on_multirun_end: register the sweep's (or study's) best run."""
    from mlflow.exceptions import MlflowException
    from omegaconf import OmegaConf

    name = config.tracking.registered_model_name
    if config.tracking.log_model == "none" or not name:
        return None
    study = OmegaConf.select(config, "hydra.sweeper.study_name", default=None)
    group = {names.OPTUNA_STUDY: str(study)} if study else {names.SWEEP: sweep}
    metric = metric or objective_metric(config)
    versions = []
    try:
        for scored_alike, registered in champion_groups(experiment_id, group, metric, name):
            versions.append(register_best(experiment_id, scored_alike, str(study or sweep), registered, metric))
    except MlflowException as err:
        raise EmbftError(f"Registry: registering the best run of {study or sweep} as {name} failed: {err}") from err
    return versions[0] if len(versions) == 1 else None  # several: one per dataset, each under its own name
