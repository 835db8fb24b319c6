"""An Optuna study's plots (Optuna's matplotlib visualizations) as PNG files: logged to the study's
MLflow parent run at the end of a search (embft.tracking.study_runs) and embedded by `embft report`
(embft.report.search)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
