"""The served classifier under load, per served backend: `mlflow models serve` on loopback, concurrent clients.

    python benchmarks/serve_load.py [--quick] [--backends torch,onnx,onnx_int8,openvino,openvino_int8]
                                    [--model-uri models:/NAME@champion] [--workers 1,2]

One model (MiniLM, 64 tokens, k=3 cosine, 256 AG News support texts per class, as
benchmarks/serve_latency.py builds it) is exported once per backend (embft.encoding.export, as a job with
tracking.serve_backend does) and logged as a classifier; one server per backend, all up at once, and the
settings interleaved: for each client count (1, 8, 32) and texts per request (1, 64), every backend in
turn. Each setting is bounded in count and time: clients start requests until --requests have started
(at least one per client) or --seconds have passed, then the ones in flight finish. One line per setting:

    backend=onnx workers=1 threads=2 clients=8 texts_per_request=1 requests=100 seconds=4.1 rps=24.4 \
texts_per_s=24.4 p50_ms=310.2 p95_ms=402.0 p99_ms=415.3 peak_rss_mb=1040 errors=0

rps counts answered requests per second of the setting's wall time; peak_rss_mb is the largest
summed RSS of the server's process tree (the `mlflow` CLI, uvicorn and its workers) sampled every
0.2 s during the setting; errors counts requests that got no 200 with one prediction per text
(a timeout, a refused connection, a 5xx, MLflow's 504 after its 60 s request timeout). Before the
load, per backend: its accuracy on the HELD_OUT_ROWS AG News train rows that no support set holds
(serve_latency.split_train; the choice below is made on them, never on test) next to torch fp32's, and
its texts per second in this process (the pyfunc model's predict, one text per call, and 8 texts per call: what a
server batching 8 clients' one-text requests could reach, where MLflow's answers each request alone):
what the server adds on top is MLflow's. The last line is `serve_speedup=<x>`: the best backend whose
accuracy is within --max-drop (0.005) of torch fp32, over torch fp32, in requests per second of one
text at 8 clients. The command exits 1 if any setting had an error.

Each worker runs with --threads intra-op threads (default: cores // workers, through OMP_NUM_THREADS,
which torch, ONNX Runtime and OpenVINO read): two workers of two threads each on two cores spin against
each other. With --model-uri, that one classifier is served as logged (one backend, its own).
--quick: 8 s and 48 requests per setting, one worker; the default 60 s and 1,000, workers 1 and the core count.
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
from serve_latency import build_model, split_train  # noqa: E402

CLIENTS = (1, 8, 32)
TEXTS_PER_REQUEST = (1, 64)
BACKENDS = ("torch", "onnx", "onnx_int8", "openvino", "openvino_int8")


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
    native = [f for f in ("avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores, {'+'.join(native) if native else 'no avx512_bf16/vnni/amx'}"


def build_backends(store: Path, backends: list[str], per_class: int) -> dict[str, str]:
    """The serve_latency model exported once per backend and logged as a classifier: {backend: model URI}."""
    import shutil

    import mlflow

    from embft.encoding.export import export_for_serving

    build_model(store, per_class)  # the torch fp32 folder (store/minilm) and a throwaway sqlite store
    train, _ = split_train()  # the support pool build_model drew from
    uris = {}
    for backend in backends:
        folder = store / f"minilm_{backend}"
        shutil.copytree(store / "minilm", folder)
        started = time.monotonic()
        export_for_serving(folder, backend, train["text"].tolist())
        print(f"backend={backend}: exported in {time.monotonic() - started:.0f} s", flush=True)
        uris[backend] = log_backend(folder, train, per_class, mlflow)
    return uris


def log_backend(folder: Path, train: pd.DataFrame, per_class: int, mlflow) -> str:
    from embft.serving.models import log_models

    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("serve_latency").experiment_id):
        return log_models(
            folder,
            train,
            ["World", "Sports", "Business", "Sci/Tech"],
            k=3,
            metric="cosine",
            support_per_class=per_class,
            seed=42,
        )


def in_process(uri: str, rows: pd.DataFrame, texts: list[str]) -> tuple[float, float, float]:
    """(accuracy on `rows`, texts per second of one-text predict calls on `texts`, and of calls of 8 texts) of
    the logged classifier. The 8-text rate is what a server that batched 8 clients' one-text requests into one
    predict could reach (MLflow's answers each request alone)."""
    import mlflow

    model = mlflow.pyfunc.load_model(uri)
    accuracy = float((model.predict(rows[["text"]])["label"].to_numpy() == rows["label"].to_numpy()).mean())
    model.predict(pd.DataFrame({"text": texts[:1]}))
    started = time.perf_counter()
    for text in texts:
        model.predict(pd.DataFrame({"text": [text]}))
    one = len(texts) / (time.perf_counter() - started)
    started = time.perf_counter()
    for i in range(0, len(texts), 8):
        model.predict(pd.DataFrame({"text": texts[i : i + 8]}))
    return accuracy, one, len(texts) / (time.perf_counter() - started)


def wait_idle(pid: int, timeout: float = 300) -> None:
    """Until the server's process tree uses under 10% of a core over half a second (at most `timeout`)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        before = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
        time.sleep(0.5)
        with contextlib.suppress(psutil.Error):
            after = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
            if after - before < 0.05:
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 s and 48 requests per setting, one worker")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="served backends, comma-separated")
    parser.add_argument("--model-uri", help="serve this classifier as logged (default: build one per backend)")
    parser.add_argument("--support-per-class", type=int, default=256)
    parser.add_argument("--workers", help="server worker settings, comma-separated (default: 1 and the core count)")
    parser.add_argument("--threads", type=int, help="intra-op threads per worker (default: cores // workers)")
    parser.add_argument("--requests", type=int, help="most requests per setting (default 1000, --quick 48)")
    parser.add_argument("--seconds", type=float, help="time per setting (default 60, --quick 8)")
    parser.add_argument("--max-drop", type=float, default=0.005, help="accuracy bound for serve_speedup")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    default_workers = [1] if args.quick else sorted({1, cores})
    workers_list = [int(w) for w in args.workers.split(",")] if args.workers else default_workers
    requests = args.requests or (48 if args.quick else 1000)
    seconds = args.seconds or (8.0 if args.quick else 60.0)

    _, rows = split_train()  # held out of every support set: accuracy and the load texts
    texts = rows["text"].tolist()[:640]
    print(f"machine: {machine()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    failed = False
    rps: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_uri:
            uris = {"as_logged": args.model_uri}
        else:
            uris = build_backends(Path(tmp), [b.strip() for b in args.backends.split(",")], args.support_per_class)
        accuracy = {}
        for backend, uri in uris.items():
            accuracy[backend], speed, batched = in_process(uri, rows, texts[:64])
            print(
                f"backend={backend} accuracy={accuracy[backend]:.4f} on {len(rows)} rows; in-process "
                f"texts_per_s_1={speed:.1f} texts_per_s_8={batched:.1f} (threads {cores})",
                flush=True,
            )
        print(f"each setting: at most {requests} requests or {seconds:g} s", flush=True)
        for workers in workers_list:
            threads = args.threads or max(1, cores // workers)
            servers = {}
            try:
                for backend, uri in uris.items():
                    log = Path(tmp) / f"serve_{backend}_{workers}.log"
                    started = time.monotonic()
                    servers[backend] = serve(uri, workers, threads, log)
                    print(f"backend={backend} workers={workers}: server up in {time.monotonic() - started:.0f} s")
                    port = servers[backend][1]
                    run_setting(port, texts, max(workers, 2), 1, 2 * workers, 0)  # warm-up: lazy initialisation
                    run_setting(port, texts, max(workers, 2), 64, 2 * workers, 0)
                for clients in CLIENTS:
                    for per_request in TEXTS_PER_REQUEST:
                        for backend, (server, port) in servers.items():  # interleaved: one setting, every backend
                            with PeakRss(server.pid) as rss:
                                latencies, errors, wall = run_setting(
                                    port, texts, clients, per_request, requests, seconds
                                )
                            done = len(latencies)
                            if per_request == 1 and workers == workers_list[0]:
                                rps[(backend, clients)] = done / wall
                            print(
                                f"backend={backend} workers={workers} threads={threads} clients={clients} "
                                f"texts_per_request={per_request} requests={done + len(errors)} seconds={wall:.1f} "
                                f"rps={done / wall:.1f} texts_per_s={done * per_request / wall:.1f} "
                                f"p50_ms={percentile(latencies, 0.50):.1f} p95_ms={percentile(latencies, 0.95):.1f} "
                                f"p99_ms={percentile(latencies, 0.99):.1f} peak_rss_mb={rss.peak / 2**20:.0f} "
                                f"errors={len(errors)}",
                                flush=True,
                            )
                            if errors:
                                failed = True
                                print(f"  first error: {errors[0]}", file=sys.stderr, flush=True)
                            wait_idle(server.pid)  # a request its client gave up on (504) still runs there
                for backend, (server, _) in servers.items():
                    if server.poll() is not None:
                        raise SystemExit(f"the {backend} server exited ({server.returncode})")
            finally:
                for server, _ in servers.values():
                    stop_model_server(server)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    if "torch" in accuracy:
        within = [b for b in accuracy if accuracy["torch"] - accuracy[b] <= args.max_drop and (b, 8) in rps]
        best = max(within, key=lambda b: rps[(b, 8)])
        print(
            f"best within {args.max_drop:g} of torch fp32's accuracy: {best} "
            f"({rps[(best, 8)]:.1f} vs {rps[('torch', 8)]:.1f} requests/s, one text, 8 clients)"
        )
        print(f"serve_speedup={rps[(best, 8)] / rps[('torch', 8)]:.2f}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
