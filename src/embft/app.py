"""The Hydra app: one job = prepare records, baseline, fine-tune, evaluate, track."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from embft import tracking
from embft.config import register_configs, to_container
from embft.errors import EmbftError

log = logging.getLogger("embft")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

register_configs()


def _hydra_context() -> tuple[Optional[str], str]:
    """(sweep id or None, run name) from the Hydra runtime, when there is one."""
    if not HydraConfig.initialized():
        return None, "job"
    hc = HydraConfig.get()
    sweep = None
    if hc.mode == RunMode.MULTIRUN:
        sweep = f"{Path(hc.sweep.dir).parent.name}/{Path(hc.sweep.dir).name}"
    return sweep, hc.job.override_dirname or "job"


def _lock(cache_dir: Path, name: str):
    from filelock import FileLock

    (cache_dir / "locks").mkdir(parents=True, exist_ok=True)
    return FileLock(str(cache_dir / "locks" / f"{name}.lock"))


def run_job(cfg: DictConfig) -> float:
    """Run one experiment job and return its objective (accuracy_cosine for the kNN eval)."""
    from embft.data import load_splits, prepare_records
    from embft.evaluate import baseline_key, cached_baseline, evaluate, metric_name
    from embft.train import check_parallel, quiet_libraries, resolve_model_path, sentence_transformer, train

    quiet_libraries()
    # issue 15: auto precision/backend become concrete values before the hash, params and baseline key.
    from embft.batched import pick_precision
    from embft.encoders import eval_model, pin_eval_settings
    from embft.train import pick_device

    device = pick_device(cfg.train.device)
    encode = pin_eval_settings(cfg, device, default_max_seq_length=cfg.train.query_max_len)
    if cfg.train.precision == "auto":
        cfg.train.precision = pick_precision("auto", device)
    resolved = to_container(cfg)
    params = tracking.flatten(resolved)
    hash_ = tracking.config_hash(resolved)
    metric = metric_name(cfg.eval)
    cache_dir = Path(cfg.paths.cache_dir)
    out_dir = Path(cfg.paths.output_dir)

    experiment_id = tracking.setup(cfg.tracking)
    if not cfg.force:
        done = tracking.find_runs(experiment_id, {tracking.CONFIG_HASH: hash_})
        if done and metric in done[0].data.metrics:
            log.info("Skipping: run %s already FINISHED this config (%s=%s); force=true reruns it",
                     done[0].info.run_id, tracking.CONFIG_HASH, hash_)
            return float(done[0].data.metrics[metric])
    tracking.close_stale_runs(experiment_id, hash_)

    sweep, run_name = _hydra_context()
    tags = {
        tracking.ROLE: "finetune",
        tracking.CONFIG_HASH: hash_,
        "variant": cfg.variant.name,
        "model": cfg.model.name,
        "data": cfg.data.name,
    }
    if sweep:
        tags[tracking.SWEEP] = sweep
    if cfg.optuna.study_name is not None:
        tags.update({"optuna.study_name": cfg.optuna.study_name, "optuna.trial_number": str(cfg.optuna.trial_number)})

    import mlflow

    with tracking.job_run(experiment_id, run_name, tags):
        tracking.log_params(params)
        mlflow.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
        check_parallel(cfg.train, cfg.variant)  # in the run, so a sweep counts it; before minutes of baseline

        splits = load_splits(cfg.data)
        mlflow.log_dict(splits.notes, "data_notes.json")
        log.info("Data %s: %d train, %d test rows, %d classes", splits.source, len(splits.train), len(splits.test),
                 len(splits.label_names))
        model_path = resolve_model_path(cfg.model)

        def base_model():
            return sentence_transformer(model_path, cfg.model.pooling, cfg.model.normalize, cfg.train.query_max_len)

        model_id = {"path": cfg.model.name_or_path if not cfg.model.package else cfg.model.package,
                    "revision": cfg.model.revision, "pooling": cfg.model.pooling, "normalize": cfg.model.normalize}
        key = baseline_key(model_id, splits, cfg.eval)
        with _lock(cache_dir, f"baseline-{key}"):
            baseline, _ = cached_baseline(cache_dir, key, lambda: evaluate(  # issue 15: eval_model
                eval_model(model_path, cfg.model.pooling, cfg.model.normalize, encode, device),
                splits, cfg.eval, cfg.data.name))
            baseline_params = {k: v for k, v in params.items() if k.split(".")[0] in ("model", "data", "eval")}
            tracking.ensure_baseline_run(experiment_id, key, baseline, metric, baseline_params)
        mlflow.set_tag(tracking.BASELINE_KEY, key)
        log.info("Baseline %s = %.4f", metric, baseline.accuracy)

        record_settings = dict(
            group_size=cfg.train.train_group_size,
            seed=cfg.train.seed,
            max_queries=cfg.train.max_train_queries,
            prompt="",
            batch_size=cfg.train.same_dataset_batch_size,
            pairing=cfg.data.pairing,
        )
        with _lock(cache_dir, "records"):
            records_dir = prepare_records(
                splits,
                cache_dir=cache_dir,
                dataset_name=cfg.data.name,
                no_in_batch_neg=cfg.variant.no_in_batch_neg,
                encode=lambda texts: base_model().encode(texts, batch_size=cfg.eval.batch_size),
                model_key=json.dumps(model_id, sort_keys=True),
                **record_settings,
            )
        n_records = sum(1 for _ in (records_dir / "train.jsonl").open())
        mlflow.set_tag("records_dir", str(records_dir))

        result = train(cfg, records_dir, model_path, n_records, out_dir)
        tracking.log_series("train_loss", result.losses)

        eval_start = time.perf_counter()
        tuned = eval_model(str(result.model_dir), cfg.model.pooling, cfg.model.normalize, encode, result.device)
        scores = evaluate(tuned, splits, cfg.eval, cfg.data.name)
        eval_seconds = time.perf_counter() - eval_start
        mlflow.log_metrics({
            metric: scores.accuracy,
            f"{metric}_std": scores.accuracy_std,
            "f1": scores.f1,
            f"baseline_{metric}": baseline.accuracy,
            f"delta_{metric}": scores.accuracy - baseline.accuracy,
            "train_seconds": result.seconds,
            "train_queries": result.n_queries,
            "train_queries_per_second": result.queries_per_second,
            "effective_batch_size": result.effective_batch_size,
            "eval_seconds": eval_seconds,
        })
        mlflow.set_tags({"precision": result.precision, "device": result.device})
        mlflow.log_text(scores.to_json(), "mteb_scores.json")
        if cfg.train.keep_model:
            mlflow.set_tag("model_dir", str(result.model_dir))
        else:
            shutil.rmtree(result.model_dir, ignore_errors=True)
        log.info("%s = %.4f (baseline %.4f, delta %+.4f); trained %d queries in %.0f s (%.2f queries/s)",
                 metric, scores.accuracy, baseline.accuracy, scores.accuracy - baseline.accuracy,
                 result.n_queries, result.seconds, result.queries_per_second)
        return scores.accuracy


class SweepSummary(Callback):
    """Create the MLflow store before parallel jobs race to; at the end, count the sweep's runs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            tracking.setup(config.tracking)
        except EmbftError as err:
            log.error("%s", err)
            raise SystemExit(1) from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            experiment_id = tracking.setup(config.tracking)
            sweep = f"{Path(config.hydra.sweep.dir).parent.name}/{Path(config.hydra.sweep.dir).name}"
            runs = tracking.find_runs(experiment_id, {tracking.SWEEP: sweep}, ("FINISHED", "FAILED", "KILLED", "RUNNING"))
        except Exception as err:  # a summary must never mask the sweep's own outcome
            log.warning("No sweep summary: %s", err)
            return
        counts: dict[str, int] = {}
        for run in runs:
            counts[run.info.status] = counts.get(run.info.status, 0) + 1
        log.info("Sweep %s: %s", sweep, ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no runs logged")
        self._tag_best_trial(Path(config.hydra.sweep.dir) / "optimization_results.yaml", experiment_id)
        failed = counts.get("FAILED", 0) + counts.get("KILLED", 0)
        if failed:
            log.error("%d job(s) of sweep %s failed; their MLflow runs hold the error (tag `error`, error.txt). "
                      "Rerunning the same command skips the finished jobs.", failed, sweep)
            raise SystemExit(1)

    @staticmethod
    def _tag_best_trial(results_file: Path, experiment_id: str) -> None:
        """Mark the Optuna study's best trial in MLflow (tag optuna.best_trial) after a search."""
        if not results_file.is_file():
            return
        results = OmegaConf.load(results_file)
        if OmegaConf.select(results, "best_trial_number") is None:
            return
        import mlflow

        client = mlflow.MlflowClient()
        study = {"optuna.study_name": str(results.study_name)}
        for run in tracking.find_runs(experiment_id, study):
            best = run.data.tags.get("optuna.trial_number") == str(results.best_trial_number)
            client.set_tag(run.info.run_id, "optuna.best_trial", str(best).lower())
            if best:
                log.info("Best trial %s (%s=%s): MLflow run %s", results.best_trial_number,
                         "value", results.best_value, run.info.run_id)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return run_job(cfg)
    except Exception as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # The run is FAILED in MLflow with its traceback; the sweep goes on and SweepSummary
            # exits non-zero at the end. NaN tells a sweeper (Optuna) that the trial failed.
            if isinstance(err, EmbftError) and not cfg.debug:
                log.error("Job failed: %s", err)
            else:
                log.exception("Job failed")
            return float("nan")
        if isinstance(err, EmbftError) and not cfg.debug:
            log.error("%s", err)
            sys.exit(1)
        raise
