"""embft as an installed package, not as the checkout (docs/your-own-configs.md): a wheel built from
the project carries its configs, runs from another folder with the checkout's src/ off the path,
and a user's own config folder adds a dataset and an arm beside embft's."""

import csv
import os
import random
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT, make_tiny_bert

TOPICS = {
    "billing": ["invoice", "refund", "charge", "payment"],
    "bug": ["crash", "error", "freeze", "button"],
    "login": ["password", "account", "lockout", "sign-in"],
    "shipping": ["parcel", "delivery", "courier", "tracking"],
}
# The worked example of docs/your-own-configs.md: a new dataset and a new arm, in the user's folder.
DATASET = """name: tickets
folder: tickets
text_column: text
label_column: label
"""
ARM = """# @package _global_
defaults:
  - override /train: sentence_transformers
train:
  loss: supcon
  learning_rate: 1.0e-04
  per_device_train_batch_size: 8
"""


def write_tickets(folder: Path) -> None:
    """Support tickets, 4 classes: train.csv (40 a class) and test.csv (12 a class)."""
    rng = random.Random(0)
    folder.mkdir(parents=True)
    for split, per_class in (("train", 40), ("test", 12)):
        with open(folder / f"{split}.csv", "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["text", "label"])
            for label, words in TOPICS.items():
                for i in range(per_class):
                    a, b = rng.sample(words, 2)
                    out.writerow(
                        [f"{split} ticket {i}: the {a} and my {b}, please help ({rng.randint(0, 10**6)})", label]
                    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The wheel of a clean copy of the project (no checkout build files touched), installed with
    --target into a folder of its own: the package as a user's `pip install` gets it."""
    source = tmp_path_factory.mktemp("source")
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copy(ROOT / "README.md", source)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    wheels = tmp_path_factory.mktemp("wheels")
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    # No build isolation: the build backend (setuptools) is the environment's, so no index is needed.
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)], check=True)
    (wheel,) = wheels.glob("embft-*.whl")
    target = tmp_path_factory.mktemp("site")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    return target


def installed_python(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -S ARGS` seeing the installed wheel and the environment's libraries only: -S skips the
    .pth files, among them the editable install's, which would put the checkout's src/ on the path."""
    libraries = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if k not in ("EMBFT_ROOT", "MLFLOW_TRACKING_URI", "PYTHONPATH")}
    env.update(PYTHONPATH=os.pathsep.join([str(site), libraries]), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False
    )


def test_the_wheel_carries_the_configs_and_the_checkout_is_not_on_the_path(site, tmp_path):
    done = installed_python(
        site, "-c", "import sys, embft.app as a; print(a.__file__); print(a.CONF_DIR); print(sys.path)", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    module, conf_dir, path = done.stdout.splitlines()
    assert module.startswith(str(site)) and conf_dir.startswith(str(site))
    assert str(ROOT / "src") not in path
    assert (Path(conf_dir) / "config.yaml").is_file() and (Path(conf_dir) / "data" / "ag_news.yaml").is_file()


@pytest.mark.slow
def test_an_installed_embft_runs_a_job_from_another_folder_with_the_users_own_dataset_and_arm(site, tmp_path):
    project = tmp_path / "my-project"
    (project / "conf" / "data").mkdir(parents=True)
    (project / "conf" / "arm").mkdir()
    (project / "conf" / "data" / "tickets.yaml").write_text(DATASET)
    (project / "conf" / "arm" / "supcon_small.yaml").write_text(ARM)
    write_tickets(project / "data" / "tickets")
    tiny = make_tiny_bert(tmp_path / "tiny_bert")

    done = installed_python(
        site,
        "-m",
        "embft",
        "--config-dir",
        "conf",
        "experiment=smoke",
        "data=tickets",
        f"data.root={project / 'data'}",
        "arm=supcon_small",
        f"model.name_or_path={tiny}",
        "model.package=null",
        "name=mine",
        cwd=project,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project}/mlruns/mlflow.db")  # the store sits in the user's folder
    (experiment,) = [e for e in client.search_experiments() if e.name == "mine"]
    runs = client.search_runs([experiment.experiment_id], "tags.`embft.role` = 'finetune'")
    assert [r.info.status for r in runs] == ["FINISHED"]
    params, metrics = runs[0].data.params, runs[0].data.metrics
    assert params["data.name"] == "tickets" and params["train.backend"] == "sentence_transformers"
    assert params["train.loss"] == "supcon" and params["train.learning_rate"] == "0.0001"
    assert 0.0 <= metrics["val_accuracy_cosine"] <= 1.0 and 0.0 <= metrics["accuracy_cosine"] <= 1.0
