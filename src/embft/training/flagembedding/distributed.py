"""One job's fine-tuning in several processes (train.nproc_per_node > 1) under torchrun.

The job's own process prepares the data, then `launch` writes the runner's arguments (see
`embft.training.flagembedding.runner.runner_spec`) to a JSON spec and runs the real torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node N -m embft.training.flagembedding.distributed spec.json

Every worker runs `embft.training.flagembedding.runner.run_runner`, the same code as a one-process job; Hugging Face's
TrainingArguments reads RANK/WORLD_SIZE from the environment and wraps the model in DDP (NCCL on
CUDA, gloo on CPU). Only rank 0 saves the bare weights; the job's process converts them into a
SentenceTransformer folder, evaluates and tracks, exactly as after a one-process run.

What FlagEmbedding 1.4.2 does under DDP (checked in its source):
- Same-dataset mode: every rank builds the same list of global batches (same seed), each of
  `batch_size x world_size` queries, and takes its own slice by rank; `__getitem__` ignores the
  sampler's index, and `__len__` is `batches x world_size`, so after the Trainer's per-rank split
  each rank walks every global batch once. Per-device batch sizes are therefore per process.
- `negatives_cross_device` all-gathers queries and passages (gradients flow only through the local
  slice) for the in-batch loss; the no-in-batch-negatives loss never uses it.
- Only `should_save` (rank 0) saves; the logged loss is averaged over ranks.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

from embft.console import quiet_libraries
from embft.errors import EmbftError
from embft.training.flagembedding.runner import RunnerOutcome, RunnerSpec, run_runner

log = logging.getLogger(__name__)


def ddp_backend(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def torchrun_command(spec_path: Path, nproc: int, log_dir: Path) -> list[str]:
    """The torchrun command line; `--tee 3` prefixes every worker line with its rank ([default0]:)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "--tee",
        "3",
        "--log-dir",
        str(log_dir),
        "-m",
        "embft.training.flagembedding.distributed",
        str(spec_path),
    ]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset / cgroup cpusets
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_env(nproc: int, base: Optional[Mapping[str, str]] = None, cores: Optional[int] = None) -> dict[str, str]:
    """Environment for torchrun and its workers.

    OMP_NUM_THREADS: the cores split between the workers (torchrun's own default is 1, which leaves
    cores idle on a CPU); a value set by the user is kept.
    """
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (cores or available_cores()) // nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"  # worker lines reach the job's log as they happen
    return env


def distributed_training_args(device: str) -> dict:
    # tqdm's carriage-return bars would garble the job's log; the Trainer then prints loss lines instead.
    return {"ddp_backend": ddp_backend(device), "disable_tqdm": True}


def launch(spec: RunnerSpec, nproc: int, device: str, work_parent: Path) -> RunnerOutcome:
    """Run `spec` in `nproc` torchrun workers; return rank 0's outcome or raise EmbftError."""
    work = Path(tempfile.mkdtemp(prefix=".torchrun.", dir=work_parent))
    try:
        spec = replace(
            spec,
            training_args={**spec.training_args, **distributed_training_args(device)},
            result_file=str(work / "result.json"),
            error_dir=str(work / "errors"),
        )
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec.to_dict(), indent=1))
        cmd = torchrun_command(spec_path, nproc, work / "logs")
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()  # this process's cached blocks would crowd rank 0's GPU
        env = worker_env(nproc)
        log.info(
            "Training in %d processes (%s, OMP_NUM_THREADS=%s): %s",
            nproc,
            ddp_backend(device),
            env["OMP_NUM_THREADS"],
            shlex.join(cmd),
        )
        start = time.perf_counter()
        returncode, tail = _run_logged(cmd, env)
        wall = time.perf_counter() - start
        if returncode != 0:
            raise EmbftError(failure_message(Path(spec.error_dir), returncode, nproc, tail))
        result_file = Path(spec.result_file)
        if not result_file.is_file() or not any(Path(spec.training_args["output_dir"]).iterdir()):
            raise EmbftError(
                f"train.nproc_per_node={nproc}: torchrun exited 0 but rank 0 saved no model; "
                "see the workers' output above in the job's log."
            )
        result = json.loads(result_file.read_text())
        outcome = RunnerOutcome(seconds=result["seconds"], losses=[(int(s), float(v)) for s, v in result["losses"]])
        log.info("torchrun: %d processes finished in %.0f s (%.0f s training on rank 0)", nproc, wall, outcome.seconds)
        return outcome
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_logged(cmd: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """Run cmd, sending each output line to the job's log; return (exit code, last lines)."""
    tail: deque[str] = deque(maxlen=30)
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        bufsize=1,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                log.info("%s", line)
        return proc.wait(), list(tail)
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C, a failing log handler): take the workers down too
            proc.terminate()  # torchrun forwards SIGTERM to its workers
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def failure_message(error_dir: Path, returncode: int, nproc: int, tail: list[str]) -> str:
    """One line for the job's error: the first rank's Python error, else the end of torchrun's output."""
    errors = sorted(error_dir.glob("rank*.json"), key=lambda p: p.stat().st_mtime) if error_dir.is_dir() else []
    if errors:
        # The first failure is the cause; the other ranks typically fail after it on a broken collective.
        first = json.loads(errors[0].read_text())
        return (
            f"train.nproc_per_node={nproc}: training failed on rank {first['rank']}: {first['error']} "
            f"(torchrun exit {returncode}; the workers' output is in the job's log)."
        )
    last = next((line for line in reversed(tail) if line.strip()), "no output")
    return (
        f"train.nproc_per_node={nproc}: a training process died without a Python error (torchrun exit "
        f"{returncode}; killed for memory?). Last output: {last}"
    )


def _worker(spec_path: str) -> None:
    spec = RunnerSpec(**json.loads(Path(spec_path).read_text()))
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    quiet_libraries()
    try:
        outcome = run_runner(spec)
    except BaseException as err:
        error_dir = Path(spec.error_dir)
        error_dir.mkdir(parents=True, exist_ok=True)
        text = str(err).strip()
        message = f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
        (error_dir / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "error": message}))
        raise
    if rank == 0:
        tmp = Path(spec.result_file + ".tmp")
        tmp.write_text(json.dumps(asdict(outcome)))
        os.replace(tmp, spec.result_file)


def main(argv: Optional[list[str]] = None) -> None:
    """torchrun's worker entry point: `-m embft.training.flagembedding.distributed spec.json`."""
    from torch.distributed.elastic.multiprocessing.errors import record

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit(
            "usage: torchrun ... -m embft.training.flagembedding.distributed SPEC.json (written by embft.training.flagembedding.distributed.launch)"
        )
    record(_worker)(args[0])  # record: torchrun's failure summary then shows the traceback


if __name__ == "__main__":
    main()
