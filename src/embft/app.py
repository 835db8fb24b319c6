"""The Hydra app: one job = a list of stages (skip-if-done, data, baseline, prepare, train, evaluate, served classifiers, log)."""

from __future__ import annotations

import functools
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from embft import names
from embft.config import Config, check_backend_settings, check_values, register_configs, to_container
from embft.data import Splits, folder_fingerprint
from embft.encoding.encoders import EncodeSettings
from embft.errors import EmbftError
from embft.evaluation.classification import EvalResult, score_metrics
from embft.evaluation.scoring_id import scoring_tags
from embft.tracking import identity, mlflow_runs, study_runs, twins
from embft.tracking.sweep import FAILED_MARKER, SKIPPED_MARKER
from embft.training.base import Prepared, TrainContext, TrainResult

log = logging.getLogger("embft")
CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # shipped in the package: a wheel finds its configs too

register_configs()


@dataclass
class Job:
    """What every stage of one job needs to know."""

    cfg: Config
    params: dict[str, Any]
    config_hash: str
    metric: str  # the test score's name, e.g. accuracy_cosine; names.validation(metric) for validation
    experiment_id: str
    cache_dir: Path
    out_dir: Path
    device: str  # cpu | cuda, for training and for both encoders
    encode: EncodeSettings  # how both sides of the comparison are encoded (auto resolved)
    # Set where the variant's no_in_batch_neg suffix cannot change training (train.reuse_twin):
    # the hash shared with the twin variant, and why.
    trainer: Any = None  # the train.backend's Trainer (embft.training.base)
    twin_key: Optional[str] = None
    twin_reason: Optional[str] = None
    weights: Optional[str] = None  # the base model's weights fingerprint, once its folder is resolved
    # The hashes earlier rules gave this config where they differ (identity.legacy_hash, unsupported_hash):
    # their finished runs are this job's too, where scored with the same support set.
    legacy_hashes: tuple[str, ...] = ()

    @property
    def objective(self) -> str:
        """The metric a sweeper optimizes: the validation score unless eval.objective=test (the one rule,
        which the registry and log_model=best choose by too)."""
        from embft.tracking.registry import objective_metric

        return objective_metric(self.cfg)

    @property
    def model_id(self) -> dict[str, Any]:
        """The base model as cache keys see it (baseline scores, mined negatives)."""
        m = self.cfg.model
        return {
            "path": m.package or m.name_or_path,
            "revision": m.revision,
            "pooling": str(m.pooling),
            "normalize": m.normalize,
            "weights": self.weights,
        }

    @property
    def objectives(self) -> list[str]:
        """What the job returns, in order: `objectives` (a search's), else the one objective."""
        return [str(o.metric) for o in self.cfg.objectives] or [self.objective]

    def scored(self, run: Any) -> bool:
        """Does `run` hold every objective this job returns?"""
        return all(m in run.data.metrics for m in self.objectives)

    def returned(self, metrics: dict[str, float]) -> float | list[float]:
        return study_runs.objective_values(metrics, [{"metric": m} for m in self.objectives])


@dataclass
class JobResult:
    baseline: dict[str, EvalResult]  # by split: validation, test
    scores: dict[str, EvalResult]
    train: TrainResult
    eval_seconds: float
    served: dict[str, float] = field(default_factory=dict)  # the deployable classifiers, end to end (score_served)

    def metrics(self, metric: str) -> dict[str, float]:
        out: dict[str, float] = {}
        out.update(score_metrics(metric, self.scores, self.baseline))  # per split, every classifier
        t = self.train
        out.update(
            {
                names.TRAIN_SECONDS: t.seconds,
                names.TRAIN_QUERIES: t.n_queries,
                names.TRAIN_QPS: t.queries_per_second,
                names.EFFECTIVE_BATCH_SIZE: t.effective_batch_size,
                names.EVAL_SECONDS: self.eval_seconds,
                **({names.TRAIN_LABELLED_TEXTS: t.labelled_texts} if t.labelled_texts is not None else {}),
                **t.metrics,
                **self.served,
            }
        )
        return out


def _hydra_context() -> tuple[Optional[str], str]:
    """(sweep id or None, run name) from the Hydra runtime, when there is one."""
    if not HydraConfig.initialized():
        return None, "job"
    hc = HydraConfig.get()
    sweep = names.sweep_id(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    name = hc.job.override_dirname or "job"
    if len(name) > mlflow_runs.RUN_NAME_MAX:
        excluded = set(hc.job.config.override_dirname.exclude_keys)
        overrides = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") not in excluded]
        name = mlflow_runs.short_run_name(overrides)
    return sweep, name


def _lock(cache_dir: Path, name: str):
    from filelock import FileLock

    (cache_dir / "locks").mkdir(parents=True, exist_ok=True)
    return FileLock(str(cache_dir / "locks" / f"{name}.lock"))


# ------------------------------------------------------------------------------------------ stages


def start(cfg: Config) -> Job:
    """Check values and the backend's settings, make every `auto` concrete (so the hash and the params say
    what ran) and name the job (its config hash). Opens nothing: a refused job leaves no record."""
    from omegaconf import open_dict

    from embft.console import quiet_libraries
    from embft.encoding.encoders import pin_eval_settings
    from embft.encoding.export import check_serve_backend
    from embft.encoding.precision import pick_device, pick_precision
    from embft.evaluation.classification import metric_name
    from embft.training.base import load_trainer

    check_values(cfg)
    check_serve_backend(str(cfg.tracking.serve_backend))  # its packages, before any work
    trainer = load_trainer(cfg.train.backend)
    check_backend_settings(cfg, _hydra_overrides())
    trainer.check(cfg)  # before the store: a refused setting leaves no FAILED run behind
    quiet_libraries()
    device = pick_device(cfg.train.device)
    encode = pin_eval_settings(cfg, device)
    with open_dict(cfg):  # concrete, so a CPU run and a GPU run never share a config hash (skip, twins)
        cfg.train.device = device
        cfg.train.precision = pick_precision(cfg.train.precision, device)
        if cfg.train.per_class is not None:  # per_class wins: the params and the hash say what ran
            cfg.train.max_train_queries = None
        cfg.tracking.uri = mlflow_runs.store_uri(cfg.tracking.uri)
    resolved = to_container(cfg)
    resolved.pop("advise", None)  # the advise sweeper's settings (arms, budget, space): never a job's
    data_fingerprint = folder_fingerprint(cfg.data)  # data.local_dir by content: one folder, one job
    study_runs.mask_storage(resolved)  # the study URL's password stays out of MLflow
    resolved["tracking"]["uri"] = mlflow_runs.masked(resolved["tracking"]["uri"])
    test_metric = metric_name(cfg.eval)
    chosen_on_test = [o.metric for o in cfg.objectives if o.metric == test_metric]
    if chosen_on_test and cfg.eval.objective == "validation":
        raise EmbftError(
            f"objectives lists {test_metric}, the test score: choose on {names.validation(test_metric)} "
            "(the test split is for the final figure), or set eval.objective=test to allow it."
        )
    # Not under live validation scoring: a search's pruner wants each trial's own reports.
    reuse = cfg.train.reuse_twin and not (cfg.eval.every_steps or cfg.eval.live_evals)
    twin_reason = trainer.twin_reason(cfg) if reuse else None
    config_hash = identity.config_hash(resolved, data_fingerprint)
    earlier = (identity.legacy_hash(resolved), identity.unsupported_hash(resolved, data_fingerprint))
    return Job(
        cfg=cfg,
        # what this backend reads: another backend's settings are neither logged nor hashed
        params={
            k: v for k, v in mlflow_runs.flatten(resolved).items() if not identity.owned_elsewhere(k, cfg.train.backend)
        },
        config_hash=config_hash,
        metric=metric_name(cfg.eval),
        experiment_id="",  # open_store, once every input is checked
        cache_dir=Path(cfg.paths.cache_dir),
        out_dir=Path(cfg.paths.output_dir),
        device=device,
        encode=encode,
        trainer=trainer,
        twin_key=identity.twin_key(resolved, data_fingerprint) if twin_reason else None,
        twin_reason=twin_reason,
        legacy_hashes=tuple(dict.fromkeys(h for h in earlier if h and h != config_hash)),
    )


def _hydra_overrides() -> list[str]:
    """The job's own overrides (command line and sweep parameters); none outside a Hydra run."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def finished_run(job: Job) -> Optional[Any]:
    """The FINISHED run of this config that is this job's result, if any (force=true ignores them):
    found by its config hash or the hash an earlier embft gave the same config (job.legacy_hashes)."""
    if job.cfg.force:
        return None
    for config_hash in (job.config_hash, *job.legacy_hashes):
        done = mlflow_runs.find_runs(job.experiment_id, {names.CONFIG_HASH: config_hash})
        found = next((run for run in done if _reusable(job, run)), None)
        if found is not None:
            return found
    return None


def _reusable(job: Job, run: Any) -> bool:
    if not identity.same_served_settings(job.params, run.data.params):
        return False  # found by an earlier hash, its served scores measured with another support set
    if mlflow_runs.is_pruned(run):
        # A partial score: a result only for the study whose pruner stopped it (the pruner and optuna.*
        # are outside the hash, so another study, or none, drawing the point trains it).
        study = job.cfg.optuna.study_name
        return study is not None and run.data.tags.get(names.OPTUNA_STUDY) == study
    if not job.cfg.train.reuse_twin and names.TRAINED_AS in run.data.tags:
        return False  # it took a twin's training; train.reuse_twin=false asks for this job's own
    return job.scored(run)


def skip(job: Job, run: Any) -> float | list[float] | Any:
    log.info(
        "Skipping: run %s already FINISHED this config (%s=%s); force=true reruns it",
        run.info.run_id,
        names.CONFIG_HASH,
        job.config_hash,
    )
    job.out_dir.mkdir(parents=True, exist_ok=True)
    (job.out_dir / SKIPPED_MARKER).write_text(run.info.run_id)
    if mlflow_runs.is_pruned(run):
        import optuna

        return optuna.TrialPruned(f"pruned at step {run.data.tags.get(names.OPTUNA_PRUNED_STEP)}")
    return job.returned(run.data.metrics)


def run_tags(job: Job) -> tuple[str, dict[str, str]]:
    cfg = job.cfg
    sweep, run_name = _hydra_context()
    tags = {
        names.ROLE: names.ROLE_FINETUNE,
        names.CONFIG_HASH: job.config_hash,
        **({"variant": cfg.variant.name} if "variant.name" in job.params else {}),  # FlagEmbedding's
        "model": cfg.model.name,
        "data": cfg.data.name,
    }
    if sweep:
        tags[names.SWEEP] = sweep
    if cfg.optuna.study_name is not None:
        tags.update({names.OPTUNA_STUDY: cfg.optuna.study_name, names.OPTUNA_TRIAL: str(cfg.optuna.trial_number)})
    tags.update(study_runs.job_tags(job.experiment_id, cfg.optuna.study_name, sweep))  # nested under the parent
    if job.twin_key:
        tags[names.TWIN_KEY] = job.twin_key
    arm = HydraConfig.get().runtime.choices.get("arm") if HydraConfig.initialized() else None
    if arm:  # the recipe's name (conf/arm/<arm>.yaml): how a report names the configuration
        tags[names.ARM] = arm
    return run_name, tags


def load_inputs(job: Job) -> tuple[Splits, str]:
    """The data and the base model, read and checked before the store is opened, so a wrong path, a
    missing column, an unknown model or a batch larger than the data leaves no record: (splits, model folder)."""
    from embft.encoding.model_folder import resolve_model_path, weights_fingerprint
    from embft.evaluation.classification import check_support
    from embft.training.labelled import check_budget

    cfg = job.cfg
    splits = load_data(job)
    check_support(splits, cfg.eval, cfg.data.name)  # one line before minutes of encoding
    check_budget(cfg, splits)  # train.per_class: a class short of N rows (or of validation rows), named
    check_data = getattr(job.trainer, "check_data", None)  # optional in the Trainer interface
    if check_data is not None:
        check_data(cfg, splits)
    model_path = resolve_model_path(cfg.model)
    job.weights = weights_fingerprint(model_path)
    return splits, model_path


def open_store(job: Job) -> None:
    """Open the MLflow store (a server or database that is down fails in one line) and the experiment."""
    job.experiment_id = mlflow_runs.setup(job.cfg.tracking)


def load_data(job: Job) -> Splits:
    from embft.data import load_splits

    splits = load_splits(job.cfg.data)
    log.info(
        "Data %s: %d train, %d validation, %d test rows, %d classes",
        splits.source,
        len(splits.train),
        len(splits.validation),
        len(splits.test),
        len(splits.label_names),
    )
    return splits


def score_baseline(job: Job, splits: Splits, base_encoder) -> dict[str, EvalResult]:
    """The untrained model's scores on both splits: computed once per (model, data, eval settings), cached."""
    import mlflow

    from embft.evaluation.classification import baseline_key, cached_baseline, evaluate
    from embft.evaluation.per_class import log_class_artifacts

    cfg = job.cfg
    key = baseline_key(job.model_id, splits, cfg.eval, job.encode, job.device)
    with _lock(job.cache_dir, f"baseline-{key}"):
        baseline, _ = cached_baseline(
            job.cache_dir, key, lambda: evaluate(base_encoder(), splits, cfg.eval, cfg.data.name)
        )
        metrics = score_metrics(job.metric, baseline)
        params = {k: v for k, v in job.params.items() if k.split(".")[0] in ("model", "data", "eval")}
        mlflow_runs.ensure_baseline_run(
            job.experiment_id, key, metrics, {s: r.scores for s, r in baseline.items()}, params
        )
    mlflow.set_tag(names.BASELINE_KEY, key)
    log_class_artifacts(baseline, prefix="baseline_")
    log.info(
        "Baseline %s = %.4f (validation), %.4f (test)",
        job.metric,
        baseline["validation"].accuracy,
        baseline["test"].accuracy,
    )
    return baseline


def prepare(job: Job, ctx: TrainContext) -> Prepared:
    """The trainer's training data, from the train split only (it caches as it sees fit)."""
    import mlflow

    with _lock(job.cache_dir, f"prepare-{job.cfg.train.backend}"):
        prepared = job.trainer.prepare(ctx)
    mlflow.set_tags(prepared.tags)
    return prepared


def fine_tune(job: Job, ctx: TrainContext, prepared: Prepared):
    """Train; with eval.every_steps or eval.live_evals, score the live model on validation as it trains and
    report it to the Optuna trial, which may prune it. Returns (TrainResult, LiveTrainingCallback)."""
    import mlflow

    from embft.evaluation.classification import evaluate
    from embft.sweeping.trial_reporter import TrialReporter
    from embft.training.callbacks import LiveTrainingCallback

    cfg = job.cfg

    def score(step: int, model: Any) -> float:
        view = job.trainer.live_encoder(ctx, model)
        return evaluate(view, ctx.splits, cfg.eval, cfg.data.name, which=("validation",))["validation"].accuracy

    every = cfg.eval.every_steps or cfg.eval.live_evals
    if every:  # the evaluation's precision and length; torch even under eval.backend=onnx (common.live_view)
        mlflow.set_tag(names.LIVE_ENCODING, f"{job.encode.precision} torch, {job.encode.max_seq_length} tokens")
    live = LiveTrainingCallback(
        score if every else None,
        cfg.eval.every_steps,
        TrialReporter.from_config(cfg.optuna) if every else None,
        metric=names.live(names.validation(job.metric)),
        evals=cfg.eval.live_evals,
    )
    result = job.trainer.train(ctx, prepared, callbacks=(live,))
    result = replace(result, labelled_texts=prepared.labelled_texts)
    if cfg.train.per_class is not None:
        result = replace(result, metrics={**result.metrics, names.TRAIN_PER_CLASS: float(cfg.train.per_class)})
    mlflow.set_tags(result.tags)
    if live.eval_seconds:  # live scoring ran inside the Trainer's time: training alone is the rest
        seconds = result.seconds - live.eval_seconds
        result = replace(result, seconds=seconds, queries_per_second=result.n_queries / seconds)
    if not live.logged_loss:  # torchrun: the losses come back from rank 0 at the end
        mlflow_runs.log_series(names.TRAIN_LOSS, result.losses)
    return result, live


def score_tuned(job: Job, splits: Splits, trained: TrainResult, base_encoder) -> tuple[dict[str, EvalResult], float]:
    """The fine-tuned model's scores, encoded exactly as the baseline was (checked, not assumed)."""
    from embft.encoding import encoders
    from embft.evaluation.classification import evaluate

    start_time = time.perf_counter()
    cfg = job.cfg
    tuned = encoders.build_encoder(
        str(trained.model_dir), cfg.model.pooling, cfg.model.normalize, job.encode, job.device
    )
    base, this = encoders.describe_encoder(base_encoder()), encoders.describe_encoder(tuned)
    if not encoders.same_encoding(base, this):
        raise RuntimeError(f"the two sides of the comparison encode differently: baseline {base} vs tuned {this}")
    scores = evaluate(tuned, splits, job.cfg.eval, job.cfg.data.name)
    return scores, time.perf_counter() - start_time


def score_served(job: Job, splits: Splits, trained: TrainResult) -> dict[str, float]:
    """What a user would deploy, end to end on the same rows: the tuned embedder with each classifier
    tracking.classifier can log (kNN, logistic regression), and a head the backend trained itself (SetFit's).
    The folder is first exported for tracking.serve_backend (once, here), then scored with it and with torch
    fp32 beside it, and the served classifier's texts per second measured."""
    import mlflow

    from embft.encoding.export import export_for_serving
    from embft.evaluation.classification import eval_rows
    from embft.evaluation.served import serve_speed, served_scores
    from embft.serving.models import support_rows

    backend = str(job.cfg.tracking.serve_backend)
    export_for_serving(trained.model_dir, backend, support_rows(splits, job.cfg)["text"].tolist())
    mlflow.set_tag(names.SERVE_BACKEND, backend)
    scores = served_scores(trained.model_dir, splits, job.cfg)
    scores.update(serve_speed(trained.model_dir, splits, job.cfg))
    if trained.head is not None:
        for split, prefix in (("test", ""), ("validation", names.VALIDATION_PREFIX)):
            rows = eval_rows(splits, split, job.cfg.eval)
            predicted = trained.head(rows["text"].tolist())
            scores[prefix + names.head_accuracy(trained.head_name)] = float(
                (predicted == rows["label"].to_numpy()).mean()
            )
    log.info(
        "Served classifiers (validation): %s",
        ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k.startswith(names.VALIDATION_PREFIX)),
    )
    return scores


def log_results(job: Job, result: JobResult) -> None:
    import mlflow

    from embft.evaluation.per_class import log_class_artifacts

    mlflow.log_metrics(result.metrics(job.metric))
    mlflow.set_tags({names.PRECISION: result.train.precision, names.DEVICE: result.train.device})
    mlflow.log_text(
        json.dumps({s: r.scores for s, r in result.scores.items()}, indent=2, default=float), names.SCORES_ARTIFACT
    )
    log_class_artifacts(result.scores)  # per-class table + confusion matrix, by split


def log_models(job: Job, splits: Splits, trained: TrainResult) -> None:
    """The embedder and a kNN classifier into the run (tracking.log_model), before the folder goes."""
    from embft.serving.models import log_job_models

    log_job_models(trained.model_dir, splits, job.cfg)


def clean_up(job: Job, trained: TrainResult) -> None:
    import mlflow

    if job.cfg.train.keep_model:
        mlflow.set_tag(names.MODEL_DIR, str(trained.model_dir))
    else:
        shutil.rmtree(trained.model_dir, ignore_errors=True)


def summarize(job: Job, run_id: str, result: JobResult) -> None:
    """One paragraph: scores, delta, time, and where to look at the run."""
    m = result.metrics(job.metric)
    val = names.validation(job.metric)
    uri = job.cfg.tracking.uri
    # A local store is served by `make mlflow-ui` on tracking.ui_url's port (EMBFT_MLFLOW_UI_PORT, both read it).
    ui = (job.cfg.tracking.ui_url if uri.startswith("sqlite:") else uri).rstrip("/")
    log.info(
        "Done. %s = %.4f on %d test rows (baseline %.4f, delta %+.4f); %s = %.4f on %d validation rows "
        "(baseline %.4f, delta %+.4f, the objective%s). Trained %d queries in %.0f s (%.2f queries/s). "
        "Compare runs%s: %s/#/experiments/%s/runs  This run: %s/#/experiments/%s/runs/%s",
        job.metric,
        m[job.metric],
        result.scores["test"].n_test,
        m[names.baseline(job.metric)],
        m[names.delta(job.metric)],
        val,
        m[val],
        result.scores["validation"].n_test,
        m[names.baseline(val)],
        m[names.delta(val)],
        "" if job.objective == val else " is the test score: eval.objective=test",
        result.train.n_queries,
        result.train.seconds,
        result.train.queries_per_second,
        " (make mlflow-ui)" if uri.startswith("sqlite:") else "",
        ui,
        job.experiment_id,
        ui,
        job.experiment_id,
        run_id,
    )


# ---------------------------------------------------------------------------------------------- job


def run_job(cfg: Config) -> float | list[float] | Any:
    """Run one experiment job; return its objective(s) (val_accuracy_cosine by default), or an
    optuna.TrialPruned when the study's pruner stopped it."""
    import mlflow

    from embft.encoding import encoders

    job = start(cfg)
    splits, model_path = load_inputs(job)  # every input checked before the store is touched
    open_store(job)
    done = finished_run(job)
    if done is not None:
        return skip(job, done)
    mlflow_runs.close_stale_runs(job.experiment_id, job.config_hash)
    run_name, tags = run_tags(job)
    tags.update(scoring_tags(cfg, splits, job.encode))  # what "best" may compare it with
    with mlflow_runs.job_run(job.experiment_id, run_name, tags, note_dir=job.out_dir) as run:
        if run is None:  # a live run elsewhere has this config (job_run said where): skip it
            return float("nan")
        mlflow_runs.log_params(job.params)
        mlflow.log_text(OmegaConf.to_yaml(to_container(cfg)), names.CONFIG_ARTIFACT)
        twin = twins.finished_twin(job, run)
        if twin is not None:
            return job.returned(twins.take_twin(job, twin))
        mlflow.log_dict(splits.notes, names.DATA_NOTES_ARTIFACT)
        base_encoder = functools.cache(
            lambda: encoders.build_encoder(model_path, cfg.model.pooling, cfg.model.normalize, job.encode, job.device)
        )
        baseline = score_baseline(job, splits, base_encoder)
        ctx = TrainContext(
            cfg=cfg,
            splits=splits,
            model_path=model_path,
            out_dir=job.out_dir,
            cache_dir=job.cache_dir,
            model_key=json.dumps(job.model_id, sort_keys=True),
            encode_settings=job.encode.as_dict(),
            encode=lambda texts: base_encoder().encode(texts, batch_size=job.encode.batch_size),
        )
        trained, live = fine_tune(job, ctx, prepare(job, ctx))
        if live.pruned_step is not None:  # the trial is PRUNED in Optuna; the run ends FINISHED, tagged
            mlflow.log_metric(names.TRAIN_SECONDS, trained.seconds)
            shutil.rmtree(trained.model_dir, ignore_errors=True)
            return optuna_pruned(live.pruned_step)
        scores, eval_seconds = score_tuned(job, splits, trained, base_encoder)
        result = JobResult(baseline, scores, trained, eval_seconds, score_served(job, splits, trained))
        log_results(job, result)
        log_models(job, splits, trained)
        clean_up(job, trained)
    summarize(job, run.info.run_id, result)
    return job.returned(result.metrics(job.metric))


def optuna_pruned(step: int) -> Any:
    """Returned (not raised) to the sweeper: main's error handling would turn a raise into a failure."""
    import optuna

    return optuna.TrialPruned(f"pruned at step {step}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return run_job(cfg)  # type: ignore[arg-type]  (a DictConfig typed by the Config schema)
    except Exception as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # The run is FAILED in MLflow with its traceback; the sweep goes on and SweepSummary
            # exits non-zero at the end. NaN tells a sweeper (Optuna) that the trial failed.
            out = Path(HydraConfig.get().runtime.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / FAILED_MARKER).write_text(f"{type(err).__name__}: {err}"[:5000])
            if isinstance(err, EmbftError) and not cfg.debug:
                log.error("Job failed: %s", err)
            else:
                log.exception("Job failed")
            return float("nan")
        if isinstance(err, EmbftError) and not cfg.debug:
            log.error("%s", err)
            sys.exit(1)
        raise
