"""The search part of `embft report`: Optuna's matplotlib plots of a study, a trial table, both in
report.md, and the plots logged to the study's MLflow parent run (embft.tracking.study_runs).

A search is an experiment with a parent run tagged `embft.role=study`; its tag `optuna.storage`
says where the study lives (password hidden: pass `--storage` when the URL needs one).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from embft import names

log = logging.getLogger(__name__)

PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values", "pareto_front")


def _plotters(study: Any) -> dict[str, Callable[[], Any]]:
    """The plots that apply to this study (each a callable returning matplotlib Axes)."""
    import optuna
    import optuna.visualization.matplotlib as vis
    from optuna.trial import TrialState

    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    # Multi-objective plots of one value need a target: the first objective.
    first = {} if len(names) == 1 else {"target": lambda t: t.values[0], "target_name": names[0]}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: vis.plot_optimization_history(study, **first),
        "parallel_coordinate": lambda: vis.plot_parallel_coordinate(study, **first),
    }
    searched = {name for t in complete for name in t.distributions}
    if len(complete) >= 2 and searched:  # importances need a fitted model over finished trials
        # Several objectives: a bar per objective with fANOVA, which needs no direction (Optuna's
        # default, PED-ANOVA, reads every objective as minimized there).
        evaluator = None if len(names) == 1 else optuna.importance.FanovaImportanceEvaluator(seed=0)
        plots["param_importances"] = lambda: vis.plot_param_importances(
            study, evaluator=evaluator, target_name=names[0] if len(names) == 1 else "importance"
        )
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        plots["intermediate_values"] = lambda: vis.plot_intermediate_values(study)
    if len(study.directions) == 2:
        plots["pareto_front"] = lambda: vis.plot_pareto_front(study, target_names=names)
    return {name: plots[name] for name in PLOTS if name in plots}


def write_plots(study: Any, out_dir: Path, prefix: str = "search") -> dict[str, Path]:
    """One PNG per applicable plot in out_dir (`<prefix>_<plot>.png`); returns them by plot name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, plot in _plotters(study).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                ax = plot()
            except (ValueError, RuntimeError) as err:  # e.g. importances of a constant objective
                log.warning("Plot %s skipped: %s", name, err)
                continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
        fig.set_size_inches(9, 5.5)
        fig.tight_layout()
        path = out_dir / f"{prefix}_{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written[name] = path
    return written


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def trial_table(study: Any) -> str:
    """Markdown: one row per trial (state, values, pruned at step, params)."""
    trials = study.get_trials(deepcopy=False)
    params = sorted({p for t in trials for p in t.params})
    names = study.metric_names or (
        ["value"] if len(study.directions) == 1 else [f"value {i}" for i in range(len(study.directions))]
    )
    head = ["trial", "state", *names, "last step", *params]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for t in trials:
        values = list(t.values) if t.values else [math.nan] * len(names)
        row = [
            str(t.number),
            t.state.name,
            *map(_fmt, values),
            _fmt(t.last_step if t.last_step is not None else "-"),
            *(_fmt(t.params.get(p, "-")) for p in params),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def section(study: Any, plots: dict[str, Path], md_dir: Path) -> str:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    text = [
        f"## Search: Optuna study `{study.study_name}`",
        "",
        f"{len(trials)} trials: {count[TrialState.COMPLETE]} complete, {count[TrialState.PRUNED]} pruned, "
        f"{count[TrialState.FAIL]} failed; directions {[d.name.lower() for d in study.directions]}.",
    ]
    if len(study.directions) == 1 and count[TrialState.COMPLETE]:
        best = study.best_trial
        text.append(f"Best: trial {best.number}, value {best.value:.4f}, params {best.params}.")
    elif count[TrialState.COMPLETE]:
        text.append(f"Pareto-optimal trials: {sorted(t.number for t in study.best_trials)}.")
    text += ["", trial_table(study), ""]
    for name, path in plots.items():
        rel = path.relative_to(md_dir) if path.is_relative_to(md_dir) else path
        text += [f"### {name.replace('_', ' ')}", "", f"![{name}]({rel})", ""]
    return "\n".join(text)


def find_studies(client: Any, experiment_names: list[str]) -> list[Any]:
    """Parent runs of Optuna studies (embft.role=study) in these experiments."""
    from embft.names import ROLE

    ids = [e.experiment_id for e in (client.get_experiment_by_name(n) for n in experiment_names) if e is not None]
    if not ids:
        return []
    return client.search_runs(ids, filter_string=f"tags.`{ROLE}` = '{names.ROLE_STUDY}'", max_results=100)


def add_search_section(
    client: Any, experiment_names: list[str], md_path: Path, storage: Optional[str] = None
) -> list[Path]:
    """For each study among the experiments: plots beside md_path, a section appended to it, the
    plots logged to the study's parent run. Returns the PNGs written ([] when no search)."""
    import optuna

    from embft.errors import EmbftError

    written: list[Path] = []
    parents = find_studies(client, experiment_names)
    for parent in parents:
        name = parent.data.tags["embft.parent_key"].partition(":")[2]
        url = storage or parent.data.tags.get(names.OPTUNA_STORAGE)
        if not url:
            raise EmbftError(f"study {name!r}: its parent run has no optuna.storage tag; pass --storage URL")
        try:
            study = optuna.load_study(study_name=name, storage=url)
        except Exception as err:  # KeyError for an unknown study, SQLAlchemy errors for a bad URL or password
            raise EmbftError(
                f"study {name!r} at {url}: cannot load it ({type(err).__name__}: {err}); "
                "pass --storage URL (with its password)"
            ) from err
        # several studies in one report: each its own files, or the last would overwrite the others'
        plots = write_plots(study, md_path.parent, "search" if len(parents) == 1 else f"search_{name}")
        with md_path.open("a") as md:
            md.write("\n" + section(study, plots, md_path.parent) + "\n")
        for path in plots.values():
            client.log_artifact(parent.info.run_id, str(path), "plots")
        written += plots.values()
    return written
