"""The training callback on a real (tiny) fine-tuning: live MLflow metrics, a live SentenceTransformer
view scored by embft's MTEB evaluation, and an Optuna trial whose learning rate wrecks the model
pruned early."""

import random

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

from conftest import make_tiny_bert
from embft.data import Splits
from embft.sweeping.trial_reporter import TrialReporter
from embft.training.callbacks import LiveTrainingCallback
from embft.training.flagembedding.records import build_records, write_records
from embft.training.flagembedding.train import train
from embft.training.flagembedding.trainer import live_sentence_transformer

pytestmark = pytest.mark.slow

WORDS = ["sport", "market", "science", "war"]


def _texts(n: int, seed: int) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    return [f"{WORDS[i % 4]} story {rng.integers(1e6)}" for i in range(n)], [i % 4 for i in range(n)]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))  # with dropout: eval mode must not leak


def tiny_job(compose, tiny_bert, folder, *overrides):
    """16 queries of 4 classes, batch 4, group 4: 4 steps an epoch."""
    cfg = compose(
        [
            f"model.name_or_path={tiny_bert}",
            "model.package=null",
            "model.pooling=cls",
            "variant=same_nib",
            "train.learning_rate=1e-3",
            "train.device=cpu",
            "train.logging_steps=1",
            "train.query_max_len=16",
            "train.passage_max_len=16",
            "train.per_device_train_batch_size=4",
            "train.same_dataset_batch_size=4",
            "eval.samples_per_label=4",
            "eval.n_experiments=1",
            *overrides,
        ]
    )
    texts, labels = _texts(16, 0)
    records = folder / "records-no_in_batch_neg"
    records.mkdir(parents=True)
    write_records(build_records(texts, labels, group_size=4, seed=0, batch_size=4), records / "train.jsonl")
    return cfg, records


def _val_splits() -> Splits:
    train_texts, train_labels = _texts(32, 1)
    test_texts, test_labels = _texts(40, 2)
    return Splits(
        train=pd.DataFrame({"text": train_texts, "label": train_labels}),
        test=pd.DataFrame({"text": test_texts, "label": test_labels}),
        validation=pd.DataFrame({"text": test_texts, "label": test_labels}),
        label_names=WORDS,
        source="synthetic",
    )


def test_live_metrics_and_view_leave_training_unchanged(compose, tmp_path, tiny_bert, capsys):
    import mlflow
    from sentence_transformers import SentenceTransformer

    probe, _ = _texts(8, 3)
    # Group 2 from records of 3 negatives: FlagEmbedding draws one with Python's random every step.
    one_epoch = ("train.num_train_epochs=1", "train.train_group_size=2")
    cfg, records = tiny_job(compose, tiny_bert, tmp_path / "plain", *one_epoch)
    plain = train(cfg, records, str(tiny_bert), 16, tmp_path / "plain")

    seen = {}

    def score(step, model):
        view = live_sentence_transformer(model, str(tiny_bert), "cls", True, 16)
        assert view[0].auto_model is model.model  # the Trainer's encoder itself, not a copy
        seen[step] = view.encode(probe, convert_to_numpy=True)
        torch.randperm(100)  # e.g. sampling validation rows: must not shift training's dropout masks
        random.seed(0)  # as MTEB's evaluation does: must not replay training's negative sampling
        np.random.seed(0)
        return float(step)

    callback = LiveTrainingCallback(score, every_steps=2)
    cfg, records = tiny_job(compose, tiny_bert, tmp_path / "live", *one_epoch)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with mlflow.start_run() as run:
        live = train(cfg, records, str(tiny_bert), 16, tmp_path / "live", callbacks=[callback])

    # Scoring switched the model to eval mode and drew no random numbers of training's.
    assert live.losses == plain.losses and len(live.losses) == 4
    assert sorted(seen) == [2, 4] and callback.scores == [(2, 2.0), (4, 4.0)] and callback.pruned_step is None
    assert not np.allclose(seen[2], seen[4])  # the view follows the weights as they train
    saved = SentenceTransformer(str(live.model_dir), device="cpu").encode(probe, convert_to_numpy=True)
    np.testing.assert_allclose(seen[4], saved, atol=1e-5)  # step 4 is the end: the saved model
    # train_loss reached MLflow by step while training ran, the scores too.
    client = mlflow.MlflowClient()
    loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in loss] == [step for step, _ in live.losses]
    assert [m.value for m in loss] == pytest.approx([value for _, value in live.losses])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "live_val_accuracy_cosine")] == [2, 4]
    assert callback.logged_loss
    assert "{'loss'" not in capsys.readouterr().out  # one progress bar, no dict per logging step


def test_a_learning_rate_that_wrecks_the_model_is_pruned(compose, tmp_path, tiny_bert):
    import mlflow

    from embft.evaluation.classification import evaluate

    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    splits = _val_splits()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")

    def trial_run(lr: float, folder: str):
        trial = study.ask()  # what the sweeper does, with the pruner the job rebuilds
        trial.set_user_attr("pruner", {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 1})
        cfg, records = tiny_job(
            compose, tiny_bert, tmp_path / folder, f"train.learning_rate={lr}", "train.num_train_epochs=4"
        )

        def score(step, model):
            view = live_sentence_transformer(model, str(tiny_bert), "cls", True, 16)
            return evaluate(view, splits, cfg.eval, "synthetic", which=("validation",))["validation"].accuracy

        reporter = TrialReporter("s", storage, trial.number)
        callback = LiveTrainingCallback(score, every_steps=4, reporter=reporter)
        with mlflow.start_run() as run:
            result = train(cfg, records, str(tiny_bert), 16, tmp_path / folder, callbacks=[callback])
        if callback.pruned_step is None:
            study.tell(trial, callback.scores[-1][1])
        return trial.number, callback, result, mlflow.get_run(run.info.run_id)

    good, good_cb, good_result, _ = trial_run(1e-3, "good")
    bad, bad_cb, bad_result, bad_run = trial_run(50.0, "bad")

    trials = study.get_trials()
    assert trials[good].state == TrialState.COMPLETE and len(good_result.losses) == 16
    assert trials[bad].state == TrialState.PRUNED
    assert bad_cb.pruned_step == 4 and len(bad_result.losses) == 4  # stopped after its first score
    # The wrecked model scores well under the good one at the same step (chance is 0.25).
    assert bad_cb.scores[0][1] < good_cb.scores[0][1] - 0.2, (bad_cb.scores, good_cb.scores)
    assert bad_run.data.tags["optuna.pruned"] == "true" and bad_run.data.tags["optuna.pruned_step"] == "4"


def test_live_evals_give_runs_of_any_length_as_many_scores_compared_by_their_number(compose, tmp_path, tiny_bert):
    """eval.live_evals: a 4-step and a 16-step run are each scored twice, halfway and at the end, and the
    pruner sees both at steps 1 and 2 (an equal fraction of their training), not at steps 2/4 and 8/16."""
    import mlflow

    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    for epochs in (1, 4):
        trial = study.ask()
        cfg, records = tiny_job(compose, tiny_bert, tmp_path / f"e{epochs}", f"train.num_train_epochs={epochs}")
        reporter = TrialReporter("s", storage, trial.number)
        callback = LiveTrainingCallback(lambda step, model: step / 100, reporter=reporter, evals=2)
        with mlflow.start_run() as run:
            train(cfg, records, str(tiny_bert), 16, tmp_path / f"e{epochs}", callbacks=[callback])
        steps = 4 * epochs
        assert [step for step, _ in callback.scores] == [steps // 2, steps]
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "live_val_accuracy_cosine")
        assert [m.step for m in history] == [steps // 2, steps], "MLflow keeps the training step"
        reported = study.trials[trial.number].intermediate_values
        assert reported == {1: steps / 200, 2: steps / 100}


def test_live_scores_are_spaced_one_way(compose) -> None:
    from embft.config import check_values
    from embft.errors import EmbftError

    with pytest.raises(EmbftError, match=r"^eval.every_steps=4 and eval.live_evals=8: .*set the other to null.$"):
        check_values(compose(["eval.every_steps=4", "eval.live_evals=8"]))
    with pytest.raises(EmbftError, match=r"^eval.live_evals=0: must be >= 1 or null.$"):
        check_values(compose(["eval.live_evals=0"]))


def test_a_real_search_prunes_a_trial_and_never_takes_it_for_the_best(tmp_path, ag_news_dir):
    """`python -m embft -m experiment=search` end to end, on MiniLM (a random tiny BERT scores at chance on
    AG News, so a gap the pruner must act on would not be certain): the grid runs learning rate 1e-5 first
    (seed 42) and then 50, which wrecks the model; MedianPruner(n_startup_trials=1) must prune it at its
    first live score."""
    import re

    import yaml
    from mlflow.tracking import MlflowClient

    from embft import names
    from test_pipeline import embft, runs

    done = embft(
        tmp_path,
        "-m",
        "experiment=search",
        f"data.local_dir={ag_news_dir}",
        "train.max_train_queries=12",
        "train.logging_steps=2",
        "train.num_train_epochs=1",
        "train.train_group_size=4",
        "train.temperature=0.05",
        "train.learning_rate=choice(50.0,1e-5)",  # fixed values above replace the config's search space
        "eval.max_test_rows=120",
        "eval.max_validation_rows=120",
        "eval.samples_per_label=8",
        "eval.n_experiments=1",
        "eval.every_steps=4",
        "eval.max_seq_length=64",
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.pruner.n_startup_trials=1",
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    good, bad = study.trials
    assert good.params == {"train.learning_rate": 1e-5} and good.state == TrialState.COMPLETE, good
    assert bad.params == {"train.learning_rate": 50.0} and bad.state == TrialState.PRUNED, bad
    assert bad.last_step == 4 and bad.intermediate_values[4] < good.intermediate_values[4] - 0.2
    assert re.search(r"Sweep search/\S+: 1 FINISHED, 1 PRUNED\n", output), output[-3000:]
    assert "FAILED" not in output

    tuned = {
        int(r.data.tags[names.OPTUNA_TRIAL]): r
        for r in runs(tmp_path, "search")
        if r.data.tags[names.ROLE] == "finetune"
    }
    assert sorted(tuned) == [0, 1] and all(r.info.status == "FINISHED" for r in tuned.values())
    pruned, best = tuned[bad.number], tuned[good.number]
    assert pruned.data.tags[names.OPTUNA_PRUNED] == "true" and pruned.data.tags[names.OPTUNA_PRUNED_STEP] == "4"
    assert names.OPTUNA_PRUNED not in best.data.tags
    # The pruned run is never the best: not tagged so, no classifier logged, not the registered champion.
    assert pruned.data.tags.get(names.OPTUNA_BEST) != "true" and best.data.tags[names.OPTUNA_BEST] == "true"
    assert names.CLASSIFIER_URI not in pruned.data.tags and names.CLASSIFIER_URI in best.data.tags
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    champion = client.get_model_version_by_alias("search", names.CHAMPION)
    assert champion.tags[names.VERSION_RUN] == champion.run_id == best.info.run_id
    assert not client.search_model_versions(f"name = 'search' and run_id = '{pruned.info.run_id}'")

    parent = next(r for r in runs(tmp_path, "search") if r.data.tags.get(names.ROLE) == "study")
    assert parent.data.metrics["study_n_pruned"] == 1 and parent.data.metrics["study_n_failed"] == 0
    (sweep_dir,) = (tmp_path / "multirun" / "search").iterdir()
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["n_pruned"] == 1 and results["best_trial_number"] == good.number
