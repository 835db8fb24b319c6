"""The report's pictures say what they show (issue 33): on small MLflow stores shaped like the trainers and
datasets studies, every configuration is named by its arm (its embft.arm tag, the arm= of its run name, or
its backend and loss), labels are distinct, never on top of each other and never cut off, and a twin row
(a run that took its twin's training) is shown once with a note."""

from __future__ import annotations

import itertools
import time

import pytest
from matplotlib.text import Text
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from embft import report
from embft.report import datasets, rendering

SEEDS = (1, 2, 3)
LABEL_NAMES = '["World: news about world politics and international affairs", "Sports: teams, players, matches"]'
# The trainers study's arms: backend, loss, variant, (validation score, train seconds) per seed. Two arms
# land on the same point (as batch_hard_triplet and batch_hard_soft_margin_triplet did), two sit close.
ARMS = {
    "setfit": ("setfit", "cosine_similarity", "same", [(0.837, 280), (0.84, 290), (0.835, 300)]),
    "supcon": ("sentence_transformers", "supcon", "same", [(0.836, 9), (0.837, 9.2), (0.838, 8.9)]),
    "batch_hard_triplet": ("sentence_transformers", "batch_hard_triplet", "same", [(0.818, 6.5)] * 3),
    "batch_hard_soft_margin_triplet": (
        "sentence_transformers",
        "batch_hard_soft_margin_triplet",
        "same",
        [(0.818, 6.5)] * 3,
    ),
    "batch_semi_hard_triplet": ("sentence_transformers", "batch_semi_hard_triplet", "same", [(0.831, 5.6)] * 3),
    "fe_study": ("flagembedding", "stock", "same", [(0.79, 50), (0.80, 52), (0.795, 54)]),
    "fe_fast": ("flagembedding", "groupwise", "same_nib", [(0.80, 23), (0.81, 23.5), (0.805, 23.2)]),
    "model2vec": ("model2vec", "batch_all_triplet", "same", [(0.70, 3.1), (0.71, 3.0), (0.705, 3.2)]),
    # no training at all: 0 s, which a log axis cannot show
    "untrained": ("untrained", "none", "same", [(0.74, 0.0)] * 3),
}


def _run(client, exp_id, *, role, params, metrics, key="k", tags=None, run_name=None) -> str:
    run = client.create_run(
        exp_id, tags={"embft.role": role, "embft.baseline_key": key, **(tags or {})}, run_name=run_name
    )
    now = int(time.time() * 1000)
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)) for k, v in params.items()],
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _params(backend, loss, variant, seed, data="ag_news"):
    return {
        "model.name": "minilm",
        "train.backend": backend,
        "train.loss": loss,
        "train.seed": seed,
        "variant.name": variant,
        # FlagEmbedding's setting, logged by every run: true for supcon too (the label it once shared)
        "variant.same_dataset_within_batch": variant in ("same", "same_nib"),
        "variant.no_in_batch_neg": variant.endswith("_nib"),
        "data.name": data,
        "data.label_names": LABEL_NAMES if data == "ag_news" else '["anger: a message expressing anger"]',
    }


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plots")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    art = (tmp / "a").as_uri()

    trainers = client.create_experiment("trainers", artifact_location=art)
    _run(client, trainers, role="baseline", params={"model.name": "minilm"}, metrics={"accuracy_cosine": 0.75})
    for i, (arm, (backend, loss, variant, points)) in enumerate(ARMS.items()):
        for seed, (val, secs) in zip(SEEDS, points):
            # Half the arms as newer runs log them (the embft.arm tag), half as the committed store has
            # them (only the run name, Hydra's override_dirname, says the arm).
            tagged = i % 2 == 0
            _run(
                client,
                trainers,
                role="finetune",
                params=_params(backend, loss, variant, seed),
                metrics={"val_accuracy_cosine": val, "accuracy_cosine": val + 0.005, "train_seconds": secs},
                tags={"embft.arm": arm} if tagged else None,
                run_name=None if tagged else f"arm={arm},train.seed={seed}",
            )

    data_exp = client.create_experiment("datasets", artifact_location=art)
    gains = {"same": 0.05, "no_same": 0.01}
    for data in ("ag_news", "emotion"):
        _run(
            client,
            data_exp,
            role="baseline",
            key=data,
            params={"model.name": "minilm", "data.name": data},
            metrics={"val_accuracy_cosine": 0.5, "accuracy_cosine": 0.5},
        )
        for seed in SEEDS:
            _run(
                client,
                data_exp,
                role="finetune",
                key=data,
                params={**_params("sentence_transformers", "supcon", "same", seed, data), "train.learning_rate": 3e-4},
                metrics={"val_accuracy_cosine": 0.6 + seed / 100, "accuracy_cosine": 0.6, "train_seconds": 7.0},
                run_name=f"arm=supcon,data={data},train.seed={seed}",
            )
            for variant, gain in gains.items():
                fe = {**_params("flagembedding", "stock", variant, seed, data), "train.learning_rate": 1e-5}
                metrics = {"val_accuracy_cosine": 0.5 + gain + seed / 200, "accuracy_cosine": 0.5 + gain}
                trained = _run(
                    client,
                    data_exp,
                    role="finetune",
                    key=data,
                    params=fe,
                    metrics={**metrics, "train_seconds": 40.0},
                    run_name=f"data={data},train.seed={seed},variant={variant}",
                )
                # its _nib twin: the same training (train.reuse_twin), so the same scores
                _run(
                    client,
                    data_exp,
                    role="finetune",
                    key=data,
                    params=_params("flagembedding", "stock", f"{variant}_nib", seed, data)
                    | {"train.learning_rate": 1e-5},
                    metrics={**metrics, "train_seconds": 40.0},
                    tags={"embft.trained_as": trained, "embft.twin_reason": "no negatives to drop"},
                    run_name=f"data={data},train.seed={seed},variant={variant}_nib",
                )
    return client


def _drawn(axis, minor=False) -> list[Text]:
    """The tick labels an axis draws: those of ticks inside its view (a log axis keeps others, unseen)."""
    low, high = sorted(axis.get_view_interval())
    ticks = axis.get_minorticklocs() if minor else axis.get_majorticklocs()
    labels = axis.get_ticklabels(minor=minor)
    return [t for loc, t in zip(ticks, labels) if low - 1e-9 <= loc <= high + 1e-9]


def _texts(fig) -> list[tuple[str, object]]:
    """Every text the figure draws (titles, axis labels, tick labels, legends, annotations) with its box."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = list(fig.texts)
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            texts += _drawn(axis) + _drawn(axis, minor=True)
        if ax.get_legend():
            texts += ax.get_legend().get_texts()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text().strip()]


def _assert_all_on_canvas(fig):
    canvas = fig.bbox
    for text, box in _texts(fig):
        assert (
            box.x0 >= canvas.x0 - 1 and box.y0 >= canvas.y0 - 1 and box.x1 <= canvas.x1 + 1 and box.y1 <= canvas.y1 + 1
        ), f"cut off: {text!r} at {box} on a canvas {canvas}"


def _assert_apart(labelled: list[tuple[str, object]]):
    for (a, box_a), (b, box_b) in itertools.combinations(labelled, 2):
        assert not box_a.overlaps(box_b), f"{a!r} and {b!r} print on top of each other"


def _configuration_labels(fig) -> list[tuple[str, object]]:
    """The per-configuration figure's labels with their boxes: a row each, or a column each where they fit."""
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()

    def names(axis_labels) -> list:
        ticks = [t for t in axis_labels if t.get_text()]
        return [] if all(t.get_text().replace(".", "", 1).replace("\u2212", "").isdigit() for t in ticks) else ticks

    ticks = names(ax.get_yticklabels()) or names(ax.get_xticklabels())
    return [(t.get_text(), t.get_window_extent(renderer)) for t in ticks if t.get_text()]


def _assert_off_the_bars(ax, labelled: list[tuple[str, object]]):
    """No label covers an error bar (a label over its own arm's bar hides where the interval ends)."""
    from matplotlib.transforms import Bbox

    for bars in ax.containers:
        for lines in bars.lines[2]:
            for segment in lines.get_segments():
                (x0, y0), (x1, y1) = ax.transData.transform(segment)
                bar = Bbox([[min(x0, x1) - 1, min(y0, y1) - 1], [max(x0, x1) + 1, max(y0, y1) + 1]])
                for text, box in labelled:
                    assert not box.overlaps(bar), f"{text!r} covers an error bar at {bar}"


def test_trainers_points_are_named_by_their_arm_and_never_overlap(stores, tmp_path):
    table, info = report.summarize(report.load_runs(stores, "trainers"))
    fig = rendering.seconds_figure(info, "trainers")
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labelled = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts]
    assert sorted(text for text, _ in labelled) == sorted(ARMS), "each arm once, by its name (tag or run name)"
    assert ax.get_xscale() == "symlog", "0 s to ~300 s: log above the fastest trained arm, the untrained at 0"
    fig.canvas.draw()
    ticks = [t.get_text() for t in _drawn(ax.xaxis) + _drawn(ax.xaxis, minor=True) if t.get_text()]
    assert ticks and not any("times" in t or "^" in t for t in ticks), f"seconds as numbers (20), not 2x10^1: {ticks}"
    _assert_apart(labelled)
    _assert_off_the_bars(ax, labelled)
    _assert_all_on_canvas(fig)
    assert rendering.save(fig, tmp_path / "seconds.png").stat().st_size > 5000

    fig = rendering.accuracy_figure(table, info, "trainers")
    ticks = _configuration_labels(fig)
    assert sorted(text.replace("\n", "") for text, _ in ticks) == sorted(ARMS)
    _assert_apart(ticks)
    _assert_all_on_canvas(fig)
    rendering.save(fig, tmp_path / "report.png")


def test_dataset_rows_are_named_by_arm_and_twins_show_once(stores, tmp_path):
    table, info = report.summarize(report.load_runs(stores, "datasets"))
    matrix = datasets.dataset_matrix(info)
    assert len(matrix.summary) == 5, "the table keeps every configuration, twins too"
    fig = datasets.heatmap_figure(matrix, "datasets")
    rows = [t for t in fig.axes[0].get_yticklabels() if t.get_text()]
    names = [t.get_text().replace("\n", " ") for t in rows]
    assert names == [
        "supcon",
        "fe same (also fe same_nib, which took its training)",
        "fe no_same (also fe no_same_nib, which took its training)",
    ], "arm names, not `...et_within_batch=True`; a twin's row folded into the row it took its training from"
    fig.canvas.draw()
    _assert_apart([(t.get_text(), t.get_window_extent(fig.canvas.get_renderer())) for t in rows])
    _assert_all_on_canvas(fig)
    assert datasets.plot(matrix, "datasets", tmp_path / "report_datasets.png").stat().st_size > 5000

    fig = rendering.accuracy_figure(table, info, "datasets")
    _assert_apart(_configuration_labels(fig))
    ticks = [text.replace("\n", " ") for text, _ in _configuration_labels(fig)]
    assert sorted(ticks) == [
        "fe no_same, data=ag_news (also fe no_same_nib, which took its training)",
        "fe no_same, data=emotion (also fe no_same_nib, which took its training)",
        "fe same, data=ag_news (also fe same_nib, which took its training)",
        "fe same, data=emotion (also fe same_nib, which took its training)",
        "supcon, data=ag_news",
        "supcon, data=emotion",
    ], "per dataset: the arm and the dataset, never its label names"
    legend = sorted(t.get_text() for t in fig.axes[0].get_legend().get_texts())
    assert "baseline (ag_news) (0.5000)" in legend and "baseline (emotion) (0.5000)" in legend
    _assert_all_on_canvas(fig)
    fig.savefig(tmp_path / "report.png")


def test_a_run_without_arm_or_tag_is_named_by_backend_and_loss():
    from embft.report.labels import derived_arm, run_arm

    assert run_arm("fe_fast", "arm=supcon,train.seed=1", {}) == "fe_fast", "the tag first"
    assert run_arm(None, "train.seed=1,arm=supcon", {}) == "supcon"
    assert derived_arm({"train.backend": "sentence_transformers", "train.loss": "contrastive"}) == "contrastive"
    assert derived_arm({"train.backend": "setfit", "train.loss": "cosine_similarity"}) == "setfit"
    assert derived_arm({"train.backend": "flagembedding", "train.loss": "stock", "variant.name": "same"}) == "fe same"
    assert derived_arm({"train.loss": "groupwise", "variant.name": "same_nib"}) == "fe groupwise same_nib"


def test_points_too_close_for_labels_are_named_in_a_legend(tmp_path):
    """Eleven arms on one spot (as the MiniLM arms sit on the serving axis): no label covers another, so the
    panel names them in a legend beside it, each once, each its own colour, all on the canvas."""
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("crowded", artifact_location=(tmp_path / "a").as_uri())
    _run(client, exp, role="baseline", params={"model.name": "minilm"}, metrics={"accuracy_cosine": 0.75})
    arms = [f"arm_{i:02d}" for i in range(11)] + ["far"]
    for i, arm in enumerate(arms):
        for seed in SEEDS:
            val = 0.70 if arm == "far" else 0.80 + i / 2000 + (seed - 2) * 0.03  # wide intervals: a tall axis
            _run(
                client,
                exp,
                role="finetune",
                params=_params("sentence_transformers", f"loss_{i}", "same", seed),
                metrics={
                    "val_accuracy_cosine": val,
                    "accuracy_cosine": 0.8,
                    "train_seconds": 300 if arm == "far" else 10 + i / 50,
                },
                tags={"embft.arm": arm},
            )
    _, info = report.summarize(report.load_runs(client, "crowded"))
    fig = rendering.seconds_figure(info, "crowded")
    ax = fig.axes[0]
    assert not ax.texts, "no label beside a point where they would cover each other"
    legend = ax.get_legend()
    assert sorted(t.get_text() for t in legend.get_texts()) == arms
    from matplotlib.colors import to_hex

    colours = {to_hex(bars.lines[0].get_color()) for bars in ax.containers}
    assert len(colours) == len(arms), "each arm its own colour"
    _assert_all_on_canvas(fig)


def test_a_search_grid_too_large_for_colours_is_told_apart_by_style(tmp_path):
    """24 configurations (6 losses x 2 learning rates x 2 batch sizes, as experiment=trainers_search): 20
    colours would repeat, so colour names the loss, the marker the learning rate, hollow or filled the
    batch size; every configuration its own look, the legend naming each value."""
    import matplotlib.colors

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("search", artifact_location=(tmp_path / "a").as_uri())
    _run(client, exp, role="baseline", params={"model.name": "minilm"}, metrics={"accuracy_cosine": 0.75})
    losses = [f"loss_{i}" for i in range(6)]
    for i, (loss, lr, batch) in enumerate(itertools.product(losses, (1e-4, 3e-4), (16, 32))):
        params = {**_params("sentence_transformers", loss, "same", 42), "train.learning_rate": lr}
        params["train.per_device_train_batch_size"] = batch
        _run(
            client,
            exp,
            role="finetune",
            params=params,
            metrics={"val_accuracy_cosine": 0.80 + i / 1000, "accuracy_cosine": 0.8, "train_seconds": 10 + i % 3},
        )
    _, info = report.summarize(report.load_runs(client, "search"))
    fig = rendering.seconds_figure(info, "search")
    ax = fig.axes[0]
    looks = set()
    for bars in ax.containers:
        line = bars.lines[0]
        looks.add(
            (matplotlib.colors.to_hex(line.get_color()), line.get_marker(), line.get_markerfacecolor() == "white")
        )
    assert len(ax.containers) == 24 and len(looks) == 24, "each configuration its own colour, marker and fill"
    assert {matplotlib.colors.to_hex(c) for c, _, _ in looks} == {matplotlib.colors.to_hex(f"C{i}") for i in range(6)}
    legend = sorted(t.get_text() for t in ax.get_legend().get_texts())
    assert legend == sorted(
        [f"loss={loss}" for loss in losses]
        + [
            "learning_rate=0.0001",
            "learning_rate=0.0003",
            "per_device_train_batch_size=16",
            "per_device_train_batch_size=32",
        ]
    )
    assert not ax.texts, "no label beside a point"
    _assert_all_on_canvas(fig)

    table, info = report.summarize(report.load_runs(client, "search"))
    fig = rendering.accuracy_figure(table, info, "search")
    labels = _configuration_labels(fig)
    assert len(labels) == 24, "a label per configuration"
    _assert_apart(labels)
    _assert_all_on_canvas(fig)
