"""Mine hard negatives for a training JSONL with a base-model artifact; writes the mined JSONL and a report.

    python -m batch mine --model-dir BASE_ONNX --training train.jsonl --output mined.jsonl --negatives 3

Queries and documents are embedded by the Ray Data pipeline (batch.corpus) into a work folder, so
an interrupted run resumes; the search and the filtering run on the driver (batch.mining).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batch.corpus import CorpusError, embed_corpus, read_vectors
from batch.mining import Choice, choose, top_k

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Line:
    query: str
    positives: tuple[str, ...]
    raw: dict


def read_training(path: str | Path) -> list[Line]:
    """The training lines; a line the miner cannot use fails naming file, line and field."""
    lines = []
    with open(path, encoding="utf-8") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{n}: not valid JSON ({exc})") from None
            q, pos = (obj.get("query"), obj.get("pos_doc")) if isinstance(obj, dict) else (None, None)
            pos = pos if isinstance(pos, list) else [pos]
            if not isinstance(q, str) or not q.strip():
                raise CorpusError(f"{path}:{n}: field 'query' must be a non-empty string")
            if not pos or not all(isinstance(p, str) and p.strip() for p in pos):
                raise CorpusError(f"{path}:{n}: field 'pos_doc' must be a non-empty string or list of strings")
            lines.append(Line(q, tuple(pos), obj))
    if not lines:
        raise CorpusError(f"{path}: no training lines (the file is empty)")
    return lines


def read_corpus_texts(path: str, text_field: str, title_field: str | None) -> list[str]:
    """A user corpus (JSONL or Parquet) as texts, title joined in front like the evaluation does."""
    import pyarrow.json as pj

    table = pq.read_table(path) if path.endswith(".parquet") else pj.read_json(path)
    if text_field not in table.column_names:
        raise CorpusError(f"{path}: no field {text_field!r} (fields: {table.column_names}); set --corpus-text-field")
    texts = table[text_field].to_pylist()
    if title_field and title_field in table.column_names:
        texts = [f"{t.strip()} {x}".strip() if t else x for t, x in zip(table[title_field].to_pylist(), texts)]
    return [t for t in texts if isinstance(t, str) and t.strip()]


def _index(texts: list[str]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for t in texts:
        ids.setdefault(t, len(ids))
    return ids


def _embed(model_dir: str, texts: list[str], folder: Path, input_type: str, **pool) -> np.ndarray:
    """Texts -> [N, H] vectors in input order, through the resumable Ray Data pipeline."""
    source = folder / "input.parquet"
    if not source.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        # row groups of 1,024 let the read split into blocks that spread over the actor pool
        pq.write_table(pa.table({"id": np.arange(len(texts), dtype=np.int64), "text": texts}), source, row_group_size=1024)
    embed_corpus(model_dir, [str(source)], str(folder / "vectors"), input_type=input_type, id_field="id",
                 title_field=None, **pool)
    ids, vectors = read_vectors(folder / "vectors")
    order = np.argsort(np.asarray(ids))
    return vectors[order]


def _choose_deep(query: np.ndarray, docs: np.ndarray, ranked: tuple[np.ndarray, np.ndarray], pos_score: float,
                 positives: set[int], n: int, max_score_ratio: float | None) -> tuple[Choice, tuple[np.ndarray, np.ndarray]]:
    """`choose` over the ranked (scores, docs); while that leaves fewer than n, over a 4x longer ranking (the base
    model ranks many documents above this query's positive: the hardest that pass lie further down)."""
    c = choose(*ranked, pos_score, positives, n, max_score_ratio)
    while len(c.negatives) < n and len(ranked[1]) < len(docs):
        s, d = top_k(query[None], docs, 4 * len(ranked[1]))  # [1, k'] each
        ranked = (s[0], d[0])
        c = choose(*ranked, pos_score, positives, n, max_score_ratio)
    return c, ranked


def mine_negatives(model_dir: str, training: str, output: str, *, negatives: int = 3, corpus: str | None = None,
                   corpus_text_field: str = "text", max_score_ratio: float | None = 0.95, top_k_candidates: int | None = None,
                   work_dir: str | None = None, examples: int = 5, **pool) -> dict:
    """Write `output` (training lines with mined `neg_doc`) and `output`.report.json; returns the report."""
    started = time.time()
    lines = read_training(training)
    positives = [p for line in lines for p in line.positives]
    if corpus:
        candidates = list(_index(read_corpus_texts(corpus, corpus_text_field, "title")))
    else:
        candidates = list(_index(positives + [n for line in lines for n in line.raw.get("neg_doc") or []
                                              if isinstance(n, str) and n.strip()]))
    doc_id = _index(candidates + positives)  # positives missing from a user corpus are embedded too
    texts = list(doc_id)
    query_id = _index([line.query for line in lines])
    work = Path(work_dir or f"{output}.work")
    log.info("mining %d negatives per line: %d lines, %d queries, %d candidate documents", negatives, len(lines),
             len(query_id), len(candidates))
    doc_vec = _embed(model_dir, texts, work / "documents", "passage", **pool)  # [D, H]
    query_vec = _embed(model_dir, list(query_id), work / "queries", "query", **pool)  # [Q, H]
    embedded = time.time()
    k = top_k_candidates or max(30, 10 * negatives)
    scores, found = top_k(query_vec, doc_vec[: len(candidates)], k + 8)  # [Q, k+8]: room for skipped positives
    positives_of: dict[int, set[int]] = {}
    for line in lines:
        positives_of.setdefault(query_id[line.query], set()).update(doc_id[p] for p in line.positives)
    out_lines, short, filled, n_filtered, filtered_q = [], [], [], 0, 0
    kept_examples, filtered_examples, pos_scores, neg_scores = [], [], [], []
    deeper: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # query -> its longer ranking, where the top k ran short
    searched_deeper = []
    for n, line in enumerate(lines, 1):
        q = query_id[line.query]
        pos_score = float(min(query_vec[q] @ doc_vec[doc_id[p]] for p in line.positives))
        c, ranked = _choose_deep(query_vec[q], doc_vec[: len(candidates)], deeper.get(q, (scores[q], found[q])),
                                 pos_score, positives_of[q], negatives, max_score_ratio)
        if len(ranked[1]) > len(found[q]):
            deeper[q] = ranked
            searched_deeper.append(n)
        n_filtered += len(c.filtered)
        filtered_q += bool(c.filtered)
        pos_scores.append(pos_score)
        if c.filtered and len(filtered_examples) < examples:
            d, s = c.filtered[0]
            filtered_examples.append({"line": n, "query": line.query, "positive": line.positives[0][:300],
                                      "positive_score": round(pos_score, 4), "filtered": texts[d][:300],
                                      "score": round(s, 4), "threshold": round(c.threshold, 4)})
        chosen = dict(zip(ranked[1].tolist(), ranked[0].tolist()))
        neg_scores.extend(chosen[d] for d in c.negatives)
        mined = [texts[d] for d in c.negatives]
        if len(mined) < negatives:  # the line's own negatives make up the rest, else it is dropped
            given = [t for t in line.raw.get("neg_doc") or [] if isinstance(t, str) and t.strip()
                     and t not in mined and t not in line.positives]
            mined += given[: negatives - len(mined)]
            if len(mined) < negatives:
                short.append(n)
                continue
            filled.append(n)
        if c.negatives and len(kept_examples) < examples:
            kept_examples.append({"line": n, "query": line.query, "positive_score": round(pos_score, 4),
                                  "negative": texts[c.negatives[0]][:300], "score": round(chosen[c.negatives[0]], 4)})
        out_lines.append(json.dumps({**line.raw, "neg_doc": mined}, ensure_ascii=False))
    if not out_lines:
        raise CorpusError(f"mining kept no line of {training}: for every query the base model scores all top-{k} "
                          f"candidates above {max_score_ratio} x its positive (mean positive score "
                          f"{np.mean(pos_scores):.3f}); is {model_dir} the intended base model? A higher "
                          "max_score_ratio (up to 1.0) filters less, null turns the filter off")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{output}.tmp")
    tmp.write_text("\n".join(out_lines) + "\n" if out_lines else "", encoding="utf-8")
    tmp.replace(output)
    report = {
        "training": str(training), "corpus": corpus or "the training file's documents", "output": str(output),
        "model_dir": str(model_dir), "negatives_per_line": negatives, "max_score_ratio": max_score_ratio,
        "candidates_per_query": k, "lines": len(lines), "queries": len(query_id), "documents": len(candidates),
        "lines_written": len(out_lines),
        "lines_searched_deeper": {"count": len(searched_deeper), "lines": searched_deeper[:20],
                                  "why": f"fewer than {negatives} of the top {k} candidates passed the filter; "
                                         "its negatives come from further down the base model's ranking"},
        "lines_filled_from_given": {"count": len(filled), "lines": filled[:20],
                                    "why": f"fewer than {negatives} candidates in the whole corpus passed the "
                                           "filter; the line's own neg_doc made up the rest"},
        "lines_dropped_short": {"count": len(short), "lines": short[:20],
                                "why": f"fewer than {negatives} candidates passed the filter and the line's own "
                                       "neg_doc could not make up the rest"},
        "filtered_as_likely_false_negatives": {"candidates": n_filtered, "queries_with_any": filtered_q},
        "mean_positive_score": round(float(np.mean(pos_scores)), 4),
        "mean_negative_score": round(float(np.mean(neg_scores)), 4) if neg_scores else None,
        "examples_filtered": filtered_examples, "examples_kept": kept_examples,
        "seconds": {"embedding": round(embedded - started, 1), "search_and_write": round(time.time() - embedded, 1)},
    }
    Path(f"{output}.report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    return report


def summary(report: dict) -> str:
    f = report["filtered_as_likely_false_negatives"]
    return (f"mining: {report['negatives_per_line']} negatives for {report['lines_written']} of {report['lines']} lines "
            f"from {report['documents']} documents; {f['candidates']} candidates in {f['queries_with_any']} queries "
            f"filtered as likely false negatives (> {report['max_score_ratio']} x the positive's score); "
            f"{report['lines_searched_deeper']['count']} lines searched past the top {report['candidates_per_query']}, "
            f"{report['lines_filled_from_given']['count']} lines completed from their own neg_doc, "
            f"{report['lines_dropped_short']['count']} dropped")
