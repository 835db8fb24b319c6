"""The advise sweep: per arm an Optuna search of the arm's own settings on validation (the ``embft_optuna``
sweeper, composed, launching through the configured hydra/launcher), the chosen settings of every arm
confirmed over training seeds 1..S in one batch, a recommendation report from the MLflow runs, and the
recommended arm's model registered as ``<name>@champion``.

A rerun resumes: the arms' studies are persistent (their trial budget reached, they ask nothing) and every
confirmation job whose config already FINISHED skips by its config hash, so no training job runs again."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Optional

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from embft import names

from ._plan import Plan, cells, make_plan

log = logging.getLogger("embft")
OPTUNA_TARGET = "hydra_plugins.embft_optuna_sweeper.embft_optuna_sweeper.EmbftOptunaSweeper"


class _Numbered:
    """A launcher whose jobs are numbered across the whole advise sweep (each arm's Optuna sweeper starts
    at 0), so no two jobs share an output folder."""

    def __init__(self, launcher: Any, counter: list[int]) -> None:
        self.launcher, self.counter = launcher, counter

    def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
        start = self.counter[0]
        self.counter[0] += len(job_overrides)
        return self.launcher.launch(job_overrides, initial_job_idx=start)


class AdviseSweeperImpl(Sweeper):
    def __init__(self, **options: Any) -> None:
        self.options = options
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None
        self.launcher: Any = None
        self.counter = [0]
        self.storage_urls: dict[str, str] = {}  # per arm, as its Optuna sweeper resolved it (driver, path)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ---------------------------------------------------------------- stages

    def sweep(self, arguments: list[str]) -> list[Any]:
        """One advise per cell of the command line's sweeps (experiment=label_budget: data=a,b train.per_class=8,64),
        one after the other; a command line without sweeps is one cell."""
        assert self.config is not None
        whole = self.config
        returns: list[Any] = []
        try:
            for cell in cells(arguments):
                self.config = self._cell_config(whole, cell, arguments)
                returns.extend(self.advise(cell))
        finally:
            self.config = whole
        if self.options.get("summary_dir"):
            from embft.report import label_budget

            written = label_budget.write(Path(str(self.options["summary_dir"])), str(whole.tracking.classifier))
            log.info("Label budgets over the finished cells: %s", written)
        return returns

    def _cell_config(self, whole: DictConfig, cell: list[str], arguments: list[str]) -> DictConfig:
        """The multirun config of one cell: composed with the cell's overrides, this sweep's folder and time."""
        if cell == list(arguments):
            return whole
        assert self.hydra_context is not None
        config = self.hydra_context.config_loader.load_sweep_config(whole, cell)
        with open_dict(config):
            config.hydra.sweep.dir = whole.hydra.sweep.dir
            config.hydra.overrides.task = cell
        return config

    def advise(self, arguments: list[str]) -> list[Any]:
        from embft.tracking import mlflow_runs

        assert self.config is not None
        plan = make_plan(self.config, arguments)  # checked again: the callback may not be the advise one
        experiment_id = mlflow_runs.setup(self.config.tracking)
        log.info(
            "Advise %s (%s, %d per class): %d arm(s) (%s), %d search trial(s) each on validation, then %d seed(s) "
            "each%s",
            plan.name,
            self.config.data.name,
            plan.per_class,
            len(plan.arms),
            ", ".join(plan.arms),
            plan.trials_per_arm,
            plan.seeds,
            f"; reference arm(s) {', '.join(plan.references)} confirmed without a search" if plan.references else "",
        )
        returns: list[Any] = []
        for arm in plan.arms:
            returns.extend(self.search(plan, arm, experiment_id))
        chosen = {arm: overrides for arm in plan.arms if (overrides := self.best_overrides(plan, arm)) is not None}
        chosen.update({arm: [] for arm in plan.references})
        returns.append(self.confirm(plan, chosen, experiment_id))
        self.report(plan, chosen, experiment_id)
        return returns

    def _sub_config(self, sweep_dir: Path, study: str) -> DictConfig:
        """The multirun config as an embft_optuna sweep of `study` sees it (its own results folder)."""
        assert self.config is not None
        sub = copy.deepcopy(self.config)  # keeps the resolver cache: ${now:} stays this sweep's time
        with open_dict(sub):
            sub.hydra.sweep.dir = str(sweep_dir)
            sub.hydra.sweeper = {
                "_target_": OPTUNA_TARGET,
                "study_name": study,
                "storage": self.options["storage"],
                "pruner": OmegaConf.to_container(self.config.hydra.sweeper.pruner, resolve=True),
            }
        return sub

    def search(self, plan: Plan, arm: str, experiment_id: str) -> list[Any]:
        """The arm's Optuna study: advise.trials_per_arm trials of its advise.space, live-scored for the pruner."""
        from hydra_plugins.embft_optuna_sweeper.embft_optuna_sweeper import EmbftOptunaSweeper

        assert self.config is not None
        study = plan.study(arm)
        sub = self._sub_config(Path(self.config.hydra.sweep.dir) / "search" / arm, study)
        o = self.options
        enqueue = []
        if plan.recipe_trial:
            recipe, sampled = plan.recipe(arm)
            if recipe:
                enqueue.append(recipe)
            log.info(
                "Advise %s: arm %s's first trial is its recipe %s%s",
                plan.name,
                arm,
                recipe,
                f" ({', '.join(sampled)} sampled: unset or outside the space)" if sampled else "",
            )
        optuna_sweeper = EmbftOptunaSweeper(
            direction="maximize",
            study_name=study,
            storage=o["storage"],
            n_trials=plan.trials_per_arm,
            n_jobs=o["n_jobs"],
            seed=o["seed"],
            sampler=o["sampler"],
            max_failure_rate=o["max_failure_rate"],
            heartbeat_interval=o["heartbeat_interval"],
            params=plan.space(arm),
            pruner=o["pruner"],
            storage_options=o["storage_options"],
            enqueue_trials=enqueue,
        )
        optuna_sweeper.setup(hydra_context=self.hydra_context, task_function=self.task_function, config=sub)
        optuna_sweeper.sweeper.launcher = _Numbered(optuna_sweeper.sweeper.launcher, self.counter)
        parent = _start_parent(experiment_id, sub)
        evals = "null" if plan.live_evals is None else str(plan.live_evals)
        log.info("Advise %s: searching arm %s (study %s)", plan.name, arm, study)
        try:
            return optuna_sweeper.sweep(
                [*plan.job(arm), "eval.every_steps=null", f"eval.live_evals={evals}", "tracking.log_model=none"]
            )
        finally:
            self.storage_urls[arm] = optuna_sweeper.sweeper.storage_url
            _finish_parent(experiment_id, parent, sub, {names.OPTUNA_STUDY: study})

    def best_overrides(self, plan: Plan, arm: str) -> Optional[list[str]]:
        """The overrides of the arm's best trial on validation; None when no trial completed."""
        import optuna

        storage = self.storage_urls.get(arm) or self.options["storage"]
        study = optuna.load_study(study_name=plan.study(arm), storage=storage)
        if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
            log.warning("Advise %s: arm %s has no completed trial; it is not confirmed", plan.name, arm)
            return None
        from hydra_plugins.embft_optuna_sweeper._search_space import format_value

        return [f"{k}={format_value(v)}" for k, v in study.best_trial.params.items()]

    def confirm(self, plan: Plan, chosen: dict[str, list[str]], experiment_id: str) -> Any:
        """Every arm at its chosen settings, training seeds 1..advise.seeds, launched as one batch."""
        assert self.config is not None
        batch = []
        for arm, overrides in chosen.items():
            for seed in range(1, plan.seeds + 1):
                batch.append(
                    [
                        *plan.job(arm),
                        *overrides,
                        f"train.seed={seed}",
                        "eval.every_steps=null",
                        "eval.live_evals=null",
                        "tracking.log_model=best",
                        f"optuna.study_name={plan.seeds_study(arm)}",
                        f"optuna.trial_number={seed}",
                    ]
                )
        subs = {arm: self._sub_config(Path(self.config.hydra.sweep.dir), plan.seeds_study(arm)) for arm in chosen}
        parents = {arm: _start_parent(experiment_id, sub) for arm, sub in subs.items()}
        log.info(
            "Advise %s: confirming %d arm(s) over %d seed(s): %d jobs", plan.name, len(chosen), plan.seeds, len(batch)
        )
        try:
            self.validate_batch_is_legal(batch)
            return _Numbered(self.launcher, self.counter).launch(batch, initial_job_idx=0)
        finally:
            for arm, sub in subs.items():
                _finish_parent(experiment_id, parents[arm], sub, {names.OPTUNA_STUDY: plan.seeds_study(arm)})

    def report(self, plan: Plan, chosen: dict[str, list[str]], experiment_id: str) -> None:
        """The recommendation from the store (report/advise.py), logged to the advise parent run; the
        recommended arm's best seed registered as <name>@champion."""
        import mlflow

        from embft.report import advise as advise_report
        from embft.tracking import study_runs
        from embft.tracking.registry import objective_metric, register_best

        assert self.config is not None
        client = mlflow.MlflowClient()
        runs = advise_report.load(client, experiment_id, {arm: plan.seeds_study(arm) for arm in plan.confirmed})
        budget = advise_report.Budget(
            data=str(self.config.data.name),
            per_class=plan.per_class,
            trials_per_arm=plan.trials_per_arm,
            seeds=plan.seeds,
            arms=plan.arms,
            chosen={arm: " ".join([*plan.fixed.get(arm, []), *o]) for arm, o in chosen.items()},
            references=plan.references,
            recipe_trial=plan.recipe_trial,
        )
        # The cell's own folder (report_dir interpolates data.name and train.per_class).
        out = Path(str(OmegaConf.select(self.config, "hydra.sweeper.report_dir") or self.options["report_dir"]))
        result = advise_report.write(
            runs, budget, out, metric=objective_metric(self.config), classifier=str(self.config.tracking.classifier)
        )
        log.info("Advise %s: report %s", plan.name, result.markdown)
        parent = _start_parent(
            experiment_id,
            self._sub_config(Path(self.config.hydra.sweep.dir), f"{plan.name}/{plan.data_key}/n{plan.per_class}"),
        )
        try:
            for path in result.files:
                client.log_artifact(parent, str(path), "advise")
            client.set_tag(parent, "advise.recommendation", result.sentence[:5000])
            if result.best_arm:
                client.set_tag(parent, "advise.best_arm", result.best_arm)
        finally:
            study_runs.finish_parent_run(
                experiment_id,
                parent,
                self._sub_config(Path(self.config.hydra.sweep.dir), f"{plan.name}/{plan.data_key}/n{plan.per_class}"),
                {},
            )
        name = self.config.tracking.registered_model_name
        if result.best_arm and name:
            version = register_best(
                experiment_id,
                {names.OPTUNA_STUDY: plan.seeds_study(result.best_arm)},
                plan.study(result.best_arm),
                str(name),
                objective_metric(self.config),
            )
            if version is not None:
                log.info(
                    "Advise %s: %s version %s registered (arm %s)", plan.name, name, version.version, result.best_arm
                )
        log.info("%s", result.sentence)


def _start_parent(experiment_id: str, sub: DictConfig) -> Optional[str]:
    from embft.tracking import study_runs

    try:
        return study_runs.start_parent_run(experiment_id, sub)
    except Exception as err:  # the jobs run without a parent if MLflow refuses, as in SweepSummary
        log.warning("No parent run for %s: %s", sub.hydra.sweeper.study_name, err)
        return None


def _finish_parent(experiment_id: str, parent: Optional[str], sub: DictConfig, group: dict[str, str]) -> None:
    from embft.tracking import mlflow_runs, study_runs

    if parent is None:
        return
    try:
        runs = mlflow_runs.find_runs(
            experiment_id, {**group, names.ROLE: names.ROLE_FINETUNE}, ("FINISHED", "FAILED", "KILLED")
        )
        study_runs.finish_parent_run(experiment_id, parent, sub, study_runs.count_runs(runs))
    except Exception as err:
        log.warning("Parent run %s not completed: %s", parent, err)


__all__ = ["AdviseSweeperImpl", "JobReturn"]
