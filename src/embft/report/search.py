"""The search part of `embft report`: Optuna's matplotlib plots of a study, a trial table, both in
report.md, and the plots logged to the study's MLflow parent run (embft.tracking.study_runs).

A search is an experiment with a parent run tagged `embft.role=study`; its tag `optuna.storage`
says where the study lives (password hidden: pass `--storage` when the URL needs one).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

from embft import names
from embft.tracking.study_plots import write_plots

log = logging.getLogger(__name__)


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
    from embft.tracking.run_search import search_runs

    ids = [e.experiment_id for e in (client.get_experiment_by_name(n) for n in experiment_names) if e is not None]
    return search_runs(client, ids, {names.ROLE: names.ROLE_STUDY})


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
