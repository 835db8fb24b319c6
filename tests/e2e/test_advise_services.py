"""An advise as a team runs it: runs on the MLflow tracking server, the arms' Optuna studies on PostgreSQL,
every job submitted through submitit (`hydra/launcher=slurm_local`: the SLURM launcher's local executor,
each job its own process). The search, the seed confirmations, the report and the champion land where the
services keep them, and the rerun trains nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from test_advise import advise_overrides

from conftest import make_tiny_bert

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
CLASSES, PER_CLASS, TRIALS, SEEDS = ("a", "b", "c", "d"), 6, 2, 2  # as test_advise.advise_overrides


def _advise(root: Path, mlflow_uri: str, storage: str, data: Path, model: Path, name: str, sweep: Path):
    env = {**os.environ, "EMBFT_ROOT": str(root), "EMBFT_MLFLOW_URI": mlflow_uri, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        *(sys.executable, "-m", "embft", "-m"),
        *advise_overrides(data, model, "alpha", "supcon", per_class=str(PER_CLASS)),
        "tracking=server",
        "hydra/launcher=slurm_local",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweeper.report_dir={root}/report",
        f"hydra.sweep.dir={sweep}",
        f"name={name}",
        "advise.reference_arms=[untrained]",
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


def test_an_advise_on_the_tracking_server_postgres_and_submitit(mlflow_uri, pg_uri, tmp_path) -> None:
    import optuna
    from mlflow.tracking import MlflowClient
    from sqlalchemy.engine import make_url

    from embft.sweeping.storage import with_installed_pg_driver
    from test_data import synthetic, write

    data = write(tmp_path / "alpha", synthetic(n_per_class=30, classes=CLASSES), synthetic(classes=CLASSES, seed=1))
    model = make_tiny_bert(tmp_path / "tiny")
    name = f"e2e_advise_{uuid.uuid4().hex[:8]}"
    storage = f"{pg_uri}/optuna"  # a bare postgresql:// URL, the password from PGPASSFILE
    first = _advise(tmp_path / "root", mlflow_uri, storage, data, model, name, tmp_path / "sweep1")
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    assert "For this data (alpha) at 6 per class" in first.stdout + first.stderr, (first.stdout + first.stderr)[-2000:]

    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    tuned = [r for r in runs if r.data.tags.get("embft.role") == "finetune"]
    assert tuned and not any(r.info.status == "RUNNING" for r in tuned), [r.info.status for r in tuned]
    finished = [r for r in tuned if r.data.tags.get("optuna.pruned") != "true"]
    assert all(r.info.status == "FINISHED" for r in finished), [r.info.status for r in finished]
    studies = [r.data.tags.get("optuna.study_name", "") for r in tuned]
    confirmed = sorted(s.split("/")[-2] for s in studies if s.endswith("/seeds"))
    assert confirmed == ["supcon"] * SEEDS + ["untrained"] * SEEDS, studies
    for run in finished:  # strict budgets, read back from the server
        assert run.data.metrics["train_labelled_texts"] == PER_CLASS * len(CLASSES), run.data.tags
    # the submitted jobs ran in submitit's own processes
    assert list((tmp_path / "sweep1").rglob(".submitit/*/*_log.out")), "no submitit job ran"

    url = with_installed_pg_driver(make_url(storage)).render_as_string(hide_password=False)
    (search,) = {s for s in studies if s.endswith("/supcon")}
    assert search.startswith(f"{name}/") and f"/n{PER_CLASS}/" in search
    study = optuna.load_study(study_name=search, storage=url)
    assert len(study.trials) == TRIALS

    champion = client.get_model_version_by_alias(name, "champion")
    assert client.get_run(champion.run_id).data.tags["optuna.study_name"].endswith("/seeds")
    assert (tmp_path / "root" / "report" / "advise.md").is_file()

    again = _advise(tmp_path / "root", mlflow_uri, storage, data, model, name, tmp_path / "sweep2")
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    after = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("embft.role") == "finetune"]
    assert len(after) == len(tuned), "the rerun trained again"
    assert len(optuna.load_study(study_name=study.study_name, storage=url).trials) == TRIALS
