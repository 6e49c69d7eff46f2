"""Training data: streaming validation of JSONL, a byte-offset index, and lazy random access.

The file is read once, line by line (memory stays flat for files far larger than RAM); what is
kept is one int64 offset per example, so the training loop seeks to the lines it needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.config import RECOMMENDED_EXAMPLES

log = logging.getLogger(__name__)
MAX_REPORTED_ERRORS = 20
MAX_LINE_BYTES = 8 * 2**20  # one example; a longer line is a broken file (a missing newline, a binary blob)
# Caps that bound what validating a file holds in memory (24 bytes per example, ~100 per BEIR id): far above what a
# customization job uses (5,000-10,000 examples), each refused with its line.
MAX_POSITIVES = 64  # pos_doc entries in one line
MAX_NEGATIVES = 256  # neg_doc entries in one line
MAX_TEXT_CHARS = 200_000  # one query or document (8,192 tokens is about 40,000 characters)
MAX_EXAMPLES = 5_000_000  # examples (positives) in one file
MAX_BEIR_RECORDS = 2_000_000  # documents or queries in one file


class DataError(ValueError):
    """A dataset the job cannot use; names file, line and field."""


@dataclass(frozen=True)
class Example:
    query: str
    pos_doc: str
    neg_doc: tuple[str, ...]


@dataclass(frozen=True)
class ExampleIndex:
    """Examples of one JSONL file: byte offset of the line, which positive, and the line number."""

    path: str
    offsets: np.ndarray  # [n] int64
    positive: np.ndarray  # [n] int32, index into pos_doc when it is a list
    lines: np.ndarray  # [n] int64, 1-based line number

    def __len__(self) -> int:
        return len(self.offsets)

    def take(self, rows: np.ndarray) -> "ExampleIndex":
        return ExampleIndex(self.path, self.offsets[rows], self.positive[rows], self.lines[rows])


def _check_record(obj: object, negatives_needed: int) -> tuple[str | None, int]:
    """-> (problem or None, number of positives)."""
    if not isinstance(obj, dict):
        return "the line must be a JSON object with query, pos_doc and neg_doc", 0
    unknown = set(obj) - {"query", "pos_doc", "neg_doc"}
    if unknown:
        return f"unknown field(s) {sorted(unknown)}: expected query, pos_doc, neg_doc", 0
    q = obj.get("query")
    if not isinstance(q, str) or not q.strip():
        return "field 'query' must be a non-empty string", 0
    pos = obj.get("pos_doc")
    positives = pos if isinstance(pos, list) else [pos]
    if len(positives) > MAX_POSITIVES:
        return f"field 'pos_doc' has {len(positives)} entries; at most {MAX_POSITIVES} per line (split the line)", 0
    if not positives or not all(isinstance(p, str) and p.strip() for p in positives):
        return "field 'pos_doc' must be a non-empty string or a non-empty list of non-empty strings", 0
    if "neg_doc" not in obj:
        return "field 'neg_doc' is missing: give a list of hard negatives ([] if none)", 0
    neg = obj["neg_doc"]
    if not isinstance(neg, list) or not all(isinstance(n, str) and n.strip() for n in neg):
        return "field 'neg_doc' must be a list of non-empty strings", 0
    if len(neg) > MAX_NEGATIVES:
        return f"field 'neg_doc' has {len(neg)} entries; at most {MAX_NEGATIVES} per line", 0
    for name, texts in (("query", [q]), ("pos_doc", positives), ("neg_doc", neg)):
        if any(len(t) > MAX_TEXT_CHARS for t in texts):
            return f"field {name!r} holds a text of more than {MAX_TEXT_CHARS} characters; shorten it", 0
    if len(neg) < negatives_needed:
        return (f"field 'neg_doc' has {len(neg)} entries but loss.negatives_per_query is {negatives_needed}; "
                "add hard negatives, lower loss.negatives_per_query, or mine them with the base model "
                "(dataset.mining.negatives: N)"), 0
    return None, len(positives)


def _lines(fh):
    """(line number, byte offset of the JSON, bytes or None when the line is over MAX_LINE_BYTES)."""
    offset, lineno = 0, 0
    while raw := fh.readline(MAX_LINE_BYTES + 1):
        lineno += 1
        start, offset = offset, offset + len(raw)
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while (rest := fh.readline(2**20)) and not rest.endswith(b"\n"):  # skip the rest of it
                offset += len(rest)
            offset += len(rest)
            yield lineno, start, None
            continue
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors)
            raw, start = raw[3:], start + 3
        yield lineno, start, raw


def _decode_line(raw: bytes | None) -> tuple[object, str | None]:
    """(the parsed JSON value, None) or (None, the problem) for one line from `_lines`."""
    if raw is None:
        return None, f"the line is longer than {MAX_LINE_BYTES // 2**20} MiB (a missing newline, or not a JSONL file)"
    if b"\x00" in raw:
        return None, "the line contains NUL bytes: this looks like a binary file, not JSON Lines"
    try:
        return json.loads(raw), None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"not valid JSON ({exc})"


def index_jsonl(path: str | Path, negatives_needed: int) -> ExampleIndex:
    """Validate every line of a JSONL file and index its examples; DataError lists the bad lines
    (and exact duplicates: a repeated example makes its own positive an in-batch negative)."""
    path = str(path)
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    # typed arrays, 8 bytes per entry (a list of ints costs 36): what validating holds stays a fraction of the file
    offsets, positive, lines, errors = array("q"), array("i"), array("q"), []
    digests, digest_lines = array("Q"), array("q")  # duplicates are found without keeping the text
    n_bad = 0
    with open(path, "rb") as fh:
        for lineno, start, raw in _lines(fh):
            if raw is not None and not raw.strip():
                continue
            obj, problem = _decode_line(raw)
            n_pos = 0
            if problem is None:
                problem, n_pos = _check_record(obj, negatives_needed)
            if problem:
                n_bad += 1
                if len(errors) < MAX_REPORTED_ERRORS:
                    errors.append(f"{path}:{lineno}: {problem}")
                continue
            if len(offsets) + n_pos > MAX_EXAMPLES:
                raise DataError(f"{path}:{lineno}: more than {MAX_EXAMPLES} examples in one file; split it (a job "
                                "uses a few thousand: dataset.max_examples subsamples)")
            digests.append(int.from_bytes(hashlib.blake2b(raw.strip(), digest_size=8).digest(), "little"))
            digest_lines.append(lineno)
            offsets.extend([start] * n_pos)
            positive.extend(range(n_pos))
            lines.extend([lineno] * n_pos)
    if not errors:
        errors, n_bad = _duplicates(path, np.frombuffer(digests, np.uint64), np.frombuffer(digest_lines, np.int64))
    if errors:
        more = f"\n  ... and {n_bad - len(errors)} more bad lines" if n_bad > len(errors) else ""
        raise DataError(f"{n_bad} invalid line(s) in {path}; fix them and resubmit:\n  " + "\n  ".join(errors) + more)
    if not offsets:
        raise DataError(f"{path}: no examples (the file is empty)")
    return ExampleIndex(path, np.frombuffer(offsets, np.int64).copy(), np.frombuffer(positive, np.int32).copy(),
                        np.frombuffer(lines, np.int64).copy())


def _duplicates(path: str, digests: np.ndarray, lines: np.ndarray) -> tuple[list[str], int]:
    order = np.argsort(digests, kind="stable")  # equal digests adjacent, earlier lines first
    same = digests[order][1:] == digests[order][:-1]  # [n-1]
    if not same.any():
        return [], 0
    first = {}
    errors = []
    for i in np.flatnonzero(same):
        a, b = int(lines[order[i]]), int(lines[order[i + 1]])
        first.setdefault(a, a)
        first[b] = first[a]
        errors.append((b, f"{path}:{b}: the line repeats line {first[a]} exactly; remove the duplicate (a repeated "
                          "example makes its own positive an in-batch negative)"))
    errors.sort()
    return [e for _, e in errors[:MAX_REPORTED_ERRORS]], len(errors)


def split_validation(index: ExampleIndex, fraction: float, cap: int, seed: int) -> tuple[ExampleIndex, ExampleIndex]:
    """Seeded split by source line (all positives of one line land on the same side)."""
    unique_lines = np.unique(index.lines)
    if len(unique_lines) < 2:
        raise DataError(f"{index.path}: at least 2 examples are needed to split off a validation set (or give dataset.validation)")
    n_val = int(min(cap, max(1, round(len(unique_lines) * fraction))))
    rng = np.random.default_rng(seed)
    val_lines = rng.choice(unique_lines, size=n_val, replace=False)
    is_val = np.isin(index.lines, val_lines)
    return index.take(np.flatnonzero(~is_val)), index.take(np.flatnonzero(is_val))


def subsample(index: ExampleIndex, n: int, seed: int) -> ExampleIndex:
    if n >= len(index):
        return index
    rows = np.sort(np.random.default_rng(seed).choice(len(index), size=n, replace=False))
    return index.take(rows)


def warn_on_size(n: int) -> str | None:
    lo, hi = RECOMMENDED_EXAMPLES
    if lo <= n <= hi:
        return None
    advice = ("few examples overfit quickly at higher learning rates; keep the conservative default lr and 1 epoch"
              if n < lo else "more examples cost time for little gain; consider a subsample (dataset.max_examples)")
    msg = f"{n} training examples: the model card advises {lo:,}-{hi:,}; {advice}"
    log.warning(msg)
    return msg


class ExampleReader:
    """Random access to indexed examples; opens the file lazily (one handle per process)."""

    def __init__(self, index: ExampleIndex, negatives: int):
        self.index = index
        self.negatives = negatives
        self._fh = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Example:
        if self._fh is None:
            self._fh = open(self.index.path, "rb")
        self._fh.seek(int(self.index.offsets[i]))
        obj = json.loads(self._fh.readline())
        pos = obj["pos_doc"]
        pos = pos[int(self.index.positive[i])] if isinstance(pos, list) else pos
        return Example(obj["query"], pos, tuple(obj["neg_doc"][: self.negatives]))

    def __getstate__(self):
        return {"index": self.index, "negatives": self.negatives, "_fh": None}


@dataclass(frozen=True)
class RetrievalSet:
    """An evaluation set: queries, a corpus, and relevance judgments (qrels)."""

    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]


def _beir_records(path: Path, titles: bool):
    """(line number, _id, text) of a BEIR corpus.jsonl (title + text) or queries.jsonl; DataError names line and field."""
    with path.open("rb") as fh:
        count = 0
        for lineno, _, raw in _lines(fh):
            if raw is not None and not raw.strip():
                continue
            where = f"{path}:{lineno}"
            count += 1
            if count > MAX_BEIR_RECORDS:
                raise DataError(f"{where}: more than {MAX_BEIR_RECORDS} records in one file; evaluate on a sample")
            d, problem = _decode_line(raw)
            if problem is not None:
                raise DataError(f"{where}: {problem}")
            if not isinstance(d, dict):
                raise DataError(f"{where}: the line must be a JSON object with _id and text")
            if not isinstance(d.get("_id"), (str, int)) or isinstance(d.get("_id"), bool) or d.get("_id") == "":
                raise DataError(f"{where}: field '_id' must be a non-empty string")
            if not isinstance(d.get("text"), str):
                raise DataError(f"{where}: field 'text' must be a string")
            title = d.get("title") if titles else None
            if title is not None and not isinstance(title, str):
                raise DataError(f"{where}: field 'title' must be a string")
            text = f"{title.strip()} {d['text']}".strip() if title and title.strip() else d["text"]
            yield lineno, str(d["_id"]), text


def beir_ids(path: str | Path, titles: bool) -> set[str]:
    """The ids of a BEIR corpus.jsonl or queries.jsonl, every line checked (the texts are not kept)."""
    return {doc_id for _, doc_id, _ in _beir_records(Path(path), titles)}


def _judgments(path: Path, queries, corpus, corpus_name: str):
    """(query-id, corpus-id, score) of each positive judgment of a qrels TSV whose query is in `queries`, every line
    checked; a judged document missing from `corpus` is a DataError naming the line."""
    for lineno, line in enumerate(path.open(encoding="utf-8", errors="replace"), 1):
        parts = line.rstrip("\r\n").split("\t")
        if (lineno == 1 and parts[0] == "query-id") or not line.strip():
            continue
        where = f"{path}:{lineno}"
        if len(parts) < 3:
            raise DataError(f"{where}: expected query-id<TAB>corpus-id<TAB>score")
        qid, did = parts[0], parts[1]
        try:
            score = int(parts[2])
        except ValueError:
            raise DataError(f"{where}: score {parts[2][:40]!r} must be an integer") from None
        if score > 0 and qid in queries:
            if did not in corpus:
                raise DataError(f"{where}: corpus-id {did[:80]!r} is not in {corpus_name} (a judged document "
                                "missing from the corpus makes the metrics wrong)")
            yield qid, did, score


def check_qrels(path: str | Path, queries: set[str], corpus: set[str]) -> int:
    """A qrels TSV checked against the ids of its queries and corpus (only ids are held); the number of judgments."""
    count = sum(1 for _ in _judgments(Path(path), queries, corpus, "evaluation/corpus.jsonl"))
    if not count:
        raise DataError(f"{path}: no judged queries that appear in queries.jsonl")
    return count


def check_beir_records(path: str | Path, titles: bool) -> int:
    """Every line of a BEIR corpus.jsonl (titles) or queries.jsonl checked; the number of records."""
    return sum(1 for _ in _beir_records(Path(path), titles))


def load_beir(folder: str | Path, split: str = "test") -> RetrievalSet:
    """BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv; every judged document must be in the corpus."""
    folder = Path(folder)
    paths = {"corpus": folder / "corpus.jsonl", "queries": folder / "queries.jsonl", "qrels": folder / "qrels" / f"{split}.tsv"}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise DataError(f"evaluation folder {folder} is not BEIR layout: missing {', '.join(missing)}")
    corpus = {doc_id: text for _, doc_id, text in _beir_records(paths["corpus"], titles=True)}
    queries = {qid: text for _, qid, text in _beir_records(paths["queries"], titles=False)}
    qrels: dict[str, dict[str, int]] = {}
    for qid, did, score in _judgments(paths["qrels"], queries, corpus, str(paths["corpus"])):
        qrels.setdefault(qid, {})[did] = score
    if not qrels:
        raise DataError(f"{paths['qrels']}: no judged queries that appear in queries.jsonl")
    return RetrievalSet({q: queries[q] for q in qrels}, corpus, qrels)


def retrieval_set_from_examples(reader: ExampleReader) -> RetrievalSet:
    """A validation retrieval task: each query against all positives and negatives of the split."""
    doc_ids: dict[str, str] = {}
    queries, qrels = {}, {}
    for i in range(len(reader)):
        ex = reader[i]
        qid = f"q{reader.index.lines[i]}"
        queries[qid] = ex.query
        for text in (ex.pos_doc, *ex.neg_doc):
            doc_ids.setdefault(text, f"d{len(doc_ids)}")
        qrels.setdefault(qid, {})[doc_ids[ex.pos_doc]] = 1
    return RetrievalSet(queries, {d: t for t, d in doc_ids.items()}, qrels)


def prepare_splits(dataset, negatives: int, seed: int) -> tuple[ExampleIndex, ExampleIndex]:
    """(train, validation) indexes for a job's dataset section; validates every line of every file.

    A training file still to be mined (dataset.mining set) needs no neg_doc entries yet.
    """
    train = index_jsonl(dataset.training, 0 if dataset.mining else negatives)
    if dataset.validation:
        val = index_jsonl(dataset.validation, negatives)
    else:
        train, val = split_validation(train, dataset.validation_fraction, dataset.max_validation_examples, seed)
    if dataset.max_examples:
        train = subsample(train, dataset.max_examples, seed)
    return train, val


def negative_counts(path: str | Path) -> dict[int, int]:
    """How many lines carry 0, 1, 2, ... hard negatives (lines already validated)."""
    counts: dict[int, int] = {}
    with open(path, "rb") as fh:
        for raw in fh:
            if raw.strip():
                n = len(json.loads(raw).get("neg_doc") or [])
                counts[n] = counts.get(n, 0) + 1
    return dict(sorted(counts.items()))


def negatives_advice(counts: dict[int, int], wanted: int) -> str | None:
    """A note for `--check` when hard negatives are missing or few, pointing to mining."""
    lines = sum(counts.values())
    none, fewest = counts.get(0, 0), min(counts) if counts else 0
    if none == 0 and fewest >= max(wanted, 1) and fewest >= 3:
        return None
    what = (f"{none} of {lines} lines have no hard negatives" if none else
            f"the lines carry {fewest}-{max(counts)} hard negatives")
    return (f"{what}; mined ones usually help: set dataset.mining.negatives: 3 to mine them with the base model "
            "before training, or run python -m batch mine")
