"""A tiny real Optuna search through the app: resumable, tracked in MLflow, best trial tagged."""

import optuna
import pytest
import yaml

from test_pipeline import embft, runs

pytestmark = pytest.mark.slow

TINY = [
    "train.max_train_queries=12",
    "train.logging_steps=2",
    "eval.max_test_rows=120",
    "eval.max_validation_rows=120",
    "eval.samples_per_label=8",
    "eval.n_experiments=2",
    "train.num_train_epochs=1",
    "train.train_group_size=choice(4,8)",
]  # command-line entries replace the config's search space


def test_search_resumes_and_marks_the_best_trial(tmp_path, ag_news_dir):
    from conftest import make_tiny_bert

    tiny = make_tiny_bert(tmp_path / "tiny_bert")  # the search's bookkeeping is under test, not MiniLM
    model = [f"model.name_or_path={tiny}", "model.package=null"]
    args = ["-m", "experiment=search", f"data.local_dir={ag_news_dir}", *model, *TINY]
    first = embft(tmp_path, *args, "hydra.sweeper.n_trials=2")
    assert first.returncode == 0, first.stderr[-3000:]
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    assert len(optuna.load_study(study_name="search", storage=storage).trials) == 2

    second = embft(tmp_path, *args, "hydra.sweeper.n_trials=3")
    assert second.returncode == 0, second.stderr[-3000:]
    study = optuna.load_study(study_name="search", storage=storage)
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)

    tuned = [r for r in runs(tmp_path, "search") if r.data.tags["embft.role"] == "finetune"]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in tuned) == [0, 1, 2]
    best = [r for r in tuned if r.data.tags.get("optuna.best_trial") == "true"]
    # The search optimizes the validation score; the test score is logged beside it, never chosen on.
    assert len(best) == 1 and best[0].data.metrics["val_accuracy_cosine"] == pytest.approx(study.best_value)
    assert all("accuracy_cosine" in r.data.metrics for r in tuned)

    sweep_dirs = sorted((tmp_path / "multirun" / "search").iterdir())
    results = yaml.safe_load((sweep_dirs[-1] / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(study.best_value)

    # One parent run for the study, found again by the resumed sweep, holding the best value.
    parents = [r for r in runs(tmp_path, "search") if r.data.tags.get("embft.role") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in tuned} == {parents[0].info.run_id}
    assert parents[0].data.metrics["best_value"] == pytest.approx(study.best_value)

    # `embft report` on a search adds the study's plots.
    from embft.report import main as report

    assert (
        report(
            [
                "search",
                "--tracking-uri",
                f"sqlite:///{tmp_path}/mlruns/mlflow.db",
                "--out-dir",
                str(tmp_path / "reports"),
            ]
        )
        == 0
    )
    md = (tmp_path / "reports" / "search" / "report.md").read_text()
    assert "## Search: Optuna study `search`" in md
    for plot in ("optimization_history", "param_importances", "parallel_coordinate"):
        assert (tmp_path / "reports" / "search" / f"search_{plot}.png").is_file() and f"search_{plot}.png" in md
