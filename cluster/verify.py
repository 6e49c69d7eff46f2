"""The served model checked against its own evaluation: the job's evaluation set embedded through a generation's
replicas (the graph, precision, dims and truncation they serve), scored as the job scored it, and judged against
the job's tuned nDCG@10 with a tolerance per precision. Called from the reconciler, never under a lock."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from cluster.entities import Evaluation, Verification
from rayembed import storage
from rayembed.artifact import GRAPH, GRAPH_FP16, GRAPH_INT8, GRAPH_OPTIMIZED

# The largest shortfall of the served nDCG@10 against the job's figure (PyTorch, float32) that still passes. The
# exported graph matches PyTorch to cosine >= 0.9999 (export's parity gate), so fp32 and the fused graph move only
# rankings of near-ties; fp16 rounds every activation; int8 passed its own gate (a drop <= 0.005 against the fp32
# graph, train/quantize.py) and is scaled per call, so a replica's batches move it a little more.
TOLERANCE = {"fp32": 0.005, "optimized": 0.005, "fp16": 0.01, "int8": 0.015}
PRECISION_OF = {GRAPH: "fp32", GRAPH_OPTIMIZED: "optimized", GRAPH_FP16: "fp16", GRAPH_INT8: "int8"}
CHUNK_TEXTS = 32  # texts per request to the replicas; several are in flight at once, and the replicas batch them
IN_FLIGHT = 8


def skipped(reason: str, **fields) -> Verification:
    return Verification(passed=True, reason=reason, **fields)


def staged_beir(uri: str, into: Path) -> Path:
    """The job's evaluation folder on this node: a local folder as it is, a storage URI copied here."""
    if not storage.is_uri(uri):
        return Path(uri)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        storage.copy_file(storage.join(uri, name), str(into / name))
    return into


def judge(evaluation: Evaluation, ndcg: float, precision: str, dims: int | None, allow_worse: bool,
          **fields) -> Verification:
    """Passed when the served figure falls short of the job's by at most the precision's tolerance."""
    expected = evaluation.served_figure(dims, fields.pop("full", None))
    if expected is None:
        return skipped(f"the job's report has no figure at {dims} dimensions (written before the report card); served "
                       f"nDCG@10 {ndcg:.4f}", ndcg_at_10=round(ndcg, 6), precision=precision, dims=dims, **fields)
    tolerance = TOLERANCE.get(precision, max(TOLERANCE.values()))
    delta = ndcg - expected
    passed = delta >= -tolerance
    what = f"served nDCG@10 {ndcg:.4f} against the job's {expected:.4f} ({delta:+.4f}; tolerance {tolerance} for {precision})"
    if passed:
        reason = f"{what}: within the tolerance"
    else:
        reason = (f"{what}: the served graph ranks worse than the model its job evaluated; check the artifact "
                  f"(python -m train.export) or the precision" + ("; served anyway (allow_worse)" if allow_worse else ""))
    return Verification(ndcg_at_10=round(ndcg, 6), expected=round(expected, 6), delta=round(delta, 6),
                        tolerance=tolerance, precision=precision, dims=dims, passed=passed, reason=reason, **fields)


def embed_all(embed, texts: list[str], input_type: str, dims: int | None) -> np.ndarray:
    """`embed(texts, input_type, dims)` -> a future with `.result()`; chunks of CHUNK_TEXTS, IN_FLIGHT at once."""
    out, pending = [], []
    for start in range(0, len(texts), CHUNK_TEXTS):
        pending.append(embed(texts[start: start + CHUNK_TEXTS], input_type, dims))
        if len(pending) >= IN_FLIGHT:
            out.append(pending.pop(0).result())
    out += [p.result() for p in pending]
    return np.concatenate(out) if out else np.zeros((0, dims or 0), np.float32)


def verify(embed, info: dict, evaluation: Evaluation | None, dims: int | None, allow_worse: bool,
           **fields) -> Verification:
    """Score the job's evaluation set through `embed` (a generation's replicas: `deployments.embedder(app)`),
    whose `info` names the graph it loaded."""
    from train.data import load_beir
    from train.report_card import score

    graph = info.get("onnx_file")
    precision = PRECISION_OF.get(graph, "fp32")
    fields = {"graph": graph, **fields}
    if evaluation is None:
        return skipped("no evaluation to compare with (a base model, or an artifact registered without its eval.json)",
                       dims=dims, precision=precision, **fields)
    if storage.is_uri(evaluation.dataset) is False and not Path(evaluation.dataset).is_dir():
        return skipped(f"the job's evaluation set {evaluation.dataset!r} is not readable here (the job scored its "
                       "validation split, or the folder is gone)", dims=dims, precision=precision, **fields)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rset = load_beir(staged_beir(evaluation.dataset, Path(tmp)))
    qids, dids = list(rset.queries), list(rset.corpus)
    queries = embed_all(embed, [rset.queries[i] for i in qids], "query", dims)  # [Q, d]
    docs = embed_all(embed, [rset.corpus[i] for i in dids], "passage", dims)  # [D, d]
    per_query = score(queries, docs, qids, dids, rset.qrels, "float32")
    ndcg = float(np.mean([m["ndcg@10"] for m in per_query.values()]))
    return judge(evaluation, ndcg, precision, dims or info.get("embedding_dim"), allow_worse, queries=len(per_query),
                 documents=len(dids), seconds=round(time.perf_counter() - start, 2), full=info.get("embedding_dim"),
                 **fields)
