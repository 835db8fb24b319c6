"""What an advise sweep will run, checked before anything is created: the arms (each composed with its own
search space), the trials each gets, the seeds; a bad input is one line (EmbftError)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from embft.errors import EmbftError

ARM_GROUP = "arm"


@dataclass
class Plan:
    name: str  # the study's name (the job config's `name`)
    arms: list[str]  # searched, then confirmed
    configs: dict[str, DictConfig]  # each arm's composed job config (reference arms' too)
    trials_per_arm: int
    seeds: int
    live_evals: Optional[int]
    per_class: int
    base: list[str] = field(default_factory=list)  # the command line's overrides, arm= removed
    data_key: str = ""  # the splits' content fingerprint: two data=local folders never share a study
    references: list[str] = field(default_factory=list)  # confirmed over the seeds with no search
    fixed: dict[str, list[str]] = field(default_factory=dict)  # advise.overrides: per arm, held in every job
    recipe_trial: bool = False  # advise.recipe_trial: the arm's own settings are its search's first trial

    def job(self, arm: str) -> list[str]:
        """The overrides every job of the arm starts from: the command line's, the arm, its fixed settings."""
        return [*self.base, f"{ARM_GROUP}={arm}", *self.fixed.get(arm, [])]

    @property
    def confirmed(self) -> list[str]:
        return [*self.arms, *self.references]

    def study(self, arm: str) -> str:
        # The budget in the name too: a study of N per class never resumes into another budget's.
        return f"{self.name}/{self.data_key}/n{self.per_class}/{arm}"

    def seeds_study(self, arm: str) -> str:
        return f"{self.study(arm)}/seeds"

    def space(self, arm: str) -> dict[str, str]:
        return {str(k): str(v) for k, v in self.configs[arm].advise.space.items()}

    def recipe(self, arm: str) -> tuple[dict[str, Any], list[str]]:
        """The arm's composed values of its searched keys that lie in its space (its search's first trial), and
        the keys left to the sampler (unset, e.g. a loss's default margin, or outside the space)."""
        from hydra_plugins.embft_optuna_sweeper._search_space import SearchSpaceError, parse_search_space

        space = parse_search_space(self.space(arm), self.job(arm))  # as the search parses it: the command line wins
        point: dict[str, Any] = {}
        for key in space.params:
            value = OmegaConf.select(self.configs[arm], key)
            try:
                space.check_point({key: value}, "recipe")
            except SearchSpaceError:
                continue
            point[key] = value
        return point, [k for k in space.params if k not in point]


def _composer(config: DictConfig) -> tuple[Callable[[list[str]], DictConfig], list[str]]:
    """Compose a job config with overrides (the running app's config), and the arms conf/arm offers."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    name = OmegaConf.select(config, "hydra.job.config_name") or "config"
    options = sorted(GlobalHydra.instance().config_loader().get_group_options(ARM_GROUP))
    return (lambda overrides: compose(config_name=name, overrides=overrides)), options


def cells(arguments: Sequence[str]) -> list[list[str]]:
    """The command line's sweeps as cells, one advise each: `data=trec,sst5 train.per_class=8,64` gives four
    (Hydra's basic sweeper's cartesian product); a command line without sweeps is one cell, itself."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(arguments))
    if not any(o.is_sweep_override() for o in parsed):
        return [list(arguments)]
    return [cell for batch in BasicSweeper.split_arguments(parsed, None) for cell in batch]


def make_plan(
    config: DictConfig,
    arguments: Sequence[str],
    compose: Optional[Callable[[list[str]], DictConfig]] = None,
    options: Optional[list[str]] = None,
    splits: Any = None,
) -> Plan:
    """The advise sweep of `config` (the multirun's config) and its command line, checked: the budget
    (train.per_class), the arms (known, each with an advise.space), trials and seeds, and the data (every
    class has N train rows and validation rows) for each arm's backend."""
    from embft.data import load_splits
    from embft.training.labelled import check_budget

    if compose is None or options is None:
        compose, options = _composer(config)
    advise = config.advise
    per_class = OmegaConf.select(config, "train.per_class")
    if per_class is None:
        raise EmbftError(
            "experiment=advise needs train.per_class=N (labelled texts of every class): the budget the arms are "
            "compared at, e.g. train.per_class=8."
        )
    base = [a for a in arguments if not a.split("=", 1)[0].lstrip("+~") == ARM_GROUP]
    arms = [str(a) for a in advise.arms] or None
    if arms is None:  # every arm with a search space
        arms = [a for a in options if compose([*base, f"{ARM_GROUP}={a}"]).advise.space]
    unknown = [a for a in arms if a not in options]
    if unknown:
        raise EmbftError(f"advise.arms: no arm {unknown[0]!r} in conf/arm; choose from {', '.join(options)}.")
    if len(set(arms)) != len(arms):
        raise EmbftError(f"advise.arms={arms}: an arm is listed twice.")
    minimum = int(advise.min_trials_per_arm)
    if advise.total_trials is not None:
        trials = int(advise.total_trials) // len(arms)
        if trials < minimum:
            raise EmbftError(
                f"advise.total_trials={advise.total_trials} gives each of the {len(arms)} arms {trials} trial(s), "
                f"under advise.min_trials_per_arm={minimum}: raise it to {minimum * len(arms)} or list fewer arms."
            )
    else:
        trials = int(advise.trials_per_arm)
        if trials < minimum:
            raise EmbftError(
                f"advise.trials_per_arm={trials}: each arm needs at least advise.min_trials_per_arm={minimum} "
                "trials to choose its settings."
            )
    if int(advise.seeds) < 2:
        raise EmbftError(f"advise.seeds={advise.seeds}: a paired interval needs at least 2 training seeds.")
    references = [str(a) for a in advise.get("reference_arms", [])]
    unknown = [a for a in references if a not in options]
    if unknown:
        raise EmbftError(f"advise.reference_arms: no arm {unknown[0]!r} in conf/arm; choose from {', '.join(options)}.")
    both = [a for a in references if a in arms]
    if both:
        raise EmbftError(
            f"advise.reference_arms: arm {both[0]!r} is also in advise.arms; an arm is searched or a reference."
        )
    fixed = {str(a): [str(o) for o in overrides] for a, overrides in (advise.get("overrides") or {}).items()}
    unknown = [a for a in fixed if a not in options]  # an arm not advised this time keeps its entry, unused
    if unknown:
        raise EmbftError(f"advise.overrides: no arm {unknown[0]!r} in conf/arm; choose from {', '.join(options)}.")
    configs = {arm: compose([*base, f"{ARM_GROUP}={arm}", *fixed.get(arm, [])]) for arm in [*arms, *references]}
    for arm in arms:
        if not configs[arm].advise.space:
            raise EmbftError(
                f"advise.arms: arm {arm!r} has no search space: give conf/arm/{arm}.yaml an advise.space block, "
                "or list it in advise.reference_arms."
            )
    if splits is None:
        splits = load_splits(config.data)
    for arm_cfg in configs.values():
        check_budget(arm_cfg, splits)
    evals = advise.live_evals
    return Plan(
        name=str(config.name),
        arms=arms,
        configs=configs,
        trials_per_arm=trials,
        seeds=int(advise.seeds),
        live_evals=None if evals is None else int(evals),
        per_class=int(per_class),
        base=base,
        data_key=splits.fingerprint()[:8],
        references=references,
        fixed=fixed,
        recipe_trial=bool(advise.get("recipe_trial", False)),
    )
