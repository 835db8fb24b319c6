"""Supervised contrastive loss (Khosla et al. 2020, "L_out"): in-batch InfoNCE where every other text of
the anchor's class is a positive and no text of its class is a negative.

Own code: sentence-transformers 5.x ships no supervised contrastive loss (its in-batch losses,
MultipleNegativesRankingLoss and kin, take every other row as a negative, which with class labels
makes same-class texts false negatives: the seed's finding), and no maintained library ships one
as a sentence-transformers loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn


class SupConLoss(nn.Module):
    """forward(features, labels): for each anchor with at least one positive in the batch, the mean over
    its positives p of -log(exp(s_ap/t) / sum_{k != a} exp(s_ak/t)), s = cosine similarity."""

    def __init__(self, model: Any, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.sentence_embedder = model
        self.temperature = temperature

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        embeddings = self.sentence_embedder(list(sentence_features)[0])["sentence_embedding"]
        return supcon_loss(embeddings, labels, self.temperature)

    def get_config_dict(self) -> dict[str, Any]:  # shown in the model card sentence-transformers writes
        return {"temperature": self.temperature}


def supcon_loss(embeddings: Tensor, labels: Tensor, temperature: float) -> Tensor:
    z = nn.functional.normalize(embeddings, dim=-1)
    logits = z @ z.T / temperature
    n = len(labels)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))  # an anchor is never its own candidate
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positives.sum(dim=1)
    has_pos = n_pos > 0
    if not has_pos.any():  # a one-class-per-text batch teaches nothing: no gradient rather than NaN
        return embeddings.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~positives, 0.0).sum(dim=1)[has_pos]) / n_pos[has_pos]
    return per_anchor.mean()
