"""What the median pruner saves: the same seeded search (experiment=search's space, TPE, seed 42,
same trial count) run twice on the AG News copy, without and with pruning, in this process.

    python benchmarks/search_pruning.py [--data ../shared/data/ag_news] [--trials 8] [--quick] [--out DIR]

Each trial fine-tunes the default model (MiniLM) with embft.training.flagembedding.train.train; the pruned study scores
the live model every --every-steps steps on the job's validation split (data.validation, held out of
AG News train; kNN, embft.evaluation.classification.evaluate on embft.training.flagembedding.trainer.live_sentence_transformer) and reports it to its
trial (embft.training.callbacks.LiveTrainingCallback + the sweeper's TrialReporter). Every trial that runs
to the end is scored once more on the same validation split. Prints per trial, then per study:
training seconds (live evaluation excluded), wall seconds (included), best validation score; last
line: time_ratio=<pruned/unpruned training seconds> score_delta=<pruned - unpruned best score>, after
work_ratio (passage encodings, which load does not change). --out DIR writes DIR/report.md with
both studies' trial tables and Optuna's plots, as `embft report` does for a search.
Measured in experiments/search/README.md (12 trials of 60 queries: time_ratio=0.403, same best).
Sized for 2 CPU cores: about 25 minutes a study at the defaults (MiniLM at ~1.4 queries/s, 200
queries, 1-2 epochs, 8 trials). --quick (3 trials of 12 queries) checks that the script runs; with a
tiny local model (--set model.name_or_path=DIR --set model.package=null) it takes about a minute.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]


def compose(root: Path, overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    import embft.app  # noqa: F401  (registers the schema and resolvers)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(
            "config",
            overrides=["experiment=search", f"paths.root_dir={root}", f"paths.output_dir={root}/out", *overrides],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        params = dict(cfg.hydra.sweeper.params)
        del cfg["hydra"]
    return cfg, params


class StepCounter(TrainerCallback):
    """The optimizer steps a trial actually trained (pruned or not), read off the Trainer's state."""

    steps = 0

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps = state.global_step


def run_study(name: str, pruned: bool, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import optuna

    from embft.data import load_splits
    from embft.encoding.encoders import EncodeSettings, build_encoder
    from embft.encoding.model_folder import resolve_model_path
    from embft.evaluation.classification import evaluate
    from embft.training.callbacks import LiveTrainingCallback
    from embft.training.flagembedding.records import prepare_records
    from embft.training.flagembedding.train import train
    from embft.training.flagembedding.trainer import live_sentence_transformer
    from hydra_plugins.embft_optuna_sweeper._search_space import parse_search_space
    from hydra_plugins.embft_optuna_sweeper.reporting import PRUNER_ATTR, TrialReporter

    sizing = [
        f"data.local_dir={args.data}",
        f"train.max_train_queries={args.queries}",
        f"eval.n_experiments={args.n_experiments}",
        f"eval.max_validation_rows={args.val_rows}",
        "train.logging_steps=10",
        *args.set,
    ]
    cfg, params = compose(root, sizing)
    space = parse_search_space(params)
    splits = load_splits(cfg.data)  # train without the validation rows; validation for every score
    model_path = resolve_model_path(cfg.model)
    storage = f"sqlite:///{root}/optuna.db"
    pruner = {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": args.startup}
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=42),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=args.startup) if pruned else optuna.pruners.NopPruner(),
    )
    rows = []
    for _ in range(args.trials):
        trial = study.ask(space.distributions)
        if pruned:
            trial.set_user_attr(PRUNER_ATTR, pruner)
        cfg, _ = compose(root, sizing + space.overrides(trial.params))
        records = prepare_records(
            splits,
            cache_dir=root / "cache",
            dataset_name="ag_news",
            no_in_batch_neg=cfg.variant.no_in_batch_neg,
            group_size=cfg.train.train_group_size,
            seed=cfg.train.seed,
            max_queries=cfg.train.max_train_queries,
            prompt="",
            batch_size=cfg.train.same_dataset_batch_size,
            pairing=cfg.data.pairing,
        )
        n_records = sum(1 for _ in (records / "train.jsonl").open())

        def score(step: int, model: Any, cfg: Any = cfg) -> float:
            view = live_sentence_transformer(
                model, model_path, cfg.model.pooling, cfg.model.normalize, cfg.eval.max_seq_length
            )
            return evaluate(view, splits, cfg.eval, "ag_news", which=("validation",))["validation"].accuracy

        callback = LiveTrainingCallback(
            score if pruned else None,
            args.every_steps if pruned else None,
            reporter=TrialReporter(name, storage, trial.number) if pruned else None,
        )
        steps = StepCounter()
        start = time.perf_counter()
        result = train(
            cfg, records, model_path, n_records, root / "out" / f"{name}-{trial.number}", callbacks=[callback, steps]
        )
        value = None
        if callback.pruned_step is None:
            final = build_encoder(
                str(result.model_dir),
                cfg.model.pooling,
                cfg.model.normalize,
                EncodeSettings(max_seq_length=cfg.eval.max_seq_length),
                result.device,
            )
            value = evaluate(final, splits, cfg.eval, "ag_news", which=("validation",))["validation"].accuracy
            study.tell(trial, value)
        wall = time.perf_counter() - start
        rows.append(
            {
                "trial": trial.number,
                **trial.params,
                "train_s": result.seconds - callback.eval_seconds,
                "wall_s": wall,
                "steps": steps.steps,
                # load-independent work: passages encoded per query step (query + group) x steps
                "passages": steps.steps * (1 + cfg.train.train_group_size),
                "pruned_step": callback.pruned_step,
                "val_accuracy": value,
            }
        )
        print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1), flush=True)
    frame = pd.DataFrame(rows)
    return {
        "name": name,
        "train_s": frame["train_s"].sum(),
        "wall_s": frame["wall_s"].sum(),
        "passages": frame["passages"].sum(),
        "best": study.best_value,
        "n_pruned": int(frame["pruned_step"].notna().sum()),
    }


def write_report(out: Path, storage: str, study_names: list[str]) -> None:
    """report.md in out: per study the trial table and Optuna's plots, as `embft report` writes a search."""
    import optuna

    from embft.report.search import section, write_plots

    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    text = ["# search_pruning: the same seeded search without (`none`) and with (`median`) pruning", ""]
    for name in study_names:
        study = optuna.load_study(study_name=name, storage=storage)
        plots = write_plots(study, out / name)
        text.append(section(study, plots, out))
    md.write_text("\n".join(text) + "\n")
    print(f"wrote {md}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ag_news"))
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--startup", type=int, default=3, help="MedianPruner n_startup_trials")
    parser.add_argument("--queries", type=int, default=200, help="training queries per trial")
    parser.add_argument("--every-steps", type=int, default=100)
    parser.add_argument("--val-rows", type=int, default=200)
    parser.add_argument("--n-experiments", type=int, default=2, help="MTEB kNN experiments per score")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config override, e.g. model.name_or_path=/a/model model.package=null",
    )
    parser.add_argument("--quick", action="store_true", help="3 trials of 12 queries: checks the script runs")
    parser.add_argument(
        "--out", type=Path, help="write report.md here with both studies' trials and Optuna's plots (embft report's)"
    )
    args = parser.parse_args()
    if args.quick:
        args.trials, args.startup, args.queries, args.every_steps, args.val_rows = 3, 1, 12, 4, 40
    from embft.console import quiet_libraries

    quiet_libraries()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        studies = [run_study(name, name == "median", args, Path(tmp)) for name in ("none", "median")]
        if args.out:
            write_report(args.out, f"sqlite:///{tmp}/optuna.db", [s["name"] for s in studies])
    for s in studies:
        print(
            f"{s['name']:>6}: training {s['train_s']:.0f} s (wall {s['wall_s']:.0f} s, live evaluation "
            f"included), {s['passages']} passage encodings, best val_accuracy_cosine {s['best']:.4f}, {s['n_pruned']} of {args.trials} pruned"
        )
    none, median = studies
    print(f"work_ratio={median['passages'] / none['passages']:.3f} (passage encodings; independent of load)")
    print(f"time_ratio={median['train_s'] / none['train_s']:.3f} score_delta={median['best'] - none['best']:+.4f}")


if __name__ == "__main__":
    main()
