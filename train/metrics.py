"""Retrieval metrics as pure functions over rankings and relevance judgments (trec_eval conventions)."""

from __future__ import annotations

import math

CUTOFFS = (1, 5, 10, 100)


def ndcg_at_k(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    """nDCG@k with linear gain (rel / log2(rank + 1)), as trec_eval's ndcg_cut."""
    dcg = sum(relevant.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(rel / math.log2(i + 2) for i, rel in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    positives = {d for d, r in relevant.items() if r > 0}
    return len(positives.intersection(ranked[:k])) / len(positives) if positives else 0.0


def mrr_at_k(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    for i, doc in enumerate(ranked[:k]):
        if relevant.get(doc, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def per_query_metrics(rankings: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """Each judged, ranked query -> its nDCG@10, Recall@1/5/10/100 and MRR@10 (the paired verdict needs them apart)."""
    queries = [q for q in qrels if q in rankings]
    if not queries:
        raise ValueError("no ranked query has relevance judgments")
    out = {}
    for q in queries:
        ranked, rel = rankings[q], qrels[q]
        out[q] = {"ndcg@10": ndcg_at_k(ranked, rel, 10), "mrr@10": mrr_at_k(ranked, rel, 10),
                  **{f"recall@{k}": recall_at_k(ranked, rel, k) for k in CUTOFFS}}
    return out


def mean_metrics(per_query: dict[str, dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over the queries."""
    rows = list(per_query.values())
    return {name: sum(r[name] for r in rows) / len(rows) for name in rows[0]}


def retrieval_metrics(rankings: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """Mean over judged queries of nDCG@10, Recall@1/5/10/100 and MRR@10."""
    return mean_metrics(per_query_metrics(rankings, qrels))
