"""Per-job fixed cost of a grid once caches are warm: start-up, model load, data preparation
(cache hit), baseline (cache hit), tracking, everything but training and the fine-tuned evaluation.

    python benchmarks/sweep_overhead.py [--data ../shared/data/ag_news]
Runs a warm-up job, then a 4-job grid (4 seeds, tiny training and evaluation) in a fresh project
root under /tmp, and prints per-job figures. Last line: overhead_s=<mean fixed cost per job>.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "experiment=smoke",
    "train.max_train_queries=8",
    "eval.max_test_rows=100",
    "eval.n_experiments=1",
    "train.logging_steps=1",
]


def run(root: Path, *args: str) -> float:
    env = {**os.environ, "EMBFT_ROOT": str(root), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "embft", *args], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ag_news"))
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        warm = run(root, *TINY, f"data.local_dir={args.data}", "train.seed=0")
        wall = run(root, "-m", *TINY, f"data.local_dir={args.data}", "train.seed=1,2,3,4", "name=overhead")
        client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
        exp = client.get_experiment_by_name("overhead")
        jobs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("embft.role") == "finetune"]
        work = [r.data.metrics["train_seconds"] + r.data.metrics["eval_seconds"] for r in jobs]
        print(f"warm-up job (cold caches): {warm:.1f} s")
        print(
            f"4-job grid wall time: {wall:.1f} s; training + fine-tuned evaluation: "
            + ", ".join(f"{w:.1f}" for w in work)
            + " s"
        )
        overhead = (wall - sum(work)) / len(jobs)
        print(f"fixed cost per job (incl. its share of one process start-up): {overhead:.1f} s")
        print(f"overhead_s={overhead:.1f}")


if __name__ == "__main__":
    main()
