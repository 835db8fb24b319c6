"""`embft report` on a small synthetic MLflow store (sqlite in a temp folder)."""

from __future__ import annotations

import math
import time
import uuid

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from scipy import stats

from embft import report

SWEEP = "seed_grid/2026-11-27_00-10-00"
BASELINE = 0.60
# accuracy_cosine by (learning rate, seed); lr=2e-5 is the better configuration.
ACC = {
    ("1e-05", 1): 0.61,
    ("1e-05", 2): 0.63,
    ("1e-05", 3): 0.62,
    ("2e-05", 1): 0.70,
    ("2e-05", 2): 0.66,
    ("2e-05", 3): 0.71,
}


def _run(
    client,
    exp_id,
    *,
    role,
    params,
    metrics,
    status="FINISHED",
    sweep=SWEEP,
    key="k1",
    config_hash=None,
    start_time=None,
):
    # Each run its own config unless told: runs of one config hash count once (the newest).
    tags = {"embft.role": role, "embft.baseline_key": key, "embft.config_hash": config_hash or uuid.uuid4().hex[:16]}
    if sweep:
        tags["embft.sweep"] = sweep
    run = client.create_run(exp_id, start_time=start_time, tags=tags)
    now = int(time.time() * 1000)
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)) for k, v in params.items()],
    )
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def _ft_params(lr, seed, run_no):
    return {
        "model.name": "bge-small",
        "train.learning_rate": lr,
        "train.seed": seed,
        "train.temperature": 0.02,
        "data.pairing": "same_label",
        # Per-run values that must not become settings.
        "paths.output_dir": f"/tmp/out/{run_no}",
        "optuna.trial": run_no,
        "force": run_no % 2 == 0,
        "eval.cache_dir": f"/tmp/cache/{run_no}",
    }


def _ft_metrics(acc, base=BASELINE, seconds=120.0):
    return {
        "accuracy_cosine": acc,
        "val_accuracy_cosine": acc - 0.01,  # the ranking's score: validation
        "accuracy_cosine_std": 0.01,
        "f1": acc - 0.02,
        "baseline_accuracy_cosine": base,
        "delta_accuracy_cosine": acc - base,
        "train_seconds": seconds,
        "train_queries_per_second": 50.0,
        "train_loss": 0.5,
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """seed_grid: 2 configs x 3 seeds + 1 FAILED + 1 RUNNING; baseline in another experiment."""
    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    grid, bases, other, broken, single = (
        client.create_experiment(n, artifact_location=str(tmp / "art" / n))
        for n in ("seed_grid", "baselines", "other", "broken", "single")
    )
    _run(
        client,
        bases,
        role="baseline",
        sweep="base/1",
        key="k1",
        params={"model.name": "bge-small"},
        metrics={"accuracy_cosine": BASELINE, "accuracy_cosine_std": 0.02, "f1": 0.55},
    )
    for i, ((lr, seed), acc) in enumerate(ACC.items()):
        _run(
            client,
            grid,
            role="finetune",
            params=_ft_params(lr, seed, i),
            metrics=_ft_metrics(acc, seconds=60.0 * (i + 1)),
        )
    _run(client, grid, role="finetune", params=_ft_params("1e-05", 4, 10), metrics={}, status="FAILED")
    _run(
        client, grid, role="finetune", params=_ft_params("2e-05", 4, 11), metrics={"train_loss": 0.9}, status="RUNNING"
    )
    # Another sweep elsewhere: must not leak into selection by sweep tag.
    _run(client, other, role="finetune", sweep="other/1", params=_ft_params("3e-05", 1, 20), metrics=_ft_metrics(0.9))
    _run(
        client,
        broken,
        role="finetune",
        sweep="broken/1",
        params=_ft_params("1e-05", 1, 30),
        metrics={},
        status="FAILED",
    )
    # One run, baseline key without a baseline run: falls back to the logged metric.
    _run(
        client,
        single,
        role="finetune",
        sweep="single/1",
        key="k-missing",
        # MLflow logs the served classifier's model_config (serving.log_models) as run params.
        params={**_ft_params("1e-05", 1, 40), "k": 3, "metric": "cosine", "label_names": "['a']", "batch_size": 64},
        metrics=_ft_metrics(0.65, base=0.58),
    )
    return uri, client


def test_summarize_table(store):
    _, client = store
    df = report.load_runs(client, "seed_grid")
    assert len(df[df["selected"]]) == 8 and len(df[~df["selected"]]) == 1  # + baseline
    table, info = report.summarize(df)

    assert info.settings == ["train.learning_rate"]
    assert list(table.columns) == ["configuration", "train.learning_rate", *report.TABLE_NUMBERS]
    assert list(table["configuration"]) == ["learning_rate=2e-05", "learning_rate=1e-05", "baseline"]
    assert (info.n_used, info.n_skipped) == (6, 2)
    assert info.skipped_by_status == {"FAILED": 1, "RUNNING": 1}
    assert report.used_sentence(info).startswith("used 6 runs, skipped 2: 1 FAILED, 1 RUNNING")
    assert info.baseline_source == "runs" and info.baselines == {"baseline": BASELINE}

    best = table.iloc[0]
    accs = np.array([0.70, 0.66, 0.71])
    assert best["n_seeds"] == 3
    assert best["accuracy_mean"] == pytest.approx(accs.mean())
    assert best["accuracy_std_seeds"] == pytest.approx(accs.std(ddof=1))
    assert best["mteb_std_mean"] == pytest.approx(0.01)
    deltas = accs - BASELINE
    half = stats.t.ppf(0.975, 2) * deltas.std(ddof=1) / math.sqrt(3)
    assert best["delta_mean"] == pytest.approx(deltas.mean())
    assert best["delta_ci95_low"] == pytest.approx(deltas.mean() - half)
    assert best["delta_ci95_high"] == pytest.approx(deltas.mean() + half)
    assert best["train_minutes"] == pytest.approx(np.mean([4, 5, 6]))  # runs 3..5: 60 s * (i+1)
    assert best["train_qps"] == pytest.approx(50.0)

    base = table.iloc[2]
    assert base["accuracy_mean"] == pytest.approx(BASELINE) and base["n_seeds"] == 1
    assert math.isnan(base["delta_mean"])


def test_cli_writes_report(store, tmp_path, capsys):
    uri, _ = store
    rc = report.main(["seed_grid", "--tracking-uri", uri, "--out-dir", str(tmp_path)])
    assert rc == 0
    md, png = tmp_path / "seed_grid" / "report.md", tmp_path / "seed_grid" / "report.png"
    assert png.stat().st_size > 1000
    text = md.read_text()
    assert "used 6 runs, skipped 2: 1 FAILED, 1 RUNNING" in text
    assert "| 1 | 2e-05 | 3 | 0.6800 | 0.6900 | 0.0265 | 0.0100 | +0.0900 |" in text
    assert "![accuracy per configuration](report.png)" in text
    assert SWEEP in text
    out = capsys.readouterr().out
    assert str(md) in out and str(png) in out and "best by val_accuracy_cosine: learning_rate=2e-05" in out


def test_select_by_sweep_tag(store, tmp_path):
    uri, client = store
    df = report.load_runs(client, SWEEP)
    table, info = report.summarize(df)
    assert info.n_used == 6 and info.experiments == ["seed_grid"]
    assert "3e-05" not in set(table["train.learning_rate"])
    rc = report.main([SWEEP, "--tracking-uri", uri, "--out-dir", str(tmp_path)])
    assert rc == 0
    assert (tmp_path / "seed_grid_2026-11-27_00-10-00" / "report.md").exists()
    rc = report.main([SWEEP, "--tracking-uri", uri, "--out-dir", str(tmp_path), "--output-name", "mine"])
    assert rc == 0 and (tmp_path / "mine" / "report.png").exists()


def test_single_seed_and_logged_baseline(store, tmp_path):
    uri, client = store
    table, info = report.summarize(report.load_runs(client, "single"))
    assert info.settings == [] and info.baseline_source == "metric"
    assert "train.temperature" in info.fixed_settings  # a config key; the classifier's params are not
    assert not {"k", "metric", "label_names", "batch_size"} & set(info.fixed_settings)
    assert list(table["configuration"]) == ["all runs", "baseline"]
    row = table.iloc[0]
    assert row["n_seeds"] == 1 and math.isnan(row["accuracy_std_seeds"])
    assert math.isnan(row["delta_ci95_low"]) and row["delta_mean"] == pytest.approx(0.07)
    assert table.iloc[1]["accuracy_mean"] == pytest.approx(0.58)
    assert report.main(["single", "--tracking-uri", uri, "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / "single" / "report.md").read_text()
    assert "| 1 | 1 | 0.6400 | 0.6500 | n/a | 0.0100 | +0.0700 | n/a | 2.00 | 50.00 |" in text
    assert "| **baseline** | (logged) | n/a | 0.5800 |" in text


def test_no_usable_runs(store, tmp_path, capsys):
    uri, _ = store
    for name in ("broken", "no-such-study"):
        assert report.main([name, "--tracking-uri", uri, "--out-dir", str(tmp_path)]) == 1
    assert "no usable runs" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    missing = f"sqlite:///{tmp_path}/nope/mlflow.db"
    assert report.main(["seed_grid", "--tracking-uri", missing, "--out-dir", str(tmp_path)]) == 1


def test_t_interval_hand_computation():
    lo, hi = report.t_interval([0.1, 0.2, 0.4])
    # mean 0.2333, sd 0.15275, t(0.975, 2) = 4.302653
    half = 4.302653 * 0.152753 / math.sqrt(3)
    assert lo == pytest.approx(0.233333 - half, abs=1e-5)
    assert hi == pytest.approx(0.233333 + half, abs=1e-5)
    assert all(math.isnan(v) for v in report.t_interval([0.3]))


def test_pool_studies_with_where(store, tmp_path):
    """Borrow identical runs from another study: 'other' (3e-05) + seed_grid's 2e-05 runs only."""
    uri, client = store
    df = report.load_runs(client, ["other", "seed_grid"], {"train.learning_rate": "2e-05"})
    assert set(df[df["selected"]]["params.train.learning_rate"]) == {"2e-05"}  # where drops 'other'
    df = report.load_runs(client, ["other", "seed_grid"])
    table, info = report.summarize(df)
    assert list(table["train.learning_rate"])[:3] == ["3e-05", "2e-05", "1e-05"]  # + baseline row
    assert info.experiments == ["other", "seed_grid"]
    rc = report.main(
        [
            "seed_grid",
            "other",
            "--where",
            "train.learning_rate=2e-05",
            "--tracking-uri",
            uri,
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert rc == 0
    text = (tmp_path / "seed_grid" / "report.md").read_text()
    assert "# Study report: seed_grid + other" in text and "used 3 runs" in text
    with pytest.raises(SystemExit):
        report.main(["seed_grid", "--where", "nokey", "--tracking-uri", uri])


def test_ranked_on_validation_with_test_beside_it_and_metric_from_eval_settings(tmp_path):
    """The configuration that wins on test but loses on validation is not called the best; a logreg
    study reports accuracy_logreg without being told."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("search", artifact_location=(tmp_path / "a").as_uri())
    scores = {"1e-05": (0.80, 0.70), "2e-05": (0.70, 0.75)}  # lr: (validation, test)
    for run_no, (lr, (val, test)) in enumerate(scores.items()):
        metrics = {**_ft_metrics(test), "val_accuracy_cosine": val, "baseline_val_accuracy_cosine": 0.6}
        _run(
            client,
            exp,
            role="finetune",
            params={**_ft_params(lr, 1, run_no), "eval.method": "knn", "eval.metric": "cosine"},
            metrics=metrics,
        )
    _run(client, exp, role="baseline", params={}, metrics={"accuracy_cosine": BASELINE, "val_accuracy_cosine": 0.6})
    table, info = report.summarize(report.load_runs(client, "search"))
    assert info.ranked_by == "val_accuracy_cosine"
    assert list(table["train.learning_rate"])[:2] == ["1e-05", "2e-05"]
    assert table.iloc[0]["accuracy_mean"] == pytest.approx(0.70)
    assert report.main(["search", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--out-dir", str(tmp_path)]) == 0
    assert "| 1 | 1e-05 | 1 | 0.8000 | 0.7000 |" in (tmp_path / "search" / "report.md").read_text()

    exp2 = client.create_experiment("logreg", artifact_location=(tmp_path / "b").as_uri())
    _run(
        client,
        exp2,
        role="finetune",
        params={**_ft_params("1e-05", 1, 9), "eval.method": "logreg", "eval.metric": "cosine"},
        metrics={"accuracy_logreg": 0.9, "val_accuracy_logreg": 0.85},
    )
    table, info = report.summarize(report.load_runs(client, "logreg"))
    assert info.metric == "accuracy_logreg" and table.iloc[0]["accuracy_mean"] == pytest.approx(0.9)
    with pytest.raises(report.EmbftError, match="accuracy_cosine"):
        report.summarize(report.load_runs(client, "logreg"), "accuracy_cosine")


def test_runs_without_a_validation_score_are_not_ranked_on_test(tmp_path, capsys):
    """Runs from before the validation split: the report shows their test scores but ranks nothing
    and claims no choice (the worse test score appears first, as logged, and gets no rank)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("old", artifact_location=(tmp_path / "a").as_uri())
    for run_no, (lr, test) in enumerate({"2e-05": 0.75, "1e-05": 0.70}.items()):  # newest first: 1e-05
        metrics = {k: v for k, v in _ft_metrics(test).items() if not k.startswith("val_")}
        _run(client, exp, role="finetune", params=_ft_params(lr, 1, run_no), metrics=metrics)
    table, info = report.summarize(report.load_runs(client, "old"))
    assert info.ranked_by is None
    assert list(table["train.learning_rate"])[:2] == ["1e-05", "2e-05"], "not sorted by the test score"
    assert report.main(["old", "--tracking-uri", uri, "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / "old" / "report.md").read_text()
    assert "| - | 1e-05 | 1 | n/a | 0.7000 |" in text and "| - | 2e-05 | 1 | n/a | 0.7500 |" in text
    assert "Ranked by: not ranked" in text and "choices are made on validation" in text
    out = capsys.readouterr().out
    assert "best by" not in out and "not ranked" in out


def test_a_pruned_trial_is_listed_apart_and_never_ranked(tmp_path):
    """A pruned run ends FINISHED with a partial (live) validation score: it must not lead the table."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("search", artifact_location=(tmp_path / "a").as_uri())
    complete = _run(client, exp, role="finetune", params=_ft_params("1e-05", 1, 0), metrics=_ft_metrics(0.70))
    pruned = _run(client, exp, role="finetune", params=_ft_params("2e-05", 1, 1), metrics=_ft_metrics(0.90))
    client.set_tag(pruned, "optuna.pruned", "true")
    table, info = report.summarize(report.load_runs(client, "search"))
    assert info.n_used == 1 and list(table["configuration"])[0] == "all runs"
    assert table.iloc[0]["accuracy_mean"] == pytest.approx(0.70), complete
    assert [k for k in info.skipped_by_status if k.startswith("PRUNED")] and info.n_skipped == 1
    assert "PRUNED" in report.used_sentence(info)


def test_a_run_that_took_its_twins_training_shares_its_baseline(tmp_path):
    """A twin run logged without embft.baseline_key (before twins copied it) is grouped with the run
    that trained, not under a second baseline "(none)"."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("grid", artifact_location=(tmp_path / "a").as_uri())
    _run(client, exp, role="baseline", params={}, metrics={"accuracy_cosine": BASELINE, "val_accuracy_cosine": 0.6})
    trained = _run(
        client,
        exp,
        role="finetune",
        params={**_ft_params("1e-05", 1, 0), "variant.name": "same"},
        metrics=_ft_metrics(0.7),
    )
    twin = _run(
        client,
        exp,
        role="finetune",
        params={**_ft_params("1e-05", 1, 1), "variant.name": "same_nib"},
        metrics=_ft_metrics(0.7),
    )
    client.delete_tag(twin, "embft.baseline_key")
    client.set_tag(twin, "embft.trained_as", trained)
    client.set_tag(twin, "embft.twin_reason", "one query per step")
    table, info = report.summarize(report.load_runs(client, "grid"))
    assert list(info.baselines) == ["baseline"], info.baselines
    assert (table["configuration"] == "baseline").sum() == 1


def test_a_forced_rerun_replaces_its_configs_old_run_instead_of_adding_a_seed(tmp_path):
    """force=true leaves two FINISHED runs of one config (tests/test_promises.py shows it through the
    command): the report counts the config once, as its newest run, and says why the other was skipped."""
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("forced", artifact_location=str(tmp_path / "art"))
    _run(client, exp, role="baseline", params={"model.name": "bge-small"}, metrics={"accuracy_cosine": BASELINE})
    first = int(time.time() * 1000)
    for seed, acc in ((1, 0.70), (2, 0.66)):
        _run(
            client,
            exp,
            role="finetune",
            params=_ft_params("2e-05", seed, seed),
            metrics=_ft_metrics(acc),
            config_hash=f"s{seed}",
            start_time=first,
        )
    rerun = dict(params=_ft_params("2e-05", 1, 9), metrics=_ft_metrics(0.60), config_hash="s1")
    _run(client, exp, role="finetune", **rerun, start_time=first + 1000)  # the rerun starts later

    table, info = report.summarize(report.load_runs(client, "forced"))
    (row,) = table[table["configuration"] != "baseline"].to_dict("records")
    assert row["n_seeds"] == 2, "the rerun of seed 1 replaces its first run; it is not a third seed"
    assert sorted(info.accuracies[row["configuration"]]) == [0.60, 0.66], "the newest run of seed 1 counts"
    assert info.n_used == 2 and info.n_skipped == 1 and info.skipped_by_status == {report.summary.SUPERSEDED: 1}
    assert "1 FINISHED, superseded by a newer FINISHED run of the same config" in report.used_sentence(info)
