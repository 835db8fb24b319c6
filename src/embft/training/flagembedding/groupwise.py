"""Per-query ("groupwise") scoring for FlagEmbedding's no-in-batch-negatives loss.

FlagEmbedding's `_compute_no_in_batch_neg_loss` scores every query against every passage of the
batch, (B, d) x (d, B*G), then gathers each query's own G scores: B times the needed work and a
(B, B*G) matrix. `GroupwiseEmbedderModel` scores each query against its own group only,
(B, 1, d) x (B, d, G) -> (B, G), with the same loss (cross-entropy, positive at index 0).
Use `GroupwiseEmbedderRunner` in place of `EncoderOnlyEmbedderRunner` to train with it.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from FlagEmbedding.finetune.embedder.encoder_only.base import EncoderOnlyEmbedderRunner
from FlagEmbedding.finetune.embedder.encoder_only.base.modeling import BiEncoderOnlyEmbedderModel
from torch import Tensor
from transformers import PreTrainedTokenizer

log = logging.getLogger(__name__)


def groupwise_scores(q_reps: Tensor, p_reps: Tensor, temperature: float) -> Tensor:
    """Scores (B, G) of each query against its own G passages.

    q_reps: (B, d); p_reps: (B*G, d), query i's group in rows i*G .. i*G+G-1 (FlagEmbedding's layout).
    """
    n_queries, dim = q_reps.shape
    group = p_reps.size(0) // n_queries
    groups = p_reps.reshape(n_queries, group, dim)
    return torch.bmm(q_reps.unsqueeze(1), groups.transpose(1, 2)).squeeze(1) / temperature


class GroupwiseEmbedderModel(BiEncoderOnlyEmbedderModel):
    """`BiEncoderOnlyEmbedderModel` whose no-in-batch-negatives loss scores only each query's own group.

    Adds no parameters or state, so an instance of the parent class can be re-classed to it.
    """

    def _compute_no_in_batch_neg_loss(
        self,
        q_reps: Tensor,
        p_reps: Tensor,
        teacher_targets: Optional[Tensor] = None,
        compute_score_func=None,
        **kwargs,
    ) -> tuple[Tensor, Tensor]:
        """(local scores (B, G), mean cross-entropy with the positive at index 0), as the stock method."""
        if teacher_targets is not None or compute_score_func is not None:
            return super()._compute_no_in_batch_neg_loss(
                q_reps, p_reps, teacher_targets=teacher_targets, compute_score_func=compute_score_func, **kwargs
            )
        scores = groupwise_scores(q_reps, p_reps, self.temperature)
        targets = torch.zeros(scores.size(0), device=scores.device, dtype=torch.long)
        return scores, self.compute_loss(scores, targets)


class GroupwiseEmbedderRunner(EncoderOnlyEmbedderRunner):
    """`EncoderOnlyEmbedderRunner` that trains a `GroupwiseEmbedderModel`."""

    def load_tokenizer_and_model(self) -> tuple[PreTrainedTokenizer, GroupwiseEmbedderModel]:
        tokenizer, model = super().load_tokenizer_and_model()
        if type(model) is not BiEncoderOnlyEmbedderModel:
            raise TypeError(f"expected a BiEncoderOnlyEmbedderModel from FlagEmbedding, got {type(model).__name__}")
        # The subclass only overrides a method, so swapping the class of the fully loaded model is exact
        # and keeps FlagEmbedding's own loading code (freezing, gradient checkpointing hooks) in charge.
        model.__class__ = GroupwiseEmbedderModel
        return tokenizer, model
