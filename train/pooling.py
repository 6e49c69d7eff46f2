"""Pooling and normalisation as pure tensor functions: mean over real tokens, L2, Matryoshka slices."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states where attention_mask is 1. hidden [B, S, H], mask [B, S] -> [B, H]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, S, 1]
    summed = (hidden * mask).sum(dim=1)  # [B, H]
    counts = mask.sum(dim=1).clamp(min=1e-9)  # [B, 1]
    return summed / counts


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension."""
    return F.normalize(x, p=2, dim=-1)


def matryoshka(x: torch.Tensor, dim: int) -> torch.Tensor:
    """First `dim` components of a pooled embedding, re-normalised. x [..., H] -> [..., dim]."""
    if dim > x.shape[-1]:
        raise ValueError(f"Matryoshka size {dim} exceeds the embedding size {x.shape[-1]}")
    return normalize(x[..., :dim])
