"""The report card: retrieval quality at every Matryoshka size x vector precision (float32, int8, binary), with the
bytes each costs, from embeddings encoded once at full size (sliced, re-normalized; no extra forward pass).

Pure numpy over embeddings and judgments (no torch), so the control plane can score a served model with it too.
"""

from __future__ import annotations

import math
import time

import numpy as np

from rayembed.stats import paired_bootstrap
from train.metrics import per_query_metrics

PRECISIONS = ("float32", "int8", "binary")
CARD_METRICS = ("ndcg@10", "recall@10")
TOP_K = 10
RESCORE_CANDIDATES = 100  # binary: the Hamming top-N that the float query rescores
QUERY_CHUNK = 64  # binary rescoring holds [chunk, candidates, H] floats at once
SUGGEST_TOLERANCE = 0.01  # nDCG@10: the smallest size within this of the best is suggested
METHODS = {
    "float32": "4 bytes per component; cosine (dot product of normalized vectors)",
    "int8": "1 byte per component: each dimension's [min, max] over the corpus mapped onto 256 levels; queries and "
            "documents both quantized with the corpus's ranges, scored as dot products of the dequantized vectors",
    "binary": f"1 bit per component (its sign); the whole corpus ranked by Hamming distance to the query's bits, then "
              f"the top {RESCORE_CANDIDATES} rescored by the float32 query against the documents' +-1 bits",
}


def sliced(emb: np.ndarray, dim: int) -> np.ndarray:
    """The first `dim` components, re-normalized (what a Matryoshka model serves at that size); the full size as it is,
    so the card's full-size row ranks exactly as the job's headline metrics do."""
    if dim >= emb.shape[1]:
        return np.asarray(emb, dtype=np.float32)
    cut = np.asarray(emb[:, :dim], dtype=np.float32)  # [N, dim]
    return cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)


def int8_calibrate(corpus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension (low, step) from the corpus's range: level 0 is the minimum, level 255 the maximum."""
    low, high = corpus.min(axis=0), corpus.max(axis=0)  # [H], [H]
    return low, np.maximum(high - low, 1e-12) / 255.0


def int8_quantize(x: np.ndarray, low: np.ndarray, step: np.ndarray) -> np.ndarray:
    """int8 codes [N, H] (level - 128), values outside the corpus's range clipped to it."""
    levels = np.clip(np.rint((x - low) / step), 0, 255)  # [N, H]
    return (levels - 128).astype(np.int8)


def int8_dequantize(codes: np.ndarray, low: np.ndarray, step: np.ndarray) -> np.ndarray:
    return ((codes.astype(np.float32) + 128) * step + low).astype(np.float32)  # [N, H]


def binary_quantize(x: np.ndarray) -> np.ndarray:
    """Sign bits, packed 8 to a byte [N, ceil(H / 8)]."""
    return np.packbits(x > 0, axis=1)


def unpack_signs(bits: np.ndarray, dim: int) -> np.ndarray:
    """Packed sign bits [N, ceil(dim / 8)] -> the +-1 vectors [N, dim] they stand for (float32)."""
    return np.unpackbits(bits, axis=1)[:, :dim].astype(np.float32) * 2 - 1


def hamming(q_bits: np.ndarray, d_bits: np.ndarray, dim: int) -> np.ndarray:
    """Hamming distances [Q, D] between packed bit rows of `dim` bits: (dim - s_q . s_d) / 2 over their +-1 vectors,
    one matrix product instead of a popcount per pair (exact: integers well inside float32's range)."""
    return np.rint((dim - unpack_signs(q_bits, dim) @ unpack_signs(d_bits, dim).T) / 2).astype(np.int32)


def bytes_per_vector(dim: int, precision: str) -> int:
    return {"float32": 4 * dim, "int8": dim, "binary": math.ceil(dim / 8)}[precision]


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices [Q, k] of each row's k highest scores, best first (ties: lower index first)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # [Q, k] unordered
    rows = np.arange(len(scores))[:, None]
    order = np.lexsort((part, -scores[rows, part]), axis=1)  # [Q, k]
    return part[rows, order]


def ranked_ids(queries: np.ndarray, docs: np.ndarray, precision: str, k: int = TOP_K) -> np.ndarray:
    """Top-k document indices [Q, k] for normalized float32 queries [Q, H] against documents [D, H] stored as
    `precision`."""
    if precision == "float32":
        return top_k(queries @ docs.T, k)
    if precision == "int8":
        low, step = int8_calibrate(docs)
        dq = lambda x: int8_dequantize(int8_quantize(x, low, step), low, step)  # noqa: E731
        return top_k(dq(queries) @ dq(docs).T, k)
    if precision == "binary":
        dim, d_bits = docs.shape[1], binary_quantize(docs)
        signs = unpack_signs(d_bits, dim)  # [D, H] in {-1, +1}
        out = []
        for start in range(0, len(queries), QUERY_CHUNK):
            q = queries[start: start + QUERY_CHUNK]  # [q, H]
            near = top_k(-hamming(binary_quantize(q), d_bits, dim).astype(np.float32), RESCORE_CANDIDATES)  # [q, C]
            rescored = np.einsum("qh,qch->qc", q, signs[near])  # [q, C]
            out.append(np.take_along_axis(near, top_k(rescored, k), axis=1))  # [q, k]
        return np.concatenate(out)
    raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")


def score(queries: np.ndarray, docs: np.ndarray, query_ids: list[str], doc_ids: list[str],
          qrels: dict[str, dict[str, int]], precision: str = "float32", k: int = TOP_K) -> dict[str, dict[str, float]]:
    """Per judged query, `per_query_metrics` (nDCG@10, Recall@1/5/10/100, MRR@10) of the top-k ranking (the card
    reads nDCG@10 and Recall@10, for which k = 10 is enough; the headline ranks to 100)."""
    top = ranked_ids(queries, docs, precision, k)  # [Q, k]
    rankings = {qid: [doc_ids[j] for j in row] for qid, row in zip(query_ids, top.tolist())}
    return per_query_metrics(rankings, qrels)


def _cell(per_query: dict[str, dict[str, float]]) -> dict[str, float]:
    return {m: float(np.mean([r[m] for r in per_query.values()])) for m in CARD_METRICS}


def report_card(embeddings: dict[str, tuple[np.ndarray, np.ndarray]], query_ids: list[str], doc_ids: list[str],
                qrels: dict[str, dict[str, int]], sizes: list[int], seed: int = 0) -> dict:
    """`embeddings`: side ("base", "tuned") -> (queries [Q, H], documents [D, H]), full size, normalized.
    Every size x precision for each side; at float32, tuned against base at that size with its interval."""
    start = time.perf_counter()
    rows = []
    for dim in sorted(sizes):
        sides = {side: (sliced(q, dim), sliced(d, dim)) for side, (q, d) in embeddings.items()}
        for precision in PRECISIONS:
            scored = {side: score(q, d, query_ids, doc_ids, qrels, precision) for side, (q, d) in sides.items()}
            row = {"dims": dim, "precision": precision, "bytes_per_vector": bytes_per_vector(dim, precision),
                   "mb_per_million_docs": bytes_per_vector(dim, precision),  # 1e6 vectors x bytes / 1e6
                   **{side: _cell(s) for side, s in scored.items()}}
            if precision == "float32" and {"base", "tuned"} <= set(scored):
                ids = list(scored["tuned"])
                row["delta"] = paired_bootstrap([scored["base"][i]["ndcg@10"] for i in ids],
                                                [scored["tuned"][i]["ndcg@10"] for i in ids], seed=seed)
            rows.append(row)
    side = "tuned" if "tuned" in embeddings else next(iter(embeddings))
    judged = set(query_ids).intersection(qrels)
    return {"sizes": sorted(sizes), "precisions": list(PRECISIONS), "documents": len(doc_ids), "queries": len(judged),
            "methods": METHODS, "rows": rows, "suggested": suggest(rows, side),
            "seconds": round(time.perf_counter() - start, 2)}


def suggest(rows: list[dict], side: str = "tuned", tolerance: float = SUGGEST_TOLERANCE) -> dict:
    """The smallest float32 size within `tolerance` nDCG@10 of the best float32 size (a deployment's
    `default_dimensions`), and the cheapest storage of any precision within `tolerance` of the best cell."""
    def pick(cands: list[dict]) -> dict:
        best = max(r[side]["ndcg@10"] for r in cands)
        ok = [r for r in cands if r[side]["ndcg@10"] >= best - tolerance]
        r = min(ok, key=lambda r: (r["bytes_per_vector"], -r[side]["ndcg@10"]))
        return {"dims": r["dims"], "precision": r["precision"], "ndcg@10": r[side]["ndcg@10"],
                "bytes_per_vector": r["bytes_per_vector"], "best_ndcg@10": best}

    return {"side": side, "tolerance": tolerance, "dimensions": pick([r for r in rows if r["precision"] == "float32"]),
            "storage": pick(rows)}


def card_table(card: dict) -> str:
    """The card as the console and `rayembed models get` print it."""
    sides = [s for s in ("base", "tuned") if s in card["rows"][0]]
    head = f"{'dims':>6} {'precision':<9}{'bytes/vec':>10}{'MB/1M docs':>11}" + "".join(
        f"{s + ' nDCG@10':>15}{s + ' R@10':>12}" for s in sides)
    lines = [f"report card ({card['queries']} queries, {card['documents']} documents; binary: Hamming top "
             f"{RESCORE_CANDIDATES} rescored with the float32 query)", head]
    for r in card["rows"]:
        lines.append(f"{r['dims']:>6} {r['precision']:<9}{r['bytes_per_vector']:>10}{r['mb_per_million_docs']:>11}"
                     + "".join(f"{r[s]['ndcg@10']:>15.4f}{r[s]['recall@10']:>12.4f}" for s in sides))
    s = card["suggested"]
    d, st = s["dimensions"], s["storage"]
    lines.append(f"suggested: dimensions {d['dims']} (nDCG@10 {d['ndcg@10']:.4f}, within {s['tolerance']} of the best "
                 f"{d['best_ndcg@10']:.4f}); cheapest storage within it: {st['dims']} x {st['precision']} "
                 f"({st['bytes_per_vector']} bytes/vector, nDCG@10 {st['ndcg@10']:.4f})")
    return "\n".join(lines)


def plot_card(path, card: dict, title: str = "") -> None:
    """One chart: nDCG@10 against bytes per vector (log x), a line per side and precision across the sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    styles = {"float32": "o", "int8": "s", "binary": "^"}
    for side, line in (("base", "--"), ("tuned", "-")):
        if side not in card["rows"][0]:
            continue
        for precision in PRECISIONS:
            rows = sorted((r for r in card["rows"] if r["precision"] == precision), key=lambda r: r["bytes_per_vector"])
            ax.plot([r["bytes_per_vector"] for r in rows], [r[side]["ndcg@10"] for r in rows], line,
                    marker=styles[precision], label=f"{side} {precision}")
    s = card["suggested"]["dimensions"]
    ax.annotate(f"suggested {s['dims']}", (4 * s["dims"], s["ndcg@10"]), fontsize=7, xytext=(4, -12),
                textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per vector (log)")
    ax.set_ylabel("nDCG@10")
    ax.set_title(f"quality against storage{': ' + title if title else ''}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
