"""A champion that means something (issue 34): every fine-tuned run carries its scoring identity, and
"best" (tracking.log_model=best, the registry's champion) compares only runs that share it, so a study
over several datasets gets one champion per dataset, never the easiest dataset's run for all."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from conftest import make_tiny_bert
from embft import names
from test_data import synthetic, write


def _parts(compose, folder, overrides=()):
    from embft.data import load_splits
    from embft.encoding.encoders import EncodeSettings
    from embft.evaluation.scoring_id import scoring_parts

    cfg = compose(["data=local", f"data.local_dir={folder}", "eval.max_validation_rows=10", *overrides])
    encode = EncodeSettings(precision=str(cfg.eval.precision).replace("auto", "fp32"), max_seq_length=64)
    return scoring_parts(cfg, load_splits(cfg.data), encode)


def test_the_scoring_identity_changes_with_what_is_scored_and_not_with_what_is_chosen(compose, tmp_path):
    from embft.evaluation.scoring_id import scoring_id

    folder = write(tmp_path / "a", synthetic(n_per_class=30), synthetic(seed=1))
    base = _parts(compose, folder)
    assert base["dataset"] == "local" and int(base["validation_rows"]) <= 10
    assert base["budget"] == "max_train_queries=100"
    same = ["train.learning_rate=3e-5", "train.seed=7", "variant=no_same", "model=bge_small", "train=fast"]
    assert scoring_id(_parts(compose, folder, same)) == scoring_id(base), "what a search chooses among"
    other = write(tmp_path / "b", synthetic(n_per_class=30, seed=5), synthetic(seed=1))
    for changed, part in (
        (_parts(compose, other), "data_fingerprint"),  # another dataset's content
        (_parts(compose, folder, ["data.name=trec_copy"]), "dataset"),
        (_parts(compose, folder, ["eval.max_validation_rows=12"]), "validation_rows"),
        (_parts(compose, folder, ["eval.seed=3"]), "validation_fingerprint"),  # other capped rows
        (_parts(compose, folder, ["data.seed=3"]), "data_fingerprint"),  # another hold-out
        (_parts(compose, folder, ["eval.k=5"]), "evaluation"),
        (_parts(compose, folder, ["train.max_train_queries=50"]), "budget"),
    ):
        assert changed[part] != base[part] and scoring_id(changed) != scoring_id(base), part


def _dataset(folder: Path, easy: bool, seed: int) -> Path:
    """Four classes; `easy`: each text repeats its class's word, else the labels are shuffled against the texts."""
    words = np.array(["alpha", "bravo", "charlie", "delta"])
    train, test = synthetic(n_per_class=40, seed=seed), synthetic(n_per_class=10, seed=seed + 1)
    rng = np.random.default_rng(seed)
    for frame in (train, test):
        frame["text"] = [f"{' '.join([words[y]] * 4)} {t}" for y, t in zip(frame["label"], frame["text"])]
        if not easy:
            frame["label"] = rng.permutation(frame["label"].to_numpy())
    return write(folder, train, test)


@pytest.mark.slow  # a 4-job grid on a tiny BERT
def test_a_study_over_two_datasets_gets_a_champion_and_a_logged_leader_per_dataset(tmp_path):
    """experiment=seed_grid_datasets in small: two datasets x two seeds. The easy dataset's runs score
    far higher; the hard dataset still gets its own champion and its leader's model."""
    data = tmp_path / "data"
    _dataset(data / "easy", True, 0)
    _dataset(data / "hard", False, 10)
    tiny = make_tiny_bert(tmp_path / "tiny")
    env = {**os.environ, "EMBFT_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [
        "-m",
        "experiment=smoke",
        "name=twodata",
        "data=local",
        "data.name=easy,hard",  # the easy one first: compared with its runs, hard's leader would never log
        f"data.local_dir={data}/${{data.name}}",
        "train.seed=1,2",
        f"model.name_or_path={tiny}",
        "model.package=null",
        "tracking.log_model=best",
        "tracking.support_per_class=8",
        f"hydra.sweep.dir={tmp_path}/multirun",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "embft", *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("twodata").experiment_id
    runs = [r for r in client.search_runs([exp]) if r.data.tags.get(names.ROLE) == names.ROLE_FINETUNE]
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    by_data = {d: [r for r in runs if r.data.params["data.name"] == d] for d in ("easy", "hard")}
    ids = {d: {r.data.tags[names.SCORING_ID] for r in rs} for d, rs in by_data.items()}
    assert len(ids["easy"]) == len(ids["hard"]) == 1 and ids["easy"] != ids["hard"], ids
    assert all(r.data.tags[names.scoring_part("dataset")] == r.data.params["data.name"] for r in runs)
    val = "val_accuracy_cosine"
    assert min(r.data.metrics[val] for r in by_data["easy"]) > max(r.data.metrics[val] for r in by_data["hard"])

    registered = {m.name for m in client.search_registered_models()}
    assert registered == {"twodata-easy", "twodata-hard"}, registered
    for dataset, competing in by_data.items():
        leader = max(competing, key=lambda r: (r.data.metrics[val], -r.info.start_time))
        champion = client.get_model_version_by_alias(f"twodata-{dataset}", names.CHAMPION)
        assert champion.run_id == leader.info.run_id, dataset
        assert names.CLASSIFIER_URI in leader.data.tags, f"log_model=best logged {dataset}'s leader"
    out = done.stdout + done.stderr
    assert "twodata-hard@champion" in out and "twodata-easy@champion" in out, out[-3000:]


def test_register_best_keeps_one_champion_per_scoring_identity(tmp_path, monkeypatch, caplog):
    """Without a model to log: the registry's choice per scoring identity, and none (one line saying why)
    where runs of one dataset were scored two ways."""
    import mlflow

    from embft.tracking import registry

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient()
    exp = client.create_experiment("reg", artifact_location=(tmp_path / "a").as_uri())

    def run(dataset, sid, score, start):
        tags = {
            names.ROLE: names.ROLE_FINETUNE,
            names.SWEEP: "s",
            names.SCORING_ID: sid,
            names.scoring_part("dataset"): dataset,
            names.CLASSIFIER_URI: f"models:/m-{dataset}{score}",
        }
        r = client.create_run(exp, start_time=start, tags=tags)
        client.log_metric(r.info.run_id, "val_accuracy_cosine", score)
        client.log_metric(r.info.run_id, "accuracy_cosine", score)
        client.set_terminated(r.info.run_id)
        return r.info.run_id

    easy_best = run("easy", "e1", 0.95, 1000)
    run("easy", "e1", 0.90, 2000)
    hard_best = run("hard", "h1", 0.40, 3000)
    run("hard", "h1", 0.30, 4000)
    chosen = []
    monkeypatch.setattr(
        registry, "register_best", lambda exp_id, group, study, name, metric: chosen.append((group, name)) or name
    )
    cfg = OmegaConf.create({"tracking": {"log_model": "best", "registered_model_name": "reg"}})
    monkeypatch.setattr(registry, "objective_metric", lambda config: "val_accuracy_cosine")
    registry.register_sweep_best(cfg, exp, "s")
    picks = {name: registry.best_run(exp, group, "val_accuracy_cosine").info.run_id for group, name in chosen}
    assert picks == {"reg-easy": easy_best, "reg-hard": hard_best}

    chosen.clear()
    run("hard", "h2", 0.99, 5000)  # hard scored another way (e.g. other rows): no champion among hard's runs
    with caplog.at_level("WARNING", logger=registry.__name__):
        registry.register_sweep_best(cfg, exp, "s")
    assert [name for _, name in chosen] == ["reg-easy"]
    (line,) = [r.getMessage() for r in caplog.records if "no champion" in r.getMessage()]
    assert line.startswith("Registry: no champion for hard: its runs were scored 2 ways"), line


def test_the_report_never_pools_runs_scored_apart_into_one_configuration(tmp_path):
    """Same settings, other rows (another copy of the data under the same name, a path the report does not
    count as a setting): two configurations, not two seeds of one; runs scored alike stay seeds of one."""
    import time

    from mlflow.entities import Metric, Param

    from embft import report

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("apart", artifact_location=(tmp_path / "a").as_uri())
    now = int(time.time() * 1000)
    for seed, sid, folder, acc in ((1, "s1", "/d/one", 0.8), (2, "s1", "/d/one", 0.82), (1, "s2", "/d/two", 0.6)):
        tags = {names.ROLE: names.ROLE_FINETUNE, names.SCORING_ID: sid, names.BASELINE_KEY: "k"}
        run = client.create_run(exp, tags=tags).info.run_id
        params = {"train.seed": seed, "data.name": "x", "data.local_dir": folder, "train.learning_rate": "1e-05"}
        metrics = {"accuracy_cosine": acc, "val_accuracy_cosine": acc}
        client.log_batch(
            run,
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            params=[Param(k, str(v)) for k, v in params.items()],
        )
        client.set_terminated(run)
    table, info = report.summarize(report.load_runs(client, "apart"))
    assert sorted(table["n_seeds"]) == [1, 2] and info.settings == ["scoring"], table
    assert sorted(sorted(v) for v in info.accuracies.values()) == [[0.6], [0.8, 0.82]]
