"""`mlflow models serve` on loopback, as the tests and benchmarks run it: started on a free port
without probing one first, stopped with its process group, its memory sampled while it serves."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from embft.errors import EmbftError

HOST = "127.0.0.1"
PORTS = range(20000, 32768)  # below Linux's ephemeral ports: no client connection holds one
_PICK = random.SystemRandom()  # not a seeded `random`: two runs started together pick apart


def start_model_server(
    model_uri: str,
    log: Path,
    *,
    workers: int = 1,
    env: Optional[dict] = None,
    tries: int = 10,
    timeout: float = 300,
) -> tuple[subprocess.Popen, str]:
    """(server, URL) once its log says "Uvicorn running on URL" and every worker started: it holds
    the port then (a /ping that answers could be another server's). A random port, another one while
    the bind fails with "address already in use"; no port is probed and released first, so nothing
    can take it between a check and the bind. The server's own bin folder goes first on PATH
    (`mlflow models serve` runs uvicorn by name)."""
    env = {**(os.environ if env is None else env)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    output = ""
    for _ in range(tries):
        url = f"http://{HOST}:{_PICK.choice(PORTS)}"
        cmd = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", model_uri]
        cmd += ["--env-manager", "local", "--host", HOST, "--port", url.rsplit(":", 1)[1], "--workers", str(workers)]
        with log.open("w") as out:
            server = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            output = log.read_text(errors="replace")
            if f"Uvicorn running on {url}" in output and output.count("Application startup complete") >= workers:
                return server, url
            if server.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(1)
        code = server.poll()
        stop_model_server(server)
        if "address already in use" not in output.lower():
            why = f"exited ({code})" if code is not None else f"did not start in {timeout:.0f} s"
            raise EmbftError(f"mlflow models serve on {url} {why}:\n{output[-3000:]}")
    raise EmbftError(f"mlflow models serve found every port taken in {tries} tries:\n{output[-3000:]}")


def stop_model_server(server: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    # The `mlflow` CLI exits on SIGTERM while its uvicorn workers (same group) may still be computing
    # requests whose clients gave up (MLflow's 504): they would load the next measurement.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()


class PeakRss:
    """The largest summed RSS of a process and its descendants, sampled every 0.2 s in a thread."""

    def __init__(self, pid: int):
        import psutil

        self.root, self.peak, self._done = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        import psutil

        total = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.now())
            self._done.wait(0.2)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=10)
