"""Contrastive losses as pure functions of embeddings (no model inside), like sentence-transformers' MNRL."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from train.pooling import matryoshka


def text_keys(texts) -> torch.Tensor:
    """[n] int64 keys of texts (8-byte BLAKE2b): equal texts, equal keys, across processes and runs."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little", signed=True)
                         for t in texts], dtype=torch.int64)


def contrastive_loss(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None, temperature: float,
                     in_batch_negatives: bool = False, pos_keys: torch.Tensor | None = None,
                     neg_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of each query over [its positive + its hard negatives] (+ the batch's documents).

    q, pos: [B, D] L2-normalised; neg: [B, N, D] or None. Scores are cosine / temperature.
    pos_keys [B], neg_keys [B, N] (`text_keys`): a document whose text is the query's own positive, met
    in another column (another query's positive or negative in the batch, or a negative repeating the
    positive), is not a negative of that query and leaves its softmax (sentence-transformers keeps such
    texts out of one batch with its NO_DUPLICATES sampler; here they are masked).
    """
    batch = q.shape[0]
    if in_batch_negatives:
        docs = pos if neg is None else torch.cat([pos, neg.reshape(-1, neg.shape[-1])])  # [B + B*N, D]
        logits = q @ docs.T  # [B, B + B*N]; query i's positive is column i
        labels = torch.arange(batch, device=q.device)
        if pos_keys is not None:
            doc_keys = pos_keys if neg is None else torch.cat([pos_keys, neg_keys.reshape(-1)])  # [B + B*N]
            same = doc_keys[None, :] == pos_keys[:, None]  # [B, B + B*N]
            same[labels, labels] = False
            logits = logits.masked_fill(same, float("-inf"))
    else:
        pos_scores = (q * pos).sum(-1, keepdim=True)  # [B, 1]
        if neg is None:
            raise ValueError("without in-batch negatives at least one hard negative per query is needed")
        neg_scores = torch.einsum("bd,bnd->bn", q, neg)  # [B, N]
        if pos_keys is not None:
            neg_scores = neg_scores.masked_fill(neg_keys == pos_keys[:, None], float("-inf"))
        logits = torch.cat([pos_scores, neg_scores], dim=1)  # [B, 1 + N]; positive is column 0
        labels = torch.zeros(batch, dtype=torch.long, device=q.device)
    return F.cross_entropy(logits.float() / temperature, labels)


def matryoshka_loss(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None, dims: list[int],
                    temperature: float, in_batch_negatives: bool = False,
                    weights: list[float] | None = None, pos_keys: torch.Tensor | None = None,
                    neg_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean of the contrastive loss at several embedding sizes. Inputs are pooled, unnormalised."""
    weights = weights or [1.0] * len(dims)
    total = q.new_zeros((), dtype=torch.float32)
    for dim, w in zip(dims, weights):
        total = total + w * contrastive_loss(
            matryoshka(q, dim), matryoshka(pos, dim), None if neg is None else matryoshka(neg, dim),
            temperature, in_batch_negatives, pos_keys, neg_keys)
    return total / sum(weights)
