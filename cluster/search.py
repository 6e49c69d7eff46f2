"""Side-by-side search, `POST .../deployments/{name}/search`: one query against the deployment's model's evaluation
corpus, top k from its replicas next to another deployment's (the base model's, say): what fine-tuning bought.

The corpus is embedded once per (application, corpus, dims) through the application's own replicas and kept in a
small cache on the control plane; a query costs two embeddings and two matrix products after that."""

from __future__ import annotations

import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from pydantic import Field

from cluster.entities import NAME_PATTERN
from cluster.schemas import Answer, Wire
from rayembed.errors import Conflict

MAX_DOCUMENTS = 20_000  # a corpus larger than this is scored with `rayembed` batch jobs, not on the control plane
CACHED_CORPORA = 4
TEXT_CHARS = 400  # of each document, in the answer
_cache: OrderedDict[tuple, tuple[list[str], np.ndarray]] = OrderedDict()
_cache_lock = threading.Lock()


class SearchRequest(Wire):
    """A query, and optionally a second deployment to rank the same corpus with."""

    query: str = Field(min_length=1, max_length=4096, examples=["compress files"])
    compare_with: str | None = Field(None, pattern=NAME_PATTERN, min_length=2, max_length=63,
                                     description="another deployment in the workspace, such as the base model's")
    k: int = Field(5, ge=1, le=20, description="documents from each deployment")
    dimensions: int | None = Field(None, ge=1, le=65536, description="a Matryoshka size; the deployment's default if "
                                   "omitted")


class HitOut(Answer):
    id: str
    text: str = Field(description=f"the document, its first {TEXT_CHARS} characters")
    score: float = Field(description="cosine similarity")
    relevant: bool | None = Field(None, description="judged relevant to this query in the corpus's qrels (None: the "
                                  "query is not one of the evaluation set's)")


class SearchSideOut(Answer):
    deployment: str
    model: str
    hits: list[HitOut]
    seconds: float


class SearchOut(Answer):
    query: str
    dataset: str = Field(description="the evaluation set searched")
    documents: int
    judged: bool = Field(description="the query is one of the evaluation set's, so `relevant` is known")
    results: list[SearchSideOut]
    examples: list[str] = Field([], description="a few of the evaluation set's queries, to try")


def corpus_of(dataset: str):
    """The evaluation set as the job read it (a local folder, or a storage URI staged here)."""
    from cluster.verify import staged_beir
    from train.data import load_beir

    try:
        with tempfile.TemporaryDirectory() as tmp:
            rset = load_beir(staged_beir(dataset, Path(tmp)))
    except Exception as exc:  # noqa: BLE001 - a folder gone or unreadable: say so, as a state of the model
        raise Conflict(f"the evaluation set {dataset} cannot be read now: {type(exc).__name__}: {exc}"[:1000]) from None
    if len(rset.corpus) > MAX_DOCUMENTS:
        raise Conflict(f"the evaluation corpus {dataset} holds {len(rset.corpus)} documents; side-by-side search "
                       f"embeds at most {MAX_DOCUMENTS} here")
    return rset


def _document_vectors(app: str, embed, dataset: str, rset, dims: int | None) -> tuple[list[str], np.ndarray]:
    from cluster.verify import embed_all

    key = (app, dataset, dims)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    ids = list(rset.corpus)
    vectors = embed_all(embed, [rset.corpus[i] for i in ids], "passage", dims)  # [D, d], unit length
    with _cache_lock:
        _cache[key] = (ids, vectors)
        while len(_cache) > CACHED_CORPORA:
            _cache.popitem(last=False)
    return ids, vectors


def top_k(query: np.ndarray, ids: list[str], docs: np.ndarray, k: int) -> list[tuple[str, float]]:
    """Document ids by cosine similarity to `query` (vectors are unit length), best first."""
    scores = docs @ query  # [D]
    order = np.argsort(-scores, kind="stable")[:k]
    return [(ids[i], float(scores[i])) for i in order]


def side(deployment: str, model: str, app: str, embed, dataset: str, rset, req: SearchRequest,
         judged: dict | None) -> dict:
    start = time.perf_counter()
    ids, docs = _document_vectors(app, embed, dataset, rset, req.dimensions)
    query = embed([req.query], "query", req.dimensions).result()[0]  # [d]
    hits = [{"id": i, "text": rset.corpus[i][:TEXT_CHARS], "score": round(s, 6),
             "relevant": None if judged is None else judged.get(i, 0) > 0} for i, s in top_k(query, ids, docs, req.k)]
    return {"deployment": deployment, "model": model, "hits": hits, "seconds": round(time.perf_counter() - start, 3)}


def search(sides: list[tuple[str, str, str, object]], dataset: str, req: SearchRequest) -> dict:
    """`sides`: (deployment, model, Serve application, embed) for each deployment to rank with."""
    rset = corpus_of(dataset)
    qid = next((q for q, text in rset.queries.items() if text == req.query), None)
    judged = rset.qrels.get(qid) if qid is not None else None
    results = [side(d, m, app, embed, dataset, rset, req, judged) for d, m, app, embed in sides]
    return {"query": req.query, "dataset": dataset, "documents": len(rset.corpus), "judged": judged is not None,
            "results": results, "examples": list(rset.queries.values())[:5]}
