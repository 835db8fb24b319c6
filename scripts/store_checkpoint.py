"""Carry an unfinished study's stores (mlruns/: MLflow's and Optuna's SQLite files and the runs' artifacts,
logged models left out) from one session to the next as one file kept outside the repository (a few MB), so a study longer than a
session (experiments/label_budget's 64-per-class cells on 2 cores) resumes where it stopped: finished jobs
and Optuna trials are found again, a trial cut off is retried. Own code: the stores are two files and a
folder, carried whole so run ids, trials and their links stay as they were.

  python scripts/store_checkpoint.py save /work/checkpoints/trec_64.tar.gz
  python scripts/store_checkpoint.py restore /work/checkpoints/trec_64.tar.gz

Stop the sweep first (Ctrl-C; save closes the parent run it leaves RUNNING, as KILLED). Save only while no model is logged (a search logs none; an advise's seed
confirmations log the champion's, which a checkpoint without models could not register): finish those in
one session. Restore into an empty mlruns/ of a checkout at the path it was saved from (the stores hold
absolute paths).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOT_MARKER = "ROOT"  # the checkout's path the stores were written at
MODELS = "models"  # mlruns/artifacts/<experiment>/models: logged models, too large for git


class CheckpointError(Exception):
    pass


def save(checkpoint: Path, root: Path = ROOT) -> list[str]:
    """Write mlruns/ less its logged models to `checkpoint` (a .tar.gz); returns the member names."""
    store = root / "mlruns"
    if not (store / "mlflow.db").is_file():
        raise CheckpointError(f"{store}/mlflow.db: no MLflow store to save.")
    models = sorted(store.glob(f"artifacts/*/{MODELS}/*"))
    if models:
        raise CheckpointError(
            f"{models[0]}: the store holds a logged model; a checkpoint leaves models out, so it could not register "
            "the champion. Save before a study logs models (an advise's searches), or finish it in this session."
        )
    _close_stopped_sweeps(store)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(checkpoint, "w:gz") as tar:
        marker = str(root).encode()
        info = tarfile.TarInfo(ROOT_MARKER)
        info.size = len(marker)
        tar.addfile(info, io.BytesIO(marker))
        for path in sorted(store.rglob("*")):
            if path.is_file() and not path.name.endswith(".lock"):
                tar.add(path, arcname=str(path.relative_to(store)), recursive=False)
        return tar.getnames()


def _close_stopped_sweeps(store: Path) -> None:
    """A sweep stopped by Ctrl-C leaves its parent run RUNNING (Hydra calls no callback); the next sweep closes
    it only on the machine whose process it was, so close it (KILLED) here, before it travels. In a child
    process: MLflow keeps one engine per store URI, which would outlive a restore over this file."""
    code = (
        "import mlflow\n"
        "from embft.tracking.study_runs import close_dead_sweep_parents\n"
        "for e in mlflow.MlflowClient().search_experiments(): close_dead_sweep_parents(e.experiment_id)\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)


def restore(checkpoint: Path, root: Path = ROOT) -> None:
    """Unpack `checkpoint` into root/mlruns, which must hold no store yet."""
    store = root / "mlruns"
    if (store / "mlflow.db").exists() or (store / "optuna.db").exists():
        raise CheckpointError(f"{store} holds a store already: move it away, then restore into an empty mlruns/.")
    with tarfile.open(checkpoint, "r:gz") as tar:
        marker = tar.extractfile(ROOT_MARKER)
        saved = marker.read().decode() if marker else ""
        if Path(saved) != root:
            raise CheckpointError(
                f"{checkpoint} was saved at {saved} and its stores name that path: restore it from a checkout "
                f"there (git worktree add {saved}), not {root}."
            )
        members = [m for m in tar.getmembers() if m.name != ROOT_MARKER]
        store.mkdir(parents=True, exist_ok=True)
        tar.extractall(store, members=members, filter="data")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("save", "restore"))
    parser.add_argument("checkpoint", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.action == "save":
            names = save(args.checkpoint.resolve())
            print(f"{args.checkpoint}: {len(names) - 1} files of {ROOT / 'mlruns'}")
        else:
            restore(args.checkpoint.resolve())
            print(f"{ROOT / 'mlruns'}: restored from {args.checkpoint}")
    except CheckpointError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
