"""`embft report` across datasets (issue 25) and with the trainers' extra scores (issue 24), on small
synthetic MLflow stores: the matrix against hand-computed means and t intervals, the win/tie/loss
counts, the conclusion sentence, the plots, the collapsed fixed settings."""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from embft import report
from embft.report import datasets

T_975_2 = 4.302652729911275  # t(0.975, 2 dof): three seeds
T_975_1 = 12.706204736174707  # t(0.975, 1 dof): two seeds
SEEDS = (1, 2, 3)
# Untrained model per dataset: (validation, test).
BASE = {"ag_news": (0.70, 0.72), "emotion": (0.40, 0.42)}
# Validation delta per (variant, dataset), one per seed. no_same on emotion spans 0 (a tie) and is
# the best there, so "same is best" holds on ag_news only.
VAL_DELTA = {
    ("same", "ag_news"): [0.05, 0.06, 0.04],  # win
    ("same", "emotion"): [0.01, 0.02, 0.015],  # win
    ("no_same", "ag_news"): [-0.02, -0.03, -0.025],  # loss
    ("no_same", "emotion"): [0.04, -0.01, 0.03],  # tie: mean +0.02, interval spans 0
}
TEST_SHIFT = -0.005  # test delta = validation delta - 0.005


def _run(client, exp_id, *, role, params, metrics, key, tags=None):
    run = client.create_run(exp_id, tags={"embft.role": role, "embft.baseline_key": key, **(tags or {})})
    now = int(time.time() * 1000)
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)) for k, v in params.items()],
    )
    client.set_terminated(run.info.run_id, "FINISHED")


def _data_params(data):
    # Settings that follow the dataset: its folder (relative) and name are no configuration axis.
    return {"data.name": data, "data.local_dir": f"../shared/data/{data}", "data.label_column": "label"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("datasets", artifact_location=(tmp / "a").as_uri())
    for data, (base_val, base_test) in BASE.items():
        _run(
            client,
            exp,
            role="baseline",
            key=f"k-{data}",
            params={"model.name": "bge-small", **_data_params(data)},
            metrics={"val_accuracy_cosine": base_val, "accuracy_cosine": base_test},
        )
    for (variant, data), deltas in VAL_DELTA.items():
        base_val, base_test = BASE[data]
        for seed, d in zip(SEEDS, deltas):
            metrics = {
                "val_accuracy_cosine": base_val + d,
                "accuracy_cosine": base_test + d + TEST_SHIFT,
                "delta_accuracy_cosine": d + TEST_SHIFT,
                "train_seconds": 60.0,  # equal: no accuracy-vs-seconds plot
            }
            if data == "ag_news":  # emotion's validation delta comes from its baseline run
                metrics["delta_val_accuracy_cosine"] = d
            _run(
                client,
                exp,
                role="finetune",
                key=f"k-{data}",
                tags={"data": data},
                params={
                    "model.name": "bge-small",
                    "train.seed": seed,
                    "train.temperature": 0.02,
                    "variant.name": variant,
                    "paths.output_dir": f"/tmp/out/{variant}/{data}/{seed}",
                    **_data_params(data),
                },
                metrics=metrics,
            )
    return uri, client


def _interval(values, t):
    x = np.asarray(values)
    half = t * x.std(ddof=1) / math.sqrt(len(x))
    return x.mean() - half, x.mean() + half


def test_matrix_numbers_counts_and_conclusion(store):
    _, client = store
    table, info = report.summarize(report.load_runs(client, "datasets"))
    assert datasets.is_cross_dataset(info)
    matrix = datasets.dataset_matrix(info)
    assert matrix.datasets == ["ag_news", "emotion"]
    assert matrix.settings == ["variant.name"], "data.local_dir follows the dataset: not a configuration"
    assert list(matrix.summary["configuration"]) == ["variant=same", "variant=no_same"]

    for (variant, data), deltas in VAL_DELTA.items():
        cell = matrix.cells[(matrix.cells["configuration"] == f"variant={variant}") & (matrix.cells["dataset"] == data)]
        assert len(cell) == 1
        cell = cell.iloc[0]
        low, high = _interval(deltas, T_975_2)
        assert cell["n_seeds"] == 3
        assert cell["val_delta_mean"] == pytest.approx(np.mean(deltas))
        assert (cell["val_delta_ci95_low"], cell["val_delta_ci95_high"]) == pytest.approx((low, high))
        assert cell["delta_mean"] == pytest.approx(np.mean(deltas) + TEST_SHIFT)
    tie = matrix.cells[(matrix.cells["configuration"] == "variant=no_same") & (matrix.cells["dataset"] == "emotion")]
    assert tie.iloc[0]["val_delta_ci95_low"] < 0 < tie.iloc[0]["val_delta_ci95_high"]
    assert tie.iloc[0]["outcome"] == "tie"

    same, no_same = (matrix.summary.iloc[i] for i in (0, 1))
    assert (same["win"], same["tie"], same["loss"]) == (2, 0, 0)
    assert (no_same["win"], no_same["tie"], no_same["loss"]) == (0, 1, 1)
    assert same["val_delta_mean"] == pytest.approx((0.05 + 0.015) / 2)
    assert no_same["val_delta_mean"] == pytest.approx((-0.025 + 0.02) / 2)
    assert same["delta_mean"] == pytest.approx((0.05 + 0.015) / 2 + TEST_SHIFT)
    assert matrix.baselines["emotion"] == pytest.approx(BASE["emotion"])

    assert matrix.conclusion == (
        "The best configuration on validation, `variant=same` (mean delta +0.0325 over 2 datasets), is the best "
        "on 1 of 2 datasets: not on emotion (`variant=no_same` +0.0200 vs +0.0150)."
    )
    compared = datasets.dataset_matrix(info, ("variant=same", "variant=no_same"))
    assert compared.conclusion.startswith(
        "`variant=same` beats `variant=no_same` on validation on 1 of 2 datasets: not on emotion. Paired by seed"
    )
    # Paired by seed: same's validation score minus no_same's, seed by seed.
    paired = datasets.paired_differences(compared, "variant=same", "variant=no_same").set_index("dataset")
    for data, outcome in (("ag_news", "win"), ("emotion", "tie")):
        diff = [a - b for a, b in zip(VAL_DELTA[("same", data)], VAL_DELTA[("no_same", data)])]
        low, high = _interval(diff, T_975_2)
        assert paired.loc[data, "n_seeds"] == 3
        assert paired.loc[data, "mean"] == pytest.approx(np.mean(diff))
        assert (paired.loc[data, "ci95_low"], paired.loc[data, "ci95_high"]) == pytest.approx((low, high))
        assert paired.loc[data, "outcome"] == outcome
        assert f"{data} {np.mean(diff):+.4f} [{low:+.4f}, {high:+.4f}] {outcome}" in compared.conclusion


def test_compare_says_trend_when_a_paired_interval_spans_zero() -> None:
    """A higher mean on every dataset is not "holds on each" while a paired interval spans 0."""
    import pandas as pd

    scores = {  # (configuration, dataset) -> validation score per seed 1, 2, 3
        ("A", "ag_news"): [0.80, 0.81, 0.82],
        ("B", "ag_news"): [0.75, 0.755, 0.77],  # A ahead on every seed: win
        ("A", "emotion"): [0.40, 0.36, 0.41],
        ("B", "emotion"): [0.35, 0.39, 0.37],  # A ahead on mean, not on seed 2: tie
    }
    runs = pd.DataFrame(
        [
            {"configuration": c, "dataset": d, "seed": str(seed), "val_accuracy": v}
            for (c, d), values in scores.items()
            for seed, v in zip(SEEDS, values)
        ]
    )
    cells = runs.groupby(["configuration", "dataset"], as_index=False)["val_accuracy"].mean()
    cells = cells.rename(columns={"val_accuracy": "val_delta_mean"})
    matrix = datasets.DatasetMatrix("accuracy_cosine", ["ag_news", "emotion"], [], cells, pd.DataFrame(), {}, "", runs)
    text = datasets._compare_sentence(matrix, "A", "B")
    assert text.startswith(
        "`A` beats `B` on validation on mean on every dataset (2), but the paired interval spans or lies "
        "below 0 on emotion: the conclusion holds there only as a trend."
    )
    assert "ag_news +0.0517 [" in text and "] win; emotion +0.0200 [" in text and text.endswith("] tie.")


def test_conclusion_that_holds_on_every_dataset(store):
    """Without no_same's emotion runs (where it beat same), same is the best on each dataset; a
    configuration missing on a dataset gets "-" there and counts only the datasets it ran on."""
    _, client = store
    df = report.load_runs(client, "datasets")
    emotion_no_same = (df["params.data.name"] == "emotion") & (df["params.variant.name"] == "no_same")
    _, info = report.summarize(df[~emotion_no_same])
    matrix = datasets.dataset_matrix(info)
    assert matrix.conclusion.endswith("is also the best on every dataset: the conclusion holds on each.")
    rendered = datasets.format_matrix(matrix)
    assert "| `variant=no_same` | -0.0250 [" in rendered
    assert "; test -0.0300 | - | -0.0250 | 0 / 0 / 1 | -0.0300 |" in rendered


def test_cli_writes_matrix_heatmap_and_collapsed_fixed_settings(store, tmp_path, capsys):
    uri, _ = store
    assert report.main(["datasets", "--tracking-uri", uri, "--out-dir", str(tmp_path)]) == 0
    out = tmp_path / "datasets"
    text = (out / "report.md").read_text()
    low, high = _interval(VAL_DELTA[("no_same", "emotion")], T_975_2)
    tie_cell = f"+0.0200 [{low:+.4f}, {high:+.4f}]; test +0.0150"
    assert "## Across datasets" in text
    assert "| configuration | ag_news | emotion | mean val delta | wins / ties / losses | mean test delta |" in text
    row = next(line for line in text.splitlines() if line.startswith("| `variant=no_same` |"))
    assert tie_cell in row and row.endswith("| -0.0025 | 0 / 1 / 1 | -0.0075 |")
    assert "| untrained (validation / test) | 0.7000 / 0.7200 | 0.4000 / 0.4200 |" in text
    assert "**Conclusion:** The best configuration on validation, `variant=same`" in text
    assert "![validation delta per configuration and dataset](report_datasets.png)" in text
    # Today's table per dataset, ranked within it, with its own baseline row.
    emotion = text.split("### emotion")[1]
    assert re.search(r"\| 1 \| no_same \| 3 \| 0\.4200 \|", emotion)
    assert (out / "report_datasets.png").stat().st_size > 5000
    assert (out / "report.png").exists()
    assert not (out / "accuracy_vs_train_seconds.png").exists(), "every run trained 60 s"

    # The fixed settings: a table in a collapsed block, per-run folders left out.
    assert "<details><summary>Fixed settings (3)</summary>\n\n| setting | value |\n| --- | --- |\n" in text
    assert "| `model.name` | bge-small |\n| `train.temperature` | 0.02 |\n\n</details>" in text
    assert "- Fixed settings: `" not in text and "/tmp/out" not in text
    assert "variant=same" in capsys.readouterr().out


# Issue 24: trainers as arms of one grid, one dataset. (backend, loss) -> seconds, served logreg per seed.
ARMS = {
    ("flagembedding", "stock"): (120.0, [0.80, 0.82]),
    ("sentence_transformers", "supcon"): (40.0, [0.84, 0.85]),
    ("setfit", "cosine"): (400.0, [0.82, 0.85]),
}


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainers")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("trainers", artifact_location=(tmp / "a").as_uri())
    _run(client, exp, role="baseline", key="k", params={}, metrics={"val_accuracy_cosine": 0.7, "accuracy_cosine": 0.7})
    for (backend, loss), (seconds, served) in ARMS.items():
        for seed, acc in zip((1, 2), served):
            metrics = {
                "val_accuracy_cosine": acc - 0.01,
                "accuracy_cosine": acc - 0.02,
                "val_served_accuracy_logreg": acc,
                "served_accuracy_logreg": acc - 0.005,
                "train_seconds": seconds + seed,
                "train_labelled_texts": 814.0 if backend == "flagembedding" else 100.0,
            }
            if backend == "setfit":
                metrics["setfit_head_accuracy"] = acc + 0.01
            params = {"data.name": "ag_news", "train.seed": seed, "train.backend": backend, "train.loss": loss}
            _run(client, exp, role="finetune", key="k", tags={"data": "ag_news"}, params=params, metrics=metrics)
    return uri, client


def test_trainer_arms_extra_scores_and_accuracy_vs_seconds(trainers, tmp_path):
    uri, client = trainers
    table, info = report.summarize(report.load_runs(client, "trainers"))
    assert info.settings == ["train.backend", "train.loss"]
    assert info.extra_scores == ["val_served_accuracy_logreg", "served_accuracy_logreg", "setfit_head_accuracy"]
    assert not datasets.is_cross_dataset(info)
    st = table[table["configuration"] == "backend=sentence_transformers, loss=supcon"].iloc[0]
    low, high = _interval([0.84, 0.85], T_975_1)
    assert st["val_served_accuracy_logreg_mean"] == pytest.approx(0.845)
    assert (st["val_served_accuracy_logreg_ci95_low"], st["val_served_accuracy_logreg_ci95_high"]) == pytest.approx(
        (low, high)
    )
    assert st["train_labelled_texts_mean"] == 100 and math.isnan(st["setfit_head_accuracy_mean"])

    assert report.main(["trainers", "--tracking-uri", uri, "--out-dir", str(tmp_path)]) == 0
    out = tmp_path / "trainers"
    text = (out / "report.md").read_text()
    assert (
        "| train min | labelled texts | train q/s | validation served logreg | test served logreg | test SetFit head |"
        in text
    )
    row = next(line for line in text.splitlines() if "| sentence_transformers | supcon |" in line)
    assert row.startswith("| 1 |")  # best validation kNN score
    assert f"| 0.8450 [{low:.4f}, {high:.4f}] |" in row and row.endswith("| n/a |")
    assert "| 0.69 | 100 |" in row  # 41.5 s, 100 labelled texts
    assert "## Across datasets" not in text and not (out / "report_datasets.png").exists()
    assert "![validation accuracy against training seconds](accuracy_vs_train_seconds.png)" in text
    assert (out / "accuracy_vs_train_seconds.png").stat().st_size > 5000


def test_points_are_labelled_by_the_setting_that_tells_the_configurations_apart():
    import pandas as pd

    from embft.report.labels import distinct_settings
    from embft.report.summary import config_label

    def distinct_labels(rows: list[dict]) -> list[str]:
        frame = pd.DataFrame(rows).assign(_label=[config_label(r) for r in rows])
        keys = distinct_settings(frame, list(rows[0]), "_label")
        return [config_label({k: r[k] for k in keys}) for r in rows]

    rows = [
        {"train.backend": "setfit", "train.loss": "cosine_similarity", "train.lr": "2e-05"},
        {"train.backend": "st", "train.loss": "supcon", "train.lr": "2e-05"},
        {"train.backend": "st", "train.loss": "contrastive", "train.lr": "1e-4"},
    ]
    assert distinct_labels(rows) == ["loss=cosine_similarity", "loss=supcon", "loss=contrastive"]
    # No single setting tells them apart, nor two of three: the whole label.
    rows = [{"lr": 1, "seed": 1}, {"lr": 1, "seed": 2}, {"lr": 2, "seed": 1}]
    assert distinct_labels(rows) == ["lr=1, seed=1", "lr=1, seed=2", "lr=2, seed=1"]
    # Two settings where one is not enough.
    rows = [
        {"train.loss": "stock", "variant.name": "same", "train.seed": 1},
        {"train.loss": "stock", "variant.name": "no_same", "train.seed": 1},
        {"train.loss": "supcon", "variant.name": "same", "train.seed": 1},
    ]
    assert distinct_labels(rows) == [
        "loss=stock, variant=same",
        "loss=stock, variant=no_same",
        "loss=supcon, variant=same",
    ]
