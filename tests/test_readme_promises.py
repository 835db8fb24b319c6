"""README promises that had no test (issue 34), each through the code a user runs:

- a job whose tracking server cannot be reached fails in one line, within 10 s of reaching for it;
- `tracking.support_from_training=true` draws the served classifier's support set from the texts training read;
- among tied runs the champion is the earliest; `tracking.registered_model_name=null` registers nothing;
- `embft predict` with a `models:/m-...` URI and with a model folder;
- `embft report NAME --compare A B` from the command line;
- every job's run carries the `git_commit` tag;
- `EMBFT_AG_NEWS_DIR` points `data=ag_news` at a local copy.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from test_report_datasets import VAL_DELTA, store  # noqa: F401  (a store of two datasets, three seeds each)

from conftest import ROOT, make_tiny_bert
from embft import names
from embft.errors import EmbftError
from test_data import synthetic, write

LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return {**env, **extra}


# ------------------------------------------------------------------------ an unreachable tracking server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_job_fails_in_one_line_when_its_tracking_server_is_down(tmp_path):
    """README: "A job that starts while the server is down fails within 10 s" (MLflow's own client would
    retry for about 2 minutes): through the command, nothing listening on the server's port."""
    uri = f"http://127.0.0.1:{_free_port()}"
    data = write(tmp_path / "data", synthetic(n_per_class=20), synthetic(seed=1))  # good input: only the store fails
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "embft", "tracking=server", "data=local", f"data.local_dir={data}"],
        env=_env(EMBFT_MLFLOW_URI=uri, EMBFT_ROOT=str(tmp_path)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "no MLflow server answers" in line]
    assert len(errors) == 1 and uri in errors[0] and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert elapsed < 60, f"took {elapsed:.1f} s: MLflow's retries, not the one-line check"


def test_a_server_that_accepts_but_never_answers_fails_the_job_after_10_s_on_the_store(compose, tmp_path, monkeypatch):
    """A host that takes the connection and says nothing (a hung server, a proxy with no upstream): the
    job gives up on the store after the check's 10 s instead of MLflow's minutes of retries. Timed from
    the store's opening: the job checks its data and model first."""
    from embft.app import run_job
    from embft.tracking import mlflow_runs

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the backlog; nothing ever reads or answers them
    uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
    data = write(tmp_path / "data", synthetic(n_per_class=20), synthetic(seed=1))  # good input: only the store fails
    cfg = compose([f"tracking.uri={uri}", "data=local", f"data.local_dir={data}"])
    opened_at: list[float] = []
    setup = mlflow_runs.setup
    monkeypatch.setattr(mlflow_runs, "setup", lambda tracking: opened_at.append(time.monotonic()) or setup(tracking))
    outcome: list[BaseException] = []

    def job() -> None:
        try:
            run_job(cfg)
        except BaseException as err:  # noqa: BLE001  (the thread hands its outcome over, whatever it is)
            outcome.append(err)

    worker = threading.Thread(target=job, daemon=True)
    worker.start()
    worker.join(timeout=120)
    ended = time.monotonic()
    silent.close()
    assert not worker.is_alive(), "still waiting for the server after 120 s"
    assert len(outcome) == 1 and isinstance(outcome[0], EmbftError), outcome
    assert uri in str(outcome[0]) and "\n" not in str(outcome[0])
    assert len(opened_at) == 1 and ended - opened_at[0] < 11, f"{ended - opened_at[0]:.1f} s on the store"


# ------------------------------------------------------------------------ support_from_training


@pytest.mark.parametrize("backend", ["sentence_transformers", "setfit"])
def test_support_from_training_is_the_texts_training_read(compose, tmp_path, backend):
    """The served classifier's support set (tracking.support_per_class a class, 256 here > any class) is
    the labelled texts the backend's own prepare() hands to training, and not the whole train split."""
    from embft.data import load_splits
    from embft.serving.models import support_rows
    from embft.training.base import load_trainer

    folder = write(tmp_path / "data", synthetic(n_per_class=40), synthetic(seed=1))
    overrides = ["data=local", f"data.local_dir={folder}", f"train={backend}", "train.max_train_queries=16"]
    cfg = compose([*overrides, "tracking.support_from_training=true"])
    splits = load_splits(cfg.data)
    ctx = SimpleNamespace(cfg=cfg, splits=splits, cache_dir=tmp_path / "cache", encode=None, model_key="m")
    read = load_trainer(cfg.train.backend).prepare(ctx).data
    support = support_rows(splits, cfg)
    assert len(read) == 16 and sorted(support["text"]) == sorted(read["text"])
    assert support.set_index("text")["label"].to_dict() == read.set_index("text")["label"].to_dict()
    whole = support_rows(splits, compose([*overrides, "tracking.support_from_training=false"]))
    assert sorted(whole["text"]) == sorted(splits.train["text"])


# ------------------------------------------------------------------------ the registry


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory) -> Path:
    """A saved SentenceTransformer folder (tiny BERT + mean pooling), as a trainer leaves one."""
    from sentence_transformers import SentenceTransformer, models

    folder = make_tiny_bert(tmp_path_factory.mktemp("bert"))
    word = models.Transformer(str(folder), max_seq_length=64)
    model = SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean")])
    out = tmp_path_factory.mktemp("st") / "model"
    model.save(str(out))
    return out


@pytest.fixture(scope="module")
def train_rows(ag_news_dir: Path) -> pd.DataFrame:
    return pd.read_csv(ag_news_dir / "train.csv", nrows=200)


@pytest.fixture
def registry_store(tmp_path):
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = mlflow.create_experiment("tied", artifact_location=(tmp_path / "artifacts").as_uri())
    yield experiment_id
    mlflow.set_tracking_uri(previous)


def _cfg(name):
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "tracking": {
                "log_model": "all",
                "registered_model_name": name,
                "support_per_class": 8,
                "classifier": "knn",
                "support_from_training": False,
            },
            "eval": {
                "method": "knn",
                "k": 3,
                "metric": "cosine",
                "seed": 7,
                "batch_size": 16,
                "objective": "validation",
            },
        }
    )


def _finished_run(experiment_id, sweep, score, start_time, model_dir, train, cfg) -> str:
    """A FINISHED fine-tune run of `sweep` started at `start_time` (ms), with its classifier logged."""
    import mlflow

    from embft.serving.models import log_job_models

    client = mlflow.MlflowClient()
    run = client.create_run(
        experiment_id, start_time=start_time, tags={names.ROLE: names.ROLE_FINETUNE, names.SWEEP: sweep}
    )
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_metrics({"val_accuracy_cosine": score, "accuracy_cosine": score})
        log_job_models(model_dir, SimpleNamespace(train=train, label_names=LABELS), cfg)
    return run.info.run_id


@pytest.mark.slow  # three logged models
def test_the_champion_among_tied_runs_is_the_earliest_and_a_null_name_registers_nothing(
    tiny_st, train_rows, registry_store
):
    """README: "Among tied runs the champion is the earliest, as Optuna's best trial is"; and
    `registered_model_name` "`null` skips it". The later run is created first, so neither creation order
    nor run id can pass for the start time."""
    import mlflow

    from embft.tracking.registry import register_sweep_best

    now = int(time.time() * 1000)
    cfg = _cfg("tied")
    later = _finished_run(registry_store, "s", 0.8, now + 5000, tiny_st, train_rows, cfg)
    earlier = _finished_run(registry_store, "s", 0.8, now, tiny_st, train_rows, cfg)
    _finished_run(registry_store, "s", 0.7, now - 5000, tiny_st, train_rows, cfg)  # earliest, lower
    client = mlflow.MlflowClient()

    assert register_sweep_best(_cfg(None), registry_store, "s") is None
    assert client.search_registered_models() == [], "registered_model_name=null registers nothing"

    version = register_sweep_best(cfg, registry_store, "s")
    champion = client.get_model_version_by_alias("tied", names.CHAMPION)
    assert version.run_id == earlier != later and champion.version == version.version
    assert champion.tags[names.VERSION_RUN] == earlier


# ------------------------------------------------------------------------ embft predict


@pytest.mark.slow  # a logged model and two fresh processes
def test_predict_takes_a_models_m_uri_and_a_model_folder(tiny_st, train_rows, registry_store, tmp_path):
    """README: `embft predict MODEL_URI INPUT` "takes `models:/NAME@champion`, `models:/m-...`,
    `runs:/RUN/classifier` or a folder": the logged model's own URI and a downloaded copy of it label
    a file as the model loaded in this process does."""
    import mlflow

    run_id = _finished_run(registry_store, "p", 0.5, None, tiny_st, train_rows, _cfg("p"))
    uri = mlflow.MlflowClient().get_run(run_id).data.tags[names.CLASSIFIER_URI]
    assert uri.startswith("models:/m-"), uri
    texts = pd.DataFrame({"text": ["Oil prices rose after the storm.", "The team won the cup final.", "New chip."]})
    texts.to_csv(tmp_path / "in.csv", index=False)
    expected = mlflow.pyfunc.load_model(uri).predict(texts)
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "folder")))
    assert (folder / "MLmodel").is_file()
    for source, name in ((uri, "by_uri.csv"), (str(folder), "by_folder.csv")):
        done = subprocess.run(
            [sys.executable, "-m", "embft", "predict", source, "in.csv", "--out", name],
            env=_env(MLFLOW_TRACKING_URI=mlflow.get_tracking_uri()),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        got = pd.read_csv(tmp_path / name)
        assert got["text"].tolist() == texts["text"].tolist()
        assert got["label"].tolist() == expected["label"].tolist(), source
        assert got["label_name"].tolist() == expected["label_name"].tolist(), source


# ------------------------------------------------------------------------ embft report --compare


def test_report_compare_from_the_command_line(store, tmp_path):  # noqa: F811  (the imported fixture)
    """`embft report NAME --compare A B`: A minus B paired by seed on each dataset, in report.md and on
    the command's last line."""
    uri, _ = store
    done = subprocess.run(
        [sys.executable, "-m", "embft", "report", "datasets", "--tracking-uri", uri, "--out-dir", str(tmp_path)]
        + ["--compare", "variant=same", "variant=no_same"],
        env=_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    expected = "`variant=same` beats `variant=no_same` on validation on 1 of 2 datasets: not on emotion."
    assert expected in done.stdout.splitlines()[-1], done.stdout[-2000:]
    diff = [a - b for a, b in zip(VAL_DELTA[("same", "ag_news")], VAL_DELTA[("no_same", "ag_news")])]
    text = (tmp_path / "datasets" / "report.md").read_text()
    assert expected in text and f"ag_news {sum(diff) / len(diff):+.4f} [" in text


# ------------------------------------------------------------------------ the git_commit tag


def test_every_jobs_run_carries_the_git_commit_it_ran(tmp_path):
    """README: runs carry tags "(variant, model, git commit, ...)": the repository's HEAD, tag `git_commit`."""
    import mlflow

    from embft.tracking import mlflow_runs

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        experiment_id = mlflow.create_experiment("commit", artifact_location=(tmp_path / "a").as_uri())
        tags = {names.ROLE: names.ROLE_FINETUNE, names.CONFIG_HASH: "h"}
        with mlflow_runs.job_run(experiment_id, "job", tags, settle_s=0) as run:
            pass
        logged = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
    finally:
        mlflow.set_tracking_uri(previous)
    assert logged[names.GIT_COMMIT] == head.stdout.strip()


# ------------------------------------------------------------------------ EMBFT_AG_NEWS_DIR


def test_embft_ag_news_dir_points_ag_news_at_a_local_copy(compose, tmp_path, monkeypatch):
    """README: "AG News reads the Hub unless `data.local_dir` or `EMBFT_AG_NEWS_DIR` is set"."""
    from embft.data import load_splits

    copy = write(tmp_path / "copy", synthetic(n_per_class=20), synthetic(seed=1))
    monkeypatch.delenv("EMBFT_AG_NEWS_DIR", raising=False)
    assert compose([]).data.local_dir is None, "unset: the Hub at the study's revision"
    monkeypatch.setenv("EMBFT_AG_NEWS_DIR", str(copy))
    cfg = compose([])
    assert cfg.data.name == "ag_news" and cfg.data.local_dir == str(copy)
    splits = load_splits(cfg.data)
    read = set(splits.train["text"]) | set(splits.validation["text"])
    assert read == set(pd.read_csv(copy / "train.csv")["text"]), "the rows of the local copy"
    other = write(tmp_path / "other", synthetic(n_per_class=20, seed=2), synthetic(seed=3))
    assert compose([f"data.local_dir={other}"]).data.local_dir == str(other), "data.local_dir wins"
