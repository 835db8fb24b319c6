"""Fixtures of the e2e tests: live services that `make e2e` (scripts/e2e_services.sh) starts.

The services are found through EMBFT_MLFLOW_URI and EMBFT_PG_URI, never at a guessed port (the
script picks free ones and prints them); their credentials through MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (MLflow's
basic-auth app) and PGPASSFILE (PostgreSQL's scram passwords), all of which
`scripts/e2e_services.sh env` prints. A service that does not answer fails the test with what
to run: these tests exist to exercise the services, so a missing one is an error, not a reason
to skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
E2E_DIR = ROOT / ".e2e"
START_HINT = (
    "start them with `make services-up` (scripts/e2e_services.sh start) and "
    '`eval "$(scripts/e2e_services.sh env)"`, or run `make e2e`'
)


def _service_uri(name: str) -> str:
    uri = os.environ.get(name, "").rstrip("/")
    if not uri:
        pytest.fail(
            f"{name} is not set (the services run on ports chosen at their start); {START_HINT}.", pytrace=False
        )
    return uri


@dataclass
class Credentials:
    user: str
    password: str


@pytest.fixture(scope="session")
def mlflow_credentials() -> Credentials:
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not (user and password):
        pytest.fail(f"MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD are not set; {START_HINT}.", pytrace=False)
    return Credentials(user, password)


@pytest.fixture(scope="session")
def mlflow_uri(mlflow_credentials: Credentials) -> str:
    uri = _service_uri("EMBFT_MLFLOW_URI")
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        opener.open(f"{uri}/health", timeout=10).close()
    except OSError as err:
        pytest.fail(f"No MLflow server answers at EMBFT_MLFLOW_URI={uri} ({err}); {START_HINT}.", pytrace=False)
    return uri


@pytest.fixture(scope="session")
def pg_uri() -> str:
    """Server URI without a database, e.g. postgresql://embft@127.0.0.1:PORT (libpq syntax); the
    password comes from PGPASSFILE."""
    import psycopg2

    uri = _service_uri("EMBFT_PG_URI")
    try:
        psycopg2.connect(f"{uri}/optuna", connect_timeout=10).close()
    except psycopg2.Error as err:
        pytest.fail(
            f"No PostgreSQL (database optuna) at EMBFT_PG_URI={uri} ({str(err).strip()}); {START_HINT}.", pytrace=False
        )
    return uri


@dataclass
class SmokeSweep:
    name: str  # MLflow experiment
    experiment_id: str
    root: Path  # the job's project root (caches, outputs)
    output: str  # stdout + stderr of the command


@pytest.fixture(scope="session")
def smoke_sweep(
    mlflow_uri: str, ag_news_dir: Path, tiny_model: list[str], tmp_path_factory: pytest.TempPathFactory
) -> SmokeSweep:
    """One smoke sweep logged to the server over HTTP, shared by the HTTP and the browser tests (on the tiny
    BERT: the tracking, the registry and serving are under test). Its own project root keeps the project's
    mlruns/ and caches out."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("smoke_root")
    name = f"e2e_smoke_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "EMBFT_ROOT": str(root), "EMBFT_MLFLOW_URI": mlflow_uri, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        sys.executable,
        "-m",
        "embft",
        "-m",
        "experiment=smoke",
        "tracking=server",
        f"data.local_dir={ag_news_dir}",
        *tiny_model,
        f"name={name}",
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(f"smoke sweep failed ({done.returncode}): {' '.join(cmd)}\n{output[-4000:]}", pytrace=False)
    experiment = MlflowClient(tracking_uri=mlflow_uri).get_experiment_by_name(name)
    assert experiment is not None, f"experiment {name} missing on {mlflow_uri}\n{output[-2000:]}"
    return SmokeSweep(name, experiment.experiment_id, root, output)


CHROMIUM = os.environ.get("EMBFT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("EMBFT_CHROMEDRIVER", "/usr/bin/chromedriver")


@pytest.fixture
def chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Debian's headless Chromium through its chromedriver (apt packages chromium, chromium-driver);
    Selenium Manager, which would download a browser or a driver, is never used."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: apt-get install chromium chromium-driver", pytrace=False)

    def no_downloads(*args, **kwargs):
        raise AssertionError("Selenium Manager was called; the test must use Debian's chromium/chromedriver")

    monkeypatch.setattr(SeleniumManager, "binary_paths", no_downloads)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1600,900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()
