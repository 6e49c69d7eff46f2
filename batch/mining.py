"""Hard-negative mining: exact blockwise top-k in numpy, then positive-aware filtering.

For each training query: the top-k corpus documents under the base model, minus its positives,
minus candidates scoring above `max_score_ratio` x the positive's score (likely false negatives:
NV-Retriever's TopK-PercPos, 0.95). Exact search keeps the document vectors in memory: N docs x
H dims x 4 bytes (3 M x 384-d = 4.6 GB; 1 M x 2048-d = 8 GB) is where it ends; past that, an ANN
index belongs here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def top_k(queries: np.ndarray, docs: np.ndarray, k: int, query_block: int = 1024,
          doc_block: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: ([Q, k] scores, [Q, k] doc indices), best first.

    Memory per step is query_block x doc_block floats (256 MiB at the defaults), whatever N is.
    """
    k = min(k, len(docs))
    n_q = len(queries)
    best_s = np.empty((n_q, k), np.float32)
    best_i = np.empty((n_q, k), np.int64)
    for q0 in range(0, n_q, query_block):
        q = queries[q0:q0 + query_block]  # [b, H]
        run_s = np.full((len(q), 0), -np.inf, np.float32)
        run_i = np.zeros((len(q), 0), np.int64)
        for d0 in range(0, len(docs), doc_block):
            scores = q @ docs[d0:d0 + doc_block].T  # [b, d]
            kk = min(k, scores.shape[1])
            part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]  # [b, kk] unordered
            cand_s = np.concatenate([run_s, np.take_along_axis(scores, part, 1)], axis=1)
            cand_i = np.concatenate([run_i, part + d0], axis=1)
            keep = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]  # [b, k]
            run_s, run_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
        best_s[q0:q0 + len(q)], best_i[q0:q0 + len(q)] = run_s, run_i
    return best_s, best_i


@dataclass
class Choice:
    """One query's mined negatives and what was left out."""

    negatives: list[int] = field(default_factory=list)  # doc indices, hardest first
    filtered: list[tuple[int, float]] = field(default_factory=list)  # (doc, score) above the threshold
    threshold: float = 0.0


def choose(scores: np.ndarray, docs: np.ndarray, positive_score: float, positives: set[int], n: int,
           max_score_ratio: float | None) -> Choice:
    """Walk one query's ranked candidates: skip its positives, filter likely false negatives, keep n.

    `max_score_ratio` None keeps every candidate that is not a positive (no false-negative filter)."""
    c = Choice(threshold=float("inf") if max_score_ratio is None else max_score_ratio * positive_score)
    for s, d in zip(scores.tolist(), docs.tolist()):
        if d in positives:
            continue
        if s > c.threshold:
            c.filtered.append((d, s))
            continue
        c.negatives.append(d)
        if len(c.negatives) == n:
            break
    return c
