"""Callbacks on a transformers Trainer (any backend's): live MLflow metrics, a validation score every
`eval.every_steps` steps (or `eval.live_evals` times a run) reported to the job's Optuna trial (pruning), and
one progress bar.

Only the in-process path (train.nproc_per_node == 1) takes callbacks: torchrun's workers are
other processes, without the job's MLflow run or its validation data.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, Optional

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from embft import names

log = logging.getLogger(__name__)

LIVE_VAL_METRIC = names.live(names.validation(names.score_metric("knn", "cosine")))
# score_fn(step, model) -> validation score; `model` is the Trainer's model, which the job views as a
# SentenceTransformer through its backend (embft.training.base.Trainer.live_encoder).
ScoreFn = Callable[[int, Any], float]


class BarOnlyProgressCallback(ProgressCallback):
    """transformers' tqdm bar (steps, rate, ETA) without a printed dict per logging step: the
    latest loss goes into the bar's postfix instead; the losses still reach the log history."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)


def use_progress_bar(trainer: Any) -> None:
    """One progress bar with ETA instead of a dict per logging step.

    The Trainer adds PrinterCallback (prints every log dict) when tqdm is disabled, which it is
    whenever transformers' logger is quieter than WARNING (embft.training.flagembedding.train.quiet_libraries), and
    otherwise ProgressCallback, which writes each dict under its bar.
    """
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(BarOnlyProgressCallback())


class LiveTrainingCallback(TrainerCallback):
    """Logs `train_loss` to the active MLflow run as the Trainer logs it; every `every_steps`
    steps scores the live model with `score_fn`, logs it by step as `live_val_accuracy_cosine` (never
    under the final score's name: MLflow would show the live value at the highest step instead of the
    final one), reports it to the Optuna trial and stops training when the trial's pruner says so.

    The active MLflow run is the job's own run in this process. After training, `scores` holds
    (step, score) pairs and `pruned_step` the step training was stopped at (None: ran to the end).
    """

    def __init__(
        self,
        score_fn: Optional[ScoreFn] = None,
        every_steps: Optional[int] = None,
        reporter: Any = None,  # embft.sweeping.trial_reporter.TrialReporter
        metric: str = LIVE_VAL_METRIC,
        evals: Optional[int] = None,  # eval.live_evals: every_steps set from the run's step count
    ) -> None:
        if every_steps is not None and every_steps < 1:
            from embft.errors import EmbftError

            raise EmbftError(f"eval.every_steps={every_steps}: use a number of steps >= 1, or null for no live eval.")
        if (every_steps is not None or evals is not None) and score_fn is None:
            raise ValueError("live scores need a score_fn")
        self.score_fn = score_fn
        self.every_steps = every_steps
        self.evals = evals
        self.reporter = reporter
        self.metric = metric
        self.scores: list[tuple[int, float]] = []
        self.pruned_step: Optional[int] = None
        self.logged_loss = False
        self.eval_seconds = 0.0  # inside the Trainer's wall time: subtract it for training time alone

    @staticmethod
    def _mlflow():
        import mlflow

        return mlflow if mlflow.active_run() is not None else None

    def on_log(self, args, state, control, logs=None, **kwargs):
        mlflow = self._mlflow()
        if mlflow is not None and logs and "loss" in logs and state.is_world_process_zero:
            mlflow.log_metric("train_loss", float(logs["loss"]), step=state.global_step)
            self.logged_loss = True

    def on_train_begin(self, args, state, control, **kwargs):
        if self.evals:  # the Trainer knows its step count here
            self.every_steps = max(1, math.ceil(state.max_steps / self.evals))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_steps and state.global_step % self.every_steps == 0:
            self._evaluate(state.global_step, model, control)

    def _evaluate(self, step: int, model: Any, control: Any) -> None:
        import random

        import numpy as np
        import torch

        # Scoring must not change training: the same random streams as a run without live evaluation
        # (torch: dropout; Python's random: FlagEmbedding's negative sampling, which MTEB's seeding
        # would reset; numpy), and train mode back (the Trainer sets it each step; other hooks may not).
        model = getattr(model, "model_body", model)  # SetFit's callbacks get its SetFitModel: the body trains
        was_training = model.training
        rng, py_rng, np_rng = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        start = time.perf_counter()
        try:
            score = float(self.score_fn(step, model))  # type: ignore[misc]
        finally:
            torch.random.set_rng_state(rng)
            random.setstate(py_rng)
            np.random.set_state(np_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            model.train(was_training)
            self.eval_seconds += time.perf_counter() - start
        self.scores.append((step, score))
        mlflow = self._mlflow()
        if mlflow is not None:
            mlflow.log_metric(self.metric, score, step=step)
        if self.reporter is None:
            return
        # eval.live_evals: the pruner's step is the score's number, so trials compare at equal fractions of training
        if self.reporter.report(score, len(self.scores) if self.evals else step):
            control.should_training_stop = True
            self.pruned_step = step
            self.reporter.prune(step)
            if mlflow is not None:
                mlflow.set_tags({names.OPTUNA_PRUNED: "true", names.OPTUNA_PRUNED_STEP: str(step)})
            log.info("Pruned at step %d (%s=%.4f): the study's pruner stopped this trial", step, self.metric, score)
