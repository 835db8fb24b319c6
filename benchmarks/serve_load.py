"""The served classifier under load: `mlflow models serve` on loopback, concurrent clients.

    python benchmarks/serve_load.py [--quick] [--model-uri models:/NAME@champion] [--workers 1,2]

For each server worker setting (default: 1 and the core count), one server; against it, 1, 8 and
32 concurrent clients (threads, one keep-alive connection each) sending one text and 64 texts per
request. Each setting is bounded in count and time: clients start requests until --requests have
started (at least one per client) or --seconds have passed, then the ones in flight finish.
One line per setting:

    workers=1 threads=2 clients=8 texts_per_request=1 requests=100 seconds=4.1 rps=24.4 texts_per_s=24.4 \
p50_ms=310.2 p95_ms=402.0 p99_ms=415.3 peak_rss_mb=1040 errors=0

rps counts answered requests per second of the setting's wall time; peak_rss_mb is the largest
summed RSS of the server's process tree (the `mlflow` CLI, uvicorn and its workers) sampled every
0.2 s during the setting; errors counts requests that got no 200 with one prediction per text
(a timeout, a refused connection, a 5xx, MLflow's 504 after its 60 s request timeout). The
command exits 1 if any setting had an error.

Each worker runs torch with --threads intra-op threads (default: cores // workers, through
OMP_NUM_THREADS): two workers of two threads each on two cores spin against each other. Without
--model-uri the classifier is built as benchmarks/serve_latency.py builds it (MiniLM, 64 tokens,
k=3 cosine, 256 AG News support texts per class) in a throwaway sqlite store. --quick: 8 s and
48 requests per setting (the whole run takes ~5 minutes on 2 cores); the default 60 s and 1,000.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_server import HOST, PeakRss, start_model_server, stop_model_server  # noqa: E402
from serve_latency import DATA, build_model  # noqa: E402

CLIENTS = (1, 8, 32)
TEXTS_PER_REQUEST = (1, 64)


def serve(model_uri: str, workers: int, threads: int, log: Path) -> tuple[subprocess.Popen, int]:
    """The server up with `workers` workers of `threads` torch threads each; (server, port)."""
    server, url = start_model_server(
        model_uri, log, workers=workers, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, timeout=600
    )
    return server, int(url.rsplit(":", 1)[1])


def percentile(ms: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of them at or below it."""
    if not ms:
        return float("nan")
    ordered = sorted(ms)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def run_setting(port: int, texts: list[str], clients: int, per_request: int, requests: int, seconds: float):
    """Returns (answered latencies in ms, errors, first error, wall seconds)."""
    lock = threading.Lock()
    started = [0]
    latencies: list[float] = []
    errors: list[str] = []
    budget = max(requests, clients)
    deadline = time.monotonic() + seconds

    def client() -> None:
        connection = http.client.HTTPConnection(HOST, port, timeout=180)
        try:
            while True:
                with lock:
                    if started[0] >= budget or (started[0] >= clients and time.monotonic() > deadline):
                        return
                    n = started[0]
                    started[0] += 1
                batch = [texts[(n * per_request + j) % len(texts)] for j in range(per_request)]
                body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [[t] for t in batch]}})
                start = time.perf_counter()
                try:
                    connection.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
                    response = connection.getresponse()
                    payload = response.read()
                    elapsed = (time.perf_counter() - start) * 1000
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}: {payload[:300]!r}")
                    if len(json.loads(payload)["predictions"]) != per_request:
                        raise RuntimeError("wrong number of predictions")
                    with lock:
                        latencies.append(elapsed)
                except (OSError, http.client.HTTPException, RuntimeError, ValueError, KeyError) as err:
                    with lock:
                        errors.append(f"{type(err).__name__}: {err}")
                    connection.close()
                    connection = http.client.HTTPConnection(HOST, port, timeout=180)
        finally:
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors, time.perf_counter() - start


def machine() -> str:
    model, flags = "unknown CPU", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    native = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores, {'+'.join(native) if native else 'no avx512_bf16/amx'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 s and 48 requests per setting")
    parser.add_argument("--model-uri", help="default: build the MiniLM classifier in a throwaway store")
    parser.add_argument("--support-per-class", type=int, default=256)
    parser.add_argument("--workers", help="server worker settings, comma-separated (default: 1 and the core count)")
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: cores // workers)")
    parser.add_argument("--requests", type=int, help="most requests per setting (default 1000, --quick 48)")
    parser.add_argument("--seconds", type=float, help="time per setting (default 60, --quick 8)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    workers_list = [int(w) for w in args.workers.split(",")] if args.workers else sorted({1, cores})
    requests = args.requests or (48 if args.quick else 1000)
    seconds = args.seconds or (8.0 if args.quick else 60.0)

    texts = pd.read_csv(DATA / "test.csv", nrows=640)["text"].tolist()
    print(f"machine: {machine()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        uri = args.model_uri or build_model(Path(tmp), args.support_per_class)
        print(f"model {uri}; each setting: at most {requests} requests or {seconds:g} s", flush=True)
        for workers in workers_list:
            threads = args.threads or max(1, cores // workers)
            log = Path(tmp) / f"serve_{workers}.log"
            started = time.monotonic()
            server, port = serve(uri, workers, threads, log)
            print(f"workers={workers}: server up in {time.monotonic() - started:.0f} s", flush=True)
            try:
                run_setting(port, texts, max(workers, 2), 1, 2 * workers, 0)  # warm-up: lazy initialisation
                run_setting(port, texts, max(workers, 2), 64, 2 * workers, 0)
                for clients in CLIENTS:
                    for per_request in TEXTS_PER_REQUEST:
                        with PeakRss(server.pid) as rss:
                            latencies, errors, wall = run_setting(port, texts, clients, per_request, requests, seconds)
                        done = len(latencies)
                        print(
                            f"workers={workers} threads={threads} clients={clients} texts_per_request={per_request} "
                            f"requests={done + len(errors)} seconds={wall:.1f} rps={done / wall:.1f} "
                            f"texts_per_s={done * per_request / wall:.1f} p50_ms={percentile(latencies, 0.50):.1f} "
                            f"p95_ms={percentile(latencies, 0.95):.1f} p99_ms={percentile(latencies, 0.99):.1f} "
                            f"peak_rss_mb={rss.peak / 2**20:.0f} errors={len(errors)}",
                            flush=True,
                        )
                        if errors:
                            failed = True
                            print(f"  first error: {errors[0]}", file=sys.stderr, flush=True)
                if server.poll() is not None:
                    raise SystemExit(f"the server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
            finally:
                stop_model_server(server)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
