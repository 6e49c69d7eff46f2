"""Builds the shipped `general` regression set (BEIR layout) from the API documentation in the installed botocore.

Query: the first sentence of an API operation's documentation ("Returns the tag-set of an object."); its one
relevant passage: the rest of that documentation, titled with the service and the operation in words. Other
operations' passages are the distractors. Deterministic: the same botocore version gives the same bytes.

    python -m rayembed.regression.build [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

QUERIES = 200
DOCUMENTS = 1000
SAME_SERVICE_DISTRACTORS = 2  # per query: other operations of its service, the nearest neighbours it has
QUERY_WORDS = (5, 40)
MIN_PASSAGE_WORDS = 25
MAX_PASSAGE_WORDS = 120
SKIPPED_TAGS = {"note", "important", "examples", "code-block"}  # asides and code, not the operation's own prose
SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
HERE = Path(__file__).parent


class _Paragraphs(HTMLParser):
    """Plain text of each top-level <p> (or bare text run), asides skipped, links kept as their text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._skip = 0
        self._text: list[str] = []

    def _flush(self):
        text = " ".join("".join(self._text).split())
        if text:
            self.paragraphs.append(text)
        self._text = []

    def handle_starttag(self, tag, attrs):
        if tag in SKIPPED_TAGS:
            self._skip += 1
        elif tag in ("p", "li") and not self._skip:
            self._flush()

    def handle_endtag(self, tag):
        if tag in SKIPPED_TAGS:
            self._skip = max(0, self._skip - 1)
        elif tag in ("p", "li") and not self._skip:
            self._flush()

    def handle_data(self, data):
        if not self._skip:
            self._text.append(data)


def paragraphs(html: str) -> list[str]:
    parser = _Paragraphs()
    parser.feed(html)
    parser.close()
    parser._flush()
    return parser.paragraphs


def words(name: str) -> str:
    """CreateDBInstance -> "create db instance"."""
    return " ".join(re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name)).lower()


def truncated(text: str, limit: int) -> str:
    """At most `limit` words, cut after the last whole sentence that fits (or at the limit if none does)."""
    tokens = text.split()
    if len(tokens) <= limit:
        return text
    head = " ".join(tokens[:limit])
    end = max(head.rfind(". "), head.rfind("? "), head.rfind("! "))
    return head[:end + 1] if end > len(head) // 2 else head


def record(service: str, full_name: str, op: str, doc: str) -> dict | None:
    """One operation as (query, passage), or None when its documentation is too short or not prose."""
    paras = paragraphs(doc)
    if not paras:
        return None
    first, *rest_of_first = SENTENCE_END.split(paras[0], maxsplit=1)
    n = len(first.split())
    passage = " ".join([*rest_of_first, *paras[1:]])
    if not (QUERY_WORDS[0] <= n <= QUERY_WORDS[1]) or len(passage.split()) < MIN_PASSAGE_WORDS:
        return None
    if "deprecated" in first.lower() or not first[0].isupper():
        return None
    return {"id": f"{service}.{op}", "service": service, "query": first,
            "title": f"{full_name}: {words(op)}", "text": truncated(passage, MAX_PASSAGE_WORDS)}


def _rank(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()


def operations(data_root: Path) -> dict[str, list[dict]]:
    """Every usable operation of the newest API version of each service, by service (sorted, deterministic)."""
    out: dict[str, list[dict]] = {}
    for service_dir in sorted(p for p in data_root.iterdir() if p.is_dir()):
        versions = sorted(v for v in service_dir.iterdir() if (v / "service-2.json.gz").is_file() or (v / "service-2.json").is_file())
        if not versions:
            continue
        path = versions[-1] / "service-2.json.gz"
        model = json.loads(gzip.decompress(path.read_bytes()) if path.is_file() else (versions[-1] / "service-2.json").read_text())
        full = model.get("metadata", {}).get("serviceFullName", service_dir.name)
        recs = [r for op, spec in sorted(model.get("operations", {}).items())
                if (r := record(service_dir.name, full, op, spec.get("documentation") or ""))]
        if recs:
            out[service_dir.name] = sorted(recs, key=lambda r: _rank(r["id"]))
    return out


def select(by_service: dict[str, list[dict]]) -> tuple[list[dict], list[dict]]:
    """(query records, corpus records): one query per service, in hash order of services, skipping any query text
    that occurs twice anywhere (it would have several right answers); its service's next operations and then any
    others (hash order) as distractors."""
    counts: dict[str, int] = {}
    for recs in by_service.values():
        for r in recs:
            counts[r["query"].lower()] = counts.get(r["query"].lower(), 0) + 1
    queries, corpus, used = [], [], set()
    for service in sorted(by_service, key=_rank):
        if len(queries) == QUERIES:
            break
        recs = by_service[service]
        pick = next((r for r in recs if counts[r["query"].lower()] == 1), None)
        if pick is None:
            continue
        queries.append(pick)
        near = [r for r in recs if r is not pick][:SAME_SERVICE_DISTRACTORS]
        for r in [pick, *near]:
            corpus.append(r)
            used.add(r["id"])
    rest = sorted((r for recs in by_service.values() for r in recs if r["id"] not in used), key=lambda r: _rank(r["id"]))
    corpus += rest[:DOCUMENTS - len(corpus)]
    return queries, sorted(corpus, key=lambda r: r["id"])


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def build(out: Path) -> dict:
    """Write corpus.jsonl, queries.jsonl, qrels/test.tsv, source.json and botocore's LICENSE.txt and NOTICE to `out`."""
    import importlib.metadata

    import botocore

    dist = importlib.metadata.distribution("botocore")
    queries, corpus = select(operations(Path(botocore.__file__).parent / "data"))
    if len(queries) < QUERIES:
        raise SystemExit(f"botocore {dist.version} gives only {len(queries)} usable queries; {QUERIES} wanted")
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    (out / "corpus.jsonl").write_text(_jsonl([{"_id": r["id"], "title": r["title"], "text": r["text"]} for r in corpus]), encoding="utf-8")
    (out / "queries.jsonl").write_text(_jsonl([{"_id": "q." + r["id"], "text": r["query"]} for r in queries]), encoding="utf-8")
    (out / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q.{r['id']}\t{r['id']}\t1\n" for r in queries),
                                            encoding="utf-8")
    for name in ("LICENSE.txt", "NOTICE"):
        source = next((Path(str(f.locate())) for f in dist.files or [] if f.name == name and "dist-info" in str(f)), None)
        if source is None:
            raise SystemExit(f"botocore {dist.version}: no {name} in its dist-info")
        shutil.copyfile(source, out / name)
    source = {"package": "botocore", "version": dist.version, "license": "Apache-2.0",
              "what": "first sentence of an API operation's documentation -> the rest of it (cloud API documentation)",
              "services": len({r["service"] for r in corpus}), "queries": len(queries), "documents": len(corpus),
              "rebuild": "python -m rayembed.regression.build"}
    (out / "source.json").write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
    return source


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "general", help="the folder to write (default: the shipped set)")
    args = parser.parse_args(argv)
    print(json.dumps(build(args.out)))


if __name__ == "__main__":
    main()
