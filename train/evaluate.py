"""Encode texts with a bi-encoder and score retrieval (nDCG@10, Recall@k, MRR@10) on a RetrievalSet."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from train.config import CPU_BUCKET_ROWS
from train.data import RetrievalSet
from train.metrics import mean_metrics
from train.pooling import normalize
from rayembed.artifact import TextTokenizer


GPU_EVAL_BATCH = 64


def eval_batch_size(device: torch.device) -> int:
    """Texts per forward when evaluating: wide batches keep a GPU busy; on CPU, 16 texts of like length per forward
    pad less and run faster (MiniLM, the sample's 700 texts, 1 thread: 17.2-18.5 s at 16, 20.8-21.7 s at 64;
    `python -m bench.eval_speed`, docs/benchmarks.md section 2)."""
    return GPU_EVAL_BATCH if device.type == "cuda" else CPU_BUCKET_ROWS


def autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision == "bf16-mixed":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def encode(model: torch.nn.Module, tokenizer: TextTokenizer, texts: list[str], prefix: str, device: torch.device,
           precision: str = "fp32", batch_size: int | None = None) -> torch.Tensor:
    """L2-normalised embeddings [N, H] (float32, CPU), in the order of `texts`.

    Texts are batched longest-first so each batch pads little; `batch_size` texts per forward (default: the
    device's, `eval_batch_size`).
    """
    batch_size = batch_size or eval_batch_size(device)
    was_training = model.training
    model.eval()
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out: list[torch.Tensor] = [None] * len(texts)  # type: ignore[list-item]
    for start in range(0, len(texts), batch_size):
        rows = order[start: start + batch_size]
        ids, mask = tokenizer([prefix + texts[i] for i in rows])
        with autocast(device, precision):
            pooled = model(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))  # [b, H]
        emb = normalize(pooled.float()).cpu()
        for j, i in enumerate(rows):
            out[i] = emb[j]
    model.train(was_training)
    return torch.stack(out)


def rank(query_emb: torch.Tensor, doc_emb: torch.Tensor, query_ids: list[str], doc_ids: list[str],
         k: int = 100, chunk: int = 1024) -> dict[str, list[str]]:
    """Top-k documents per query by cosine (embeddings are normalised)."""
    k = min(k, len(doc_ids))
    rankings = {}
    for start in range(0, len(query_ids), chunk):
        scores = query_emb[start: start + chunk] @ doc_emb.T  # [q, D]
        top = torch.topk(scores, k, dim=1).indices  # [q, k]
        for row, qid in enumerate(query_ids[start: start + chunk]):
            rankings[qid] = [doc_ids[j] for j in top[row].tolist()]
    return rankings


def embed_set(model: torch.nn.Module, tokenizer: TextTokenizer, rset: RetrievalSet, prefixes: tuple[str, str],
              device: torch.device, precision: str = "fp32", batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries [Q, H] and documents [D, H], full size, in the order of `rset.queries` and `rset.corpus`: encoded once,
    then scored at the full size and, sliced, at every Matryoshka size (train.report_card)."""
    q = encode(model, tokenizer, list(rset.queries.values()), prefixes[0], device, precision, batch_size)
    d = encode(model, tokenizer, list(rset.corpus.values()), prefixes[1], device, precision, batch_size)
    return q, d


def per_query_scores(q: torch.Tensor, d: torch.Tensor, rset: RetrievalSet) -> dict[str, dict[str, float]]:
    """Each judged query's metrics at the full size, ranked to depth 100 by the report card's own ranking (so its
    full-size float32 row is these figures, ties broken alike)."""
    from train.report_card import score

    return score(q.numpy(), d.numpy(), list(rset.queries), list(rset.corpus), rset.qrels, "float32", k=100)


def evaluate_retrieval(model: torch.nn.Module, tokenizer: TextTokenizer, rset: RetrievalSet,
                       prefixes: tuple[str, str], device: torch.device, precision: str = "fp32",
                       batch_size: int | None = None) -> dict[str, float]:
    q, d = embed_set(model, tokenizer, rset, prefixes, device, precision, batch_size)
    return mean_metrics(per_query_scores(q, d, rset))


def card_sizes(hidden: int, *known: list[int] | tuple[int, ...] | None) -> list[int]:
    """The sizes the model serves: its Matryoshka sizes (the model's own and the job's) and its full size."""
    return sorted({hidden, *(d for dims in known for d in (dims or []) if d <= hidden)})


def paired_evaluation(rset: RetrievalSet, embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      sizes: list[int]) -> dict:
    """Base and tuned from one full-size encoding each: their mean metrics, each query's nDCG@10 and Recall@10 (for
    the paired verdict), and the report card over `sizes` x precisions."""
    from train.report_card import report_card

    card = report_card({side: (q.numpy(), d.numpy()) for side, (q, d) in embeddings.items()},
                       list(rset.queries), list(rset.corpus), rset.qrels, sizes)
    return {**paired_scores(rset, embeddings), "card": card}


def paired_scores(rset: RetrievalSet, embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Base and tuned at the full size: their mean metrics and each query's nDCG@10 and Recall@10, aligned by query
    (what the paired verdict resamples; the regression set gets this without a card)."""
    scores = {side: per_query_scores(q, d, rset) for side, (q, d) in embeddings.items()}
    ids = list(scores["tuned"])
    per_query = {"ids": ids, **{side: {m: [s[i][m] for i in ids] for m in ("ndcg@10", "recall@10")}
                                for side, s in scores.items()}}
    return {**{side: mean_metrics(s) for side, s in scores.items()}, "per_query": per_query}
