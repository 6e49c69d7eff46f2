"""Contrastive losses as pure functions of embeddings (no model inside), like sentence-transformers' MNRL."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.pooling import matryoshka


def contrastive_loss(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None, temperature: float,
                     in_batch_negatives: bool = False) -> torch.Tensor:
    """Cross-entropy of each query over [its positive + its hard negatives] (+ the batch's documents).

    q, pos: [B, D] L2-normalised; neg: [B, N, D] or None. Scores are cosine / temperature.
    """
    batch = q.shape[0]
    if in_batch_negatives:
        docs = pos if neg is None else torch.cat([pos, neg.reshape(-1, neg.shape[-1])])  # [B + B*N, D]
        logits = q @ docs.T  # [B, B + B*N]; query i's positive is column i
        labels = torch.arange(batch, device=q.device)
    else:
        pos_scores = (q * pos).sum(-1, keepdim=True)  # [B, 1]
        if neg is None:
            raise ValueError("without in-batch negatives at least one hard negative per query is needed")
        neg_scores = torch.einsum("bd,bnd->bn", q, neg)  # [B, N]
        logits = torch.cat([pos_scores, neg_scores], dim=1)  # [B, 1 + N]; positive is column 0
        labels = torch.zeros(batch, dtype=torch.long, device=q.device)
    return F.cross_entropy(logits.float() / temperature, labels)


def matryoshka_loss(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None, dims: list[int],
                    temperature: float, in_batch_negatives: bool = False,
                    weights: list[float] | None = None) -> torch.Tensor:
    """Weighted mean of the contrastive loss at several embedding sizes. Inputs are pooled, unnormalised."""
    weights = weights or [1.0] * len(dims)
    total = q.new_zeros((), dtype=torch.float32)
    for dim, w in zip(dims, weights):
        total = total + w * contrastive_loss(
            matryoshka(q, dim), matryoshka(pos, dim), None if neg is None else matryoshka(neg, dim),
            temperature, in_batch_negatives)
    return total / sum(weights)
