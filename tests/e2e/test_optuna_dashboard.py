"""optuna-dashboard (make optuna-dashboard), in Debian's headless Chromium, shows a search's study
and its trials, from a SQLite file or the e2e PostgreSQL server (a bare postgresql:// URL, as in
hydra.sweeper.storage).

The study is made by a real search of the stand-in app (tests/sweeper_app: no model training).
Selenium drives Debian's headless Chromium (the `chromium` fixture of tests/e2e/conftest.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "tests" / "sweeper_app" / "my_app.py"
SCREENSHOT = ROOT / ".e2e" / "screenshots" / "optuna_dashboard.png"
N_TRIALS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def _search(storage: str, study: str, cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(APP), "-m", f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={study}"]
        + [f"hydra.sweeper.n_trials={N_TRIALS}", "hydra.sweep.dir=sweep"],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _api(url: str):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return json.load(response)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_optuna_dashboard_shows_the_study_and_its_trials(chromium, backend: str, tmp_path: Path, request) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    study = f"dashboard-{uuid.uuid4().hex[:8]}"
    storage = (
        f"sqlite:///{tmp_path}/optuna.db" if backend == "sqlite" else f"{request.getfixturevalue('pg_uri')}/optuna"
    )
    _search(storage, study, tmp_path)

    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embft.sweeping.dashboard",
            "--storage",
            storage,
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # The command prints the study's own page first: wait for that line (observable state, no sleep).
        assert server.stdout is not None
        line = ""
        while f"  {study}: " not in line:
            line = server.stdout.readline()
            assert line or server.poll() is None, "the dashboard exited before listing the study"
        url = line.split(": ", 1)[1].split(" ", 1)[0]
        assert url.startswith(f"http://127.0.0.1:{port}/dashboard/studies/")

        def answers(_) -> bool:
            try:
                return any(
                    s["study_name"] == study for s in _api(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
                )
            except OSError:
                return False

        WebDriverWait(chromium, 120, poll_frequency=0.2).until(answers)
        chromium.get(f"{url}/trials")
        body = lambda: chromium.find_element(By.TAG_NAME, "body").text  # noqa: E731
        WebDriverWait(chromium, 120).until(lambda _: study in body() and f"Trial {N_TRIALS - 1}" in body())
        assert all(f"Trial {n}" in body() for n in range(N_TRIALS))
        assert "COMPLETE" in body().upper()
    finally:
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        chromium.save_screenshot(str(SCREENSHOT))
        server.terminate()
        server.wait(timeout=30)
