"""A job's identity (embft.tracking.identity): what makes two jobs one, and which finished run a job takes
as its result. Settings a backend does not read, switches, locations and spellings of one data folder
never make another job; a pruned run is a result only for the study that pruned it; stores hashed by an
earlier embft are still found."""

from __future__ import annotations

import shutil

import pytest

from embft import names
from test_data import synthetic, write

PINS = ["train.device=cpu", "train.precision=fp32", "eval.precision=fp32"]


def _start(compose, overrides):
    from embft.app import start

    return start(compose([*PINS, *overrides]))


def test_switches_and_locations_are_not_part_of_a_jobs_identity(compose, tmp_path):
    """train.reuse_twin, train.keep_model, paths, force, debug and data.root never make another job."""
    base = _start(compose, ["experiment=seed_grid"]).config_hash
    for switch in (
        "train.reuse_twin=false",
        "train.keep_model=true",
        "force=true",
        "debug=true",
        f"data.root={tmp_path}",
        f"paths.cache_dir={tmp_path}/cache",
        "tracking.log_model=none",
    ):
        assert _start(compose, ["experiment=seed_grid", switch]).config_hash == base, switch
    assert _start(compose, ["experiment=seed_grid", "train.seed=7"]).config_hash != base


def test_a_served_backend_other_than_torch_is_another_job(compose):
    """The served scores a run logs depend on tracking.serve_backend: an onnx rerun of a finished torch job
    trains and scores anew instead of being skipped with torch's served scores; torch keeps the old hash."""
    base = _start(compose, ["experiment=seed_grid"]).config_hash
    assert _start(compose, ["experiment=seed_grid", "tracking.serve_backend=torch"]).config_hash == base
    assert _start(compose, ["experiment=seed_grid", "tracking.serve_backend=onnx"]).config_hash != base


def test_the_served_classifiers_support_set_is_part_of_a_jobs_identity(compose):
    """A run logs its deployed classifiers' accuracy, which depends on their support set: a rerun with
    another support_per_class or support_from_training is another job, not skipped with the old served
    scores; at the defaults the hash is what it always was."""
    base = _start(compose, ["experiment=seed_grid"]).config_hash
    assert _start(compose, ["experiment=seed_grid", "tracking.support_per_class=256"]).config_hash == base
    others = {
        _start(compose, ["experiment=seed_grid", setting]).config_hash
        for setting in ("tracking.support_per_class=32", "tracking.support_per_class=null")
    }
    others.add(_start(compose, ["experiment=seed_grid", "tracking.support_from_training=true"]).config_hash)
    assert base not in others and len(others) == 3


def test_one_data_folder_under_two_spellings_is_one_job(compose, tmp_path, monkeypatch):
    """data.local_dir enters by its files' content: relative, absolute and a copy elsewhere are one job
    (so skip, twins and "running elsewhere" match); other content is another job."""
    folder = write(tmp_path / "data" / "x", synthetic(), synthetic(seed=1))
    copy = shutil.copytree(folder, tmp_path / "mount" / "x")
    other = write(tmp_path / "other", synthetic(seed=2), synthetic(seed=1))
    monkeypatch.chdir(tmp_path / "mount")
    hashes = {
        spelling: _start(compose, ["data=local", f"data.local_dir={spelling}", "variant=same_nib"])
        for spelling in (str(folder), "../data/x", str(copy), "./x", str(other))
    }
    same = {(j.config_hash, j.twin_key) for s, j in hashes.items() if s != str(other)}
    assert len(same) == 1, same
    assert hashes[str(other)].config_hash not in {h for h, _ in same}


def test_a_flagembedding_setting_on_another_backend_is_refused_in_one_line(compose):
    from embft.errors import EmbftError

    for override, key in (
        ("variant=same_nib", "variant=same_nib"),
        ("train.train_group_size=4", "train.train_group_size=4"),
        ("data.pairing=hard", "data.pairing=hard"),
    ):
        with pytest.raises(EmbftError, match=f"^{key}: only train.backend=flagembedding reads it"):
            _start(compose, ["train=sentence_transformers", override])
    # the datasets README's supcon rows name the variant every job carries unread: allowed
    assert _start(compose, ["train=sentence_transformers", "variant=same"]).config_hash


def test_setfits_pairs_per_text_are_setfits_own_setting(compose):
    """train.num_iterations (the SetFit paper's 20 pairs per text) is refused on another backend and hashed off
    its default only (every earlier SetFit job keeps its identity); test_trainers' SetFit job counts its pairs."""
    from embft.errors import EmbftError

    with pytest.raises(EmbftError, match="^train.num_iterations=20: only train.backend=setfit reads it"):
        _start(compose, ["arm=supcon", "train.num_iterations=20"])
    with pytest.raises(EmbftError, match="train.num_iterations"):
        _start(compose, ["arm=setfit", "train.num_iterations=0"])
    plain, paper = _start(compose, ["arm=setfit"]), _start(compose, ["arm=setfit", "train.num_iterations=20"])
    assert plain.config_hash == _start(compose, ["arm=setfit", "train.num_iterations=null"]).config_hash
    assert paper.config_hash != plain.config_hash and paper.params["train.num_iterations"] == 20


def test_a_supcon_jobs_identity_holds_no_flagembedding_setting(compose):
    """An experiment's variant (experiment=smoke: same_nib) is FlagEmbedding's: a supcon job neither logs
    nor hashes it, so it is one job whatever variant the experiment file chose."""

    job = _start(compose, ["experiment=smoke", "train=sentence_transformers"])
    assert not any(k.startswith("variant.") or k == "train.train_group_size" for k in job.params)
    assert "train.loss" in job.params and "variant" not in job.params
    same = _start(compose, ["experiment=smoke", "train=sentence_transformers", "variant=same"])
    assert same.config_hash == job.config_hash, "the experiment's variant=same_nib does not make another job"
    fe = _start(compose, ["experiment=smoke"])
    assert any(k.startswith("variant.") for k in fe.params)


def _resolved(job):
    from embft.config import to_container

    return to_container(job.cfg)


def test_the_hash_rule_needs_no_entry_for_a_new_key(compose):
    """A key the schema gains later enters a job's identity only away from its default."""
    from embft.tracking import identity

    resolved = _resolved(_start(compose, []))
    assert resolved["train"]["per_class"] is None  # a key added after the first stores were hashed
    older = {**resolved, "train": {k: v for k, v in resolved["train"].items() if k != "per_class"}}
    assert identity.config_hash(older) == identity.config_hash(resolved)
    assert identity.config_hash({**older, "train": {**older["train"], "per_class": 8}}) != identity.config_hash(
        resolved
    )


@pytest.fixture
def store(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    (tmp_path / "mlruns").mkdir()
    client = mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    return client


def _finished(client, exp, tags, metrics=None, start_time=None):
    from mlflow.entities import Metric

    run = client.create_run(exp, start_time=start_time, tags={names.ROLE: names.ROLE_FINETUNE, **tags})
    metrics = metrics or {"val_accuracy_cosine": 0.8, "accuracy_cosine": 0.7}
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
    client.set_terminated(run.info.run_id, "FINISHED")
    return client.get_run(run.info.run_id)


def _job_in(store, compose, overrides):
    job = _start(compose, overrides)
    job.experiment_id = store.create_experiment(f"e{abs(hash(tuple(overrides)))}")
    return job


def test_a_run_stored_under_an_earlier_hash_is_this_jobs_result(store, compose):
    """train.keep_model left the identity: a keep_model=true job finds the run an earlier embft stored
    under the hash it gave that config (job.legacy_hashes) and skips, instead of training again."""
    from embft.app import finished_run

    job = _job_in(store, compose, [])
    (legacy,) = job.legacy_hashes
    old = _finished(store, job.experiment_id, {names.CONFIG_HASH: legacy})
    assert finished_run(job).info.run_id == old.info.run_id


def test_a_run_stored_before_the_support_set_was_hashed_is_taken_only_with_the_same_support_set(store, compose):
    """Stores written while the support set was outside the hash: a job finds their run under the earlier
    hash, and takes it only where the run's logged tracking settings are the job's (else it trains anew)."""
    from embft.app import finished_run

    job = _job_in(store, compose, ["experiment=seed_grid", "tracking.support_per_class=32"])
    earlier = _start(compose, ["experiment=seed_grid"]).config_hash  # the earlier rule's hash of this job
    assert earlier in job.legacy_hashes
    other = _finished(store, job.experiment_id, {names.CONFIG_HASH: earlier})
    store.log_param(other.info.run_id, "tracking.support_per_class", "256")
    assert finished_run(job) is None, "served scores measured on 256 texts a class are not this job's"
    same = _finished(store, job.experiment_id, {names.CONFIG_HASH: earlier})
    store.log_param(same.info.run_id, "tracking.support_per_class", "32")
    assert finished_run(job).info.run_id == same.info.run_id


def test_a_pruned_run_is_a_result_only_for_the_study_that_pruned_it(store, compose):
    from embft.app import finished_run

    job = _job_in(store, compose, ["experiment=seed_grid"])
    pruned = {
        names.CONFIG_HASH: job.config_hash,
        names.OPTUNA_PRUNED: "true",
        names.OPTUNA_PRUNED_STEP: "4",
        names.OPTUNA_STUDY: "study-a",
    }
    run = _finished(store, job.experiment_id, pruned, {"live_val_accuracy_cosine": 0.5})
    assert finished_run(job) is None, "a job outside any study trains the point"
    job.cfg.optuna.study_name = "study-b"
    assert finished_run(job) is None, "a study that did not prune it trains the point"
    job.cfg.optuna.study_name = "study-a"
    assert finished_run(job).info.run_id == run.info.run_id


def test_reuse_twin_false_does_not_take_a_run_that_took_its_twins_training(store, compose):
    """train.reuse_twin=false (same config hash) asks for this job's own training: a finished run that took
    a twin's is not its result; one that trained is."""
    from embft.app import finished_run

    job = _job_in(store, compose, ["experiment=seed_grid", "variant=same_nib", "train.reuse_twin=false"])
    _finished(store, job.experiment_id, {names.CONFIG_HASH: job.config_hash, names.TRAINED_AS: "other"})
    assert finished_run(job) is None
    job.cfg.train.reuse_twin = True
    assert finished_run(job) is not None


def test_the_apps_job_is_what_the_twin_rule_reads(compose):
    from embft.tracking.twins import TwinJob

    assert isinstance(_start(compose, []), TwinJob)


def test_a_reuse_twin_false_rerun_counts_once_in_the_report(store, compose, tmp_path):
    """`embft report` on a store holding a train.reuse_twin=false rerun (same config, same seed) shows
    n=1 for that seed, in the summary and in the datasets matrix; also where an older embft gave the
    rerun another hash."""
    from embft.report import summary
    from embft.report.datasets import dataset_matrix
    from embft.report.loading import load_runs

    exp = store.create_experiment("twins")
    runs = [  # (config hash, params), oldest first
        ("h1", {"train.seed": "1", "variant.name": "same", "train.reuse_twin": "True"}),
        ("h2", {"train.seed": "2", "variant.name": "same", "train.reuse_twin": "True"}),
        ("older-embft-hash", {"train.seed": "1", "variant.name": "same", "train.reuse_twin": "False"}),
        ("h3", {"train.seed": "1", "variant.name": "no_same", "train.reuse_twin": "True"}),
    ]
    for minute, (config_hash, params) in enumerate(runs):
        tags = {names.CONFIG_HASH: config_hash, names.BASELINE_KEY: "k"}
        run = _finished(store, exp, tags, {"accuracy_cosine": 0.7, "delta_accuracy_cosine": 0.1}, minute * 60_000)
        for key, value in {**params, "data.name": "ag_news"}.items():
            store.log_param(run.info.run_id, key, value)
    df = load_runs(store, "twins")
    table, info = summary.summarize(df, "accuracy_cosine")
    counts = dict(zip(table["configuration"], table["n_seeds"]))
    assert counts["variant=same"] == 2 and counts["variant=no_same"] == 1, counts
    assert "1 FINISHED, superseded by a newer FINISHED run of the same config and seed" in summary.used_sentence(info)
    cells = dataset_matrix(info).cells
    assert dict(zip(cells["configuration"], cells["n_seeds"])) == counts
