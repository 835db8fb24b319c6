"""Time to a study: the seed grid (4 variants x seeds) at a reduced scale, in two or more arms, through the real app.

  today     fp32 training and evaluation, every variant trained: the study as committed
  fast      the fastest exact settings: train.precision=auto eval.precision=auto eval.backend=auto
            (bf16 where the device runs it natively, else fp32 training and ONNX Runtime
            evaluation), and the default train.reuse_twin (a variant whose no_in_batch_neg suffix
            cannot change training takes its twin's run instead of training the same weights)
  bf16      fast without reuse_twin: what precision alone buys
  parallel  fast with the variants run two at a time by Hydra's joblib launcher (one thread each on
            2 cores): the same settings, scores equal up to thread-order rounding
  no_bf16   what fast resolves to on a CPU without native bf16, forced: timed on any CPU

Each arm runs `python -m embft -m experiment=seed_grid ...` once per seed (4 variant jobs in one warm
process), the arms interleaved seed by seed, alternating which goes first, so that drift in other
load on a shared machine hits both. Everything (MLflow store, records and baseline caches, Hydra
folders) lives in a temporary root; the numbers are read back from MLflow. Each arm computes its own
baseline once, in its first job.

Prints the machine (CPU flags, native bf16, threads, ONNX Runtime), per job wall / train / eval
seconds and scores, per arm totals, per variant the today arm's mean with its 95% t-interval over
seeds and the fast arm's mean, and as its last line study_time_ratio=<fast arm wall / today arm wall>
(arm wall: the arm's app processes from start to exit, imports and baselines included).
With more than two arms each prints study_time_ratio_<arm>= and the last line is the last arm's.

    python benchmarks/study_time.py            # today,fast: 4 variants x 3 seeds, 32 train queries, 1,500 test rows
    python benchmarks/study_time.py --quick    # 2 variants x 2 seeds, 4 queries, 100 test rows: proves it works
    python benchmarks/study_time.py --arms today,bf16,fast,parallel   # each step's share
    python benchmarks/study_time.py --arms today,no_bf16   # the fast path of a CPU without native bf16

Sizing of the defaults: today's and the fast arm take 832 + 338 s (20 minutes) on an idle 2-vCPU
EPYC, all four of today,bf16,fast,parallel 36 minutes (2026-11-30; README "Performance",
experiments/seed_grid/study_time.txt); --quick took 13 minutes on a machine loaded 5-7x over.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
ARMS = {
    # the study as committed: fp32 throughout, every variant trained
    "today": ["train.precision=fp32", "eval.precision=fp32", "eval.backend=torch", "train.reuse_twin=false"],
    # bf16 alone: where the device runs it natively (else fp32 training and ONNX Runtime evaluation)
    "bf16": ["train.precision=auto", "eval.precision=auto", "eval.backend=auto", "train.reuse_twin=false"],
    # the defaults' reuse of a twin's training on top: a variant whose no_in_batch_neg suffix cannot
    # change training (one query per step, or mixed batches) takes its twin's run
    "fast": ["train.precision=auto", "eval.precision=auto", "eval.backend=auto"],
    # fast, with the variants run side by side by Hydra's joblib launcher (conf/hydra/launcher/parallel:
    # 2 jobs); joblib gives each worker cores // n_jobs threads (one-query steps use two threads poorly)
    "parallel": ["train.precision=auto", "eval.precision=auto", "eval.backend=auto", "hydra/launcher=parallel"],
    # what `fast` resolves to on a CPU without native bf16 (fp32 training, ONNX Runtime evaluation),
    # forced, so that its cost can be timed on any CPU
    "no_bf16": ["train.precision=fp32", "eval.precision=fp32", "eval.backend=onnx"],
}
# Twins last: a variant that can take its twin's training finds it finished (and a parallel
# launcher's two workers start on the two that train).
VARIANTS = "same,no_same,same_nib,no_same_nib"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ag_news"))
    parser.add_argument("--variants", default=VARIANTS)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--queries", type=int, default=32, help="train.max_train_queries per job (2 epochs)")
    parser.add_argument("--test-rows", type=int, default=1500, help="eval.max_test_rows (stratified)")
    parser.add_argument(
        "--arms", default="today,fast", help=f"two or more of {', '.join(ARMS)}; the first is the reference"
    )
    parser.add_argument("--quick", action="store_true", help="2 variants x 2 seeds, 4 queries, 100 test rows")
    parser.add_argument("--keep", action="store_true", help="keep the temporary root (MLflow store) and print it")
    parser.add_argument("extra", nargs="*", help="more Hydra overrides for both arms")
    args = parser.parse_args()
    args.arms = args.arms.split(",")
    if len(args.arms) < 2 or not set(args.arms) <= set(ARMS):
        parser.error(f"--arms {','.join(args.arms)}: two or more of {', '.join(ARMS)}")
    if args.quick:
        args.variants, args.seeds, args.queries, args.test_rows = "same,same_nib", "1,2", 4, 100
    return args


def machine() -> str:
    import torch

    from embft.encoding.encoders import onnx_available
    from embft.encoding.precision import CPU_BF16_FLAGS, _cpu_flags, bf16_supported

    flags = _cpu_flags()
    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", *CPU_BF16_FLAGS, "amx_tile") if f in flags]
    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").is_file()
        else "?"
    )
    ort = "not installed"
    if onnx_available():
        import onnxruntime

        ort = onnxruntime.__version__
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (
        f"CPU {model}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, flags "
        f"{' '.join(shown) or '-'}; native bf16 (cpu): {bf16_supported('cpu')}; GPU: {gpu}; torch {torch.__version__}; "
        f"onnxruntime {ort}; load average {os.getloadavg()[0]:.2f}"
    )


def run_sweep(arm: str, seed: str, args: argparse.Namespace, root: Path) -> float:
    command = [
        sys.executable,
        "-m",
        "embft",
        "-m",
        "experiment=seed_grid",
        f"name=study_time_{arm}",
        f"variant={args.variants}",
        f"train.seed={seed}",
        f"train.max_train_queries={args.queries}",
        f"eval.max_test_rows={args.test_rows}",
        f"data.local_dir={args.data}",
        f"paths.root_dir={root}",
        f"paths.cache_dir={root}/cache-{arm}",  # each arm pays for its own baseline
        *ARMS[arm],
        *args.extra,
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    log = root / f"{arm}-seed{seed}.log"
    start = time.perf_counter()
    with log.open("w") as fh:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(f"{arm} seed {seed} failed (exit {done.returncode}); log {log}:\n{tail}")
    print(f"  {arm:<9} seed {seed}: {seconds:6.1f} s", flush=True)
    return seconds


def read_runs(root: Path, arms: list[str]) -> list[dict]:
    import mlflow
    from mlflow.tracking import MlflowClient

    from embft import names

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlruns/mlflow.db")
    client = MlflowClient()
    rows = []
    for arm in arms:
        experiment = client.get_experiment_by_name(f"study_time_{arm}")
        for run in client.search_runs([experiment.experiment_id], max_results=1000):
            tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
            role = tags.get("embft.role")
            took_twin = names.TRAINED_AS in tags
            rows.append(
                {
                    "arm": arm,
                    "role": role,
                    "status": run.info.status,
                    "variant": params.get("variant.name"),
                    "seed": params.get("train.seed"),
                    "wall": (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else float("nan"),
                    # a run that took its twin's training carries the twin's seconds: none spent here
                    "train": 0.0 if took_twin else metrics.get("train_seconds", float("nan")),
                    "eval": 0.0 if took_twin else metrics.get("eval_seconds", float("nan")),
                    "took_twin": took_twin,
                    "accuracy": metrics.get("accuracy_cosine", float("nan")),
                    "train_precision": tags.get("precision", "-"),
                    "eval_path": f"{params.get('eval.precision')}/{params.get('eval.backend')}",
                }
            )
    return rows


def main() -> None:
    args = parse_args()
    import pandas as pd

    from embft.report import t_interval

    seeds = args.seeds.split(",")
    n_variants = len(args.variants.split(","))
    print(f"machine: {machine()}")
    print(
        f"scale: variants {args.variants} x seeds {args.seeds}; train.max_train_queries={args.queries} x 2 epochs; "
        f"eval.max_test_rows={args.test_rows}; {n_variants * len(seeds)} jobs per arm"
    )
    for arm in args.arms:
        print(f"arm {arm}: {' '.join(ARMS[arm])}")
    root = Path(tempfile.mkdtemp(prefix="embft-study-time-"))
    walls = {arm: 0.0 for arm in args.arms}
    try:
        for i, seed in enumerate(seeds):
            for arm in args.arms if i % 2 == 0 else args.arms[::-1]:
                walls[arm] += run_sweep(arm, seed, args, root)
        runs = pd.DataFrame(read_runs(root, args.arms))
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            import shutil

            shutil.rmtree(root, ignore_errors=True)

    jobs = runs[runs["role"] == "finetune"].sort_values(["arm", "seed", "variant"])
    bad = runs[runs["status"] != "FINISHED"]
    if len(jobs) != len(args.arms) * n_variants * len(seeds) or len(bad):
        raise SystemExit(
            f"expected {len(args.arms) * n_variants * len(seeds)} FINISHED jobs, got {len(jobs)} ({len(bad)} not FINISHED)"
        )
    jobs["other"] = jobs["wall"] - jobs["train"] - jobs["eval"]
    print(
        f"\n{'arm':<9}{'variant':<13}{'seed':>5}{'wall s':>8}{'train s':>9}{'eval s':>8}{'other s':>9}"
        f"{'accuracy':>10}  train prec  eval prec/backend"
    )
    for _, j in jobs.iterrows():
        print(
            f"{j.arm:<9}{j.variant:<13}{j.seed:>5}{j.wall:>8.1f}{j.train:>9.1f}{j.eval:>8.1f}{j.other:>9.1f}"
            f"{j.accuracy:>10.4f}  {j.train_precision:<10}  {j.eval_path}{'  (took its twin run)' if j.took_twin else ''}"
        )
    for _, b in runs[runs["role"] == "baseline"].iterrows():
        print(f"baseline {b.arm}: accuracy_cosine {b.accuracy:.4f} ({b.eval_path})")
    print(
        f"\n{'arm':<9}{'processes s':>12}{'jobs s':>8}{'train s':>9}{'eval s':>8}{'other s':>9}  (other: baseline, "
        "records, loading, tracking)"
    )
    for arm in args.arms:
        a = jobs[jobs["arm"] == arm]
        print(
            f"{arm:<9}{walls[arm]:>12.1f}{a.wall.sum():>8.1f}{a.train.sum():>9.1f}{a['eval'].sum():>8.1f}"
            f"{a.other.sum():>9.1f}"
        )
    ref, others = args.arms[0], args.arms[1:]
    print(f"\nper variant: {ref} mean [95% t-interval over seeds] vs each other arm's mean")
    for variant in args.variants.split(","):
        base = jobs[(jobs["arm"] == ref) & (jobs["variant"] == variant)]["accuracy"]
        low, high = t_interval(base.to_numpy()) if len(base) > 1 else (float("nan"), float("nan"))
        line = f"  {variant:<12} {ref} {base.mean():.4f} [{low:.4f}, {high:.4f}]"
        for arm in others:
            mean = jobs[(jobs["arm"] == arm) & (jobs["variant"] == variant)]["accuracy"].mean()
            line += f"  {arm} {mean:.4f} {'within' if low <= mean <= high else 'OUTSIDE'}"
        print(line)
    for arm in others[:-1]:
        print(f"study_time_ratio_{arm}={walls[arm] / walls[ref]:.2f}")
    print(f"study_time_ratio={walls[others[-1]] / walls[ref]:.2f}  ({others[-1]} / {ref})")


if __name__ == "__main__":
    main()
