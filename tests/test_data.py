"""Training data validation (file, line, field), indexing, splits and BEIR loading."""

import json

import numpy as np
import pytest

from train.data import (DataError, ExampleReader, index_jsonl, load_beir, retrieval_set_from_examples,
                        split_validation, warn_on_size)
from tests.conftest import SAMPLE, sample_lines


def write(tmp_path, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


GOOD = {"query": "q", "pos_doc": "p", "neg_doc": ["n1", "n2"]}


def test_every_bad_line_named_with_line_and_field(tmp_path):
    path = write(tmp_path, [GOOD, "{not json", {"query": "", "pos_doc": "p", "neg_doc": []},
                            {"query": "q", "pos_doc": "p", "neg_doc": "n"}, {"query": "q", "pos_doc": "p"},
                            {"query": "q", "pos_doc": [], "neg_doc": []}, [1, 2], {**GOOD, "score": 1}])
    with pytest.raises(DataError) as err:
        index_jsonl(path, negatives_needed=0)
    msg = str(err.value)
    assert msg.startswith(f"7 invalid line(s) in {path}")
    assert f"{path}:2: not valid JSON" in msg
    assert f"{path}:3: field 'query' must be a non-empty string" in msg
    assert f"{path}:4: field 'neg_doc' must be a list of non-empty strings" in msg
    assert f"{path}:5: field 'neg_doc' is missing" in msg
    assert f"{path}:6: field 'pos_doc' must be a non-empty string or a non-empty list" in msg
    assert f"{path}:7: the line must be a JSON object" in msg
    assert f"{path}:8: unknown field(s) ['score']" in msg


def test_too_few_negatives_for_the_loss(tmp_path):
    path = write(tmp_path, [GOOD, GOOD])
    with pytest.raises(DataError, match=r":1: field 'neg_doc' has 2 entries but loss.negatives_per_query is 3"):
        index_jsonl(path, negatives_needed=3)


def test_pos_doc_list_gives_one_example_per_positive_and_blank_lines_skip(tmp_path):
    path = write(tmp_path, [GOOD, "", {"query": "q2", "pos_doc": ["a", "b"], "neg_doc": ["n"]}])
    index = index_jsonl(path, negatives_needed=1)
    assert len(index) == 3 and list(index.lines) == [1, 3, 3]
    reader = ExampleReader(index, negatives=1)
    assert [reader[i].pos_doc for i in range(3)] == ["p", "a", "b"]
    assert reader[0].neg_doc == ("n1",)


def test_empty_or_missing_file(tmp_path):
    with pytest.raises(DataError, match="no examples"):
        index_jsonl(write(tmp_path, [""]), 0)
    with pytest.raises(DataError, match="file not found"):
        index_jsonl(tmp_path / "nope.jsonl", 0)


def test_validation_split_is_seeded_and_keeps_a_lines_positives_together(tmp_path):
    lines = [{"query": f"q{i}", "pos_doc": [f"a{i}", f"b{i}"], "neg_doc": []} for i in range(40)]
    index = index_jsonl(write(tmp_path, lines), 0)
    train, val = split_validation(index, 0.1, cap=500, seed=3)
    again, _ = split_validation(index, 0.1, cap=500, seed=3)
    assert len(val) == 8 and len(train) == 72 and np.array_equal(train.offsets, again.offsets)
    assert not set(train.lines) & set(val.lines)


def test_streaming_index_of_a_large_file_holds_offsets_only(tmp_path):
    path = tmp_path / "big.jsonl"
    with path.open("w") as fh:
        for i in range(50_000):
            fh.write(json.dumps({"query": f"query {i}", "pos_doc": f"doc {i}", "neg_doc": [f"neg {i}"]}) + "\n")
    index = index_jsonl(path, 1)
    assert len(index) == 50_000 and index.offsets.dtype == np.int64
    assert ExampleReader(index, 1)[49_999].query == "query 49999"


def test_size_warning_quotes_the_model_card():
    assert "advises 5,000-10,000" in warn_on_size(600)
    assert warn_on_size(6000) is None


def test_beir_sample_and_validation_retrieval_set(tmp_path):
    rset = load_beir(SAMPLE / "eval")
    assert len(rset.queries) == 100 and len(rset.corpus) == 600
    assert all(d in rset.corpus for rel in rset.qrels.values() for d in rel)
    with pytest.raises(DataError, match="missing"):
        load_beir(tmp_path)
    index = index_jsonl(SAMPLE / "train.jsonl", 3)
    small = retrieval_set_from_examples(ExampleReader(index.take(np.arange(5)), 64))
    first = sample_lines(5)
    distinct = {t for ex in first for t in (ex["pos_doc"], *ex["neg_doc"])}
    assert len(small.queries) == 5 and sorted(small.corpus.values()) == sorted(distinct)


# ---------------------------------------------------------------- malformed datasets, as data
# (name, file content as bytes, the message fragment that names line and field); negatives_per_query is 1.
G = json.dumps(GOOD).encode()


def _line(**fields) -> bytes:
    return json.dumps({**GOOD, **fields}).encode()


BAD_TRAINING = [
    ("query-missing", G + b"\n" + json.dumps({"pos_doc": "p", "neg_doc": ["n"]}).encode(), ":2: field 'query' must be"),
    ("query-number", G + b"\n" + _line(query=5), ":2: field 'query' must be a non-empty string"),
    ("query-blank", G + b"\n" + _line(query="   "), ":2: field 'query' must be a non-empty string"),
    ("pos-missing", json.dumps({"query": "q", "neg_doc": ["n"]}).encode(), ":1: field 'pos_doc' must be"),
    ("pos-empty", _line(pos_doc=""), ":1: field 'pos_doc' must be a non-empty string"),
    ("pos-list-with-empty", _line(pos_doc=["a", ""]), ":1: field 'pos_doc' must be"),
    ("pos-object", _line(pos_doc={"text": "p"}), ":1: field 'pos_doc' must be"),
    ("neg-missing", json.dumps({"query": "q", "pos_doc": "p"}).encode(), ":1: field 'neg_doc' is missing"),
    ("neg-string", _line(neg_doc="n"), ":1: field 'neg_doc' must be a list of non-empty strings"),
    ("neg-numbers", _line(neg_doc=[1, 2]), ":1: field 'neg_doc' must be a list of non-empty strings"),
    ("neg-too-few", _line(neg_doc=[]), ":1: field 'neg_doc' has 0 entries but loss.negatives_per_query is 1"),
    ("unknown-field", _line(score=1), ":1: unknown field(s) ['score']"),
    ("not-json", G + b"\n{query: q}", ":2: not valid JSON"),
    ("array-line", b'["q", "p", ["n"]]', ":1: the line must be a JSON object"),
    ("null-line", G + b"\nnull", ":2: the line must be a JSON object"),
    ("latin1-bytes", _line(query="caf\u00e9").replace(b"caf\\u00e9", b"caf\xe9"), ":1: not valid JSON"),
    ("binary-file", bytes(range(256)) * 4, "NUL bytes: this looks like a binary file"),
    ("huge-line", b'{"query": "' + b"x" * (9 * 2**20) + b'"}\n' + G, ":1: the line is longer than 8 MiB"),
    ("duplicated-line", G + b"\n" + _line(query="other") + b"\n" + G, ":3: the line repeats line 1 exactly"),
    ("empty-file", b"", "no examples (the file is empty)"),
    ("only-blank-lines", b"\n  \n\n", "no examples (the file is empty)"),
]


@pytest.mark.parametrize("name,content,fragment", BAD_TRAINING, ids=[c[0] for c in BAD_TRAINING])
def test_malformed_training_file_is_refused_naming_line_and_field(tmp_path, name, content, fragment):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        index_jsonl(path, negatives_needed=1)
    assert fragment in str(err.value)
    if fragment.startswith(":"):
        assert f"{path}{fragment}" in str(err.value)  # file and line, then the field


def test_a_byte_order_mark_and_crlf_line_ends_are_read(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + G + b"\r\n" + _line(query="q2") + b"\r\n")
    index = index_jsonl(path, negatives_needed=1)
    assert [e.query for e in (ExampleReader(index, 1)[i] for i in range(2))] == ["q", "q2"]


def _beir(tmp_path, corpus: bytes | None = None, queries: bytes | None = None, qrels: bytes | None = None):
    folder = tmp_path / "eval"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_bytes(corpus if corpus is not None else
                                          b'{"_id": "d1", "title": "t", "text": "doc one"}\n{"_id": "d2", "text": "doc two"}\n')
    (folder / "queries.jsonl").write_bytes(queries if queries is not None else b'{"_id": "q1", "text": "query"}\n')
    (folder / "qrels" / "test.tsv").write_bytes(qrels if qrels is not None else b"query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return folder


BAD_BEIR = [
    ("dangling-qrels", {"qrels": b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td9\t1\n"},
     "qrels/test.tsv:3: corpus-id 'd9' is not in"),
    ("qrels-score-text", {"qrels": b"q1\td1\thigh\n"}, "qrels/test.tsv:1: score 'high' must be an integer"),
    ("qrels-two-columns", {"qrels": b"q1\td1\n"}, "qrels/test.tsv:1: expected query-id<TAB>corpus-id<TAB>score"),
    ("qrels-no-known-query", {"qrels": b"q7\td1\t1\n"}, "no judged queries that appear in queries.jsonl"),
    ("corpus-no-id", {"corpus": b'{"text": "doc"}\n'}, "corpus.jsonl:1: field '_id' must be a non-empty string"),
    ("corpus-text-number", {"corpus": b'{"_id": "d1", "text": 5}\n'}, "corpus.jsonl:1: field 'text' must be a string"),
    ("corpus-title-list", {"corpus": b'{"_id": "d1", "title": ["t"], "text": "x"}\n'}, "corpus.jsonl:1: field 'title'"),
    ("queries-not-json", {"queries": b'{"_id": "q1", "text": "query"}\n{oops\n'}, "queries.jsonl:2: not valid JSON"),
    ("queries-array", {"queries": b'["q1", "query"]\n'}, "queries.jsonl:1: the line must be a JSON object"),
]


@pytest.mark.parametrize("name,files,fragment", BAD_BEIR, ids=[c[0] for c in BAD_BEIR])
def test_malformed_beir_folder_is_refused_naming_file_line_and_field(tmp_path, name, files, fragment):
    with pytest.raises(DataError) as err:
        load_beir(_beir(tmp_path, **files))
    assert fragment in str(err.value)


def test_a_wellformed_beir_folder_loads(tmp_path):
    rset = load_beir(_beir(tmp_path))
    assert rset.corpus == {"d1": "t doc one", "d2": "doc two"} and rset.qrels == {"q1": {"d1": 1}}


def test_caps_per_line_and_per_file_name_the_line(tmp_path, monkeypatch):
    from train import data

    path = write(tmp_path, [GOOD, {"query": "q2", "pos_doc": ["p"] * 1_500_000, "neg_doc": []},
                            {"query": "q3", "pos_doc": "p", "neg_doc": ["n"] * 300},
                            {"query": "q" * 200_001, "pos_doc": "p", "neg_doc": []}])
    with pytest.raises(DataError) as err:
        index_jsonl(path, 0)
    msg = str(err.value)
    assert f"{path}:2: field 'pos_doc' has 1500000 entries; at most 64" in msg
    assert f"{path}:3: field 'neg_doc' has 300 entries; at most 256" in msg
    assert f"{path}:4: field 'query' holds a text of more than 200000 characters" in msg
    monkeypatch.setattr(data, "MAX_EXAMPLES", 3)
    path = write(tmp_path, [{"query": f"q{i}", "pos_doc": ["a", "b"], "neg_doc": []} for i in range(3)])
    with pytest.raises(DataError, match=r":2: more than 3 examples in one file"):
        index_jsonl(path, 0)


def test_validating_a_file_holds_about_24_bytes_per_example(tmp_path):
    """What an upload's validation keeps grows with the examples, at typed-array cost (a list of ints costs 36
    bytes an entry, three per example: 4 GiB of short positives would have needed about 80 GiB)."""
    import tracemalloc

    path = tmp_path / "many.jsonl"
    with path.open("w") as fh:
        for i in range(8_000):
            fh.write(json.dumps({"query": f"q{i}", "pos_doc": [f"p{j}" for j in range(64)], "neg_doc": []}) + "\n")
    tracemalloc.start()
    index = index_jsonl(path, 0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(index) == 512_000
    assert peak < 40 * len(index) + 4 * 2**20, f"{peak / len(index):.0f} bytes per example"


def test_the_shipped_regression_set_loads_as_beir_with_its_source_and_license():
    from rayembed.regression import resolve, shipped_folder

    folder = shipped_folder("general")
    assert resolve("general") == str(folder) and resolve("./general") == "./general"
    rset = load_beir(folder)
    assert (len(rset.queries), len(rset.corpus)) == (200, 1000)
    assert all(len(judged) == 1 for judged in rset.qrels.values())  # one relevant passage per query
    assert len({text.lower() for text in rset.queries.values()}) == 200  # no query text with two right answers
    source = json.loads((folder / "source.json").read_text())
    assert (source["package"], source["license"], source["queries"], source["documents"]) == ("botocore", "Apache-2.0", 200, 1000)
    assert "Apache License" in (folder / "LICENSE.txt").read_text() and "Amazon" in (folder / "NOTICE").read_text()


def test_the_regression_set_build_reproduces_the_shipped_files_byte_for_byte(tmp_path):
    """From the installed botocore: the same version gives the same bytes (another version gives other operations,
    so it is compared only when the versions match)."""
    import importlib.metadata

    from rayembed.regression import shipped_folder
    from rayembed.regression.build import build

    folder = shipped_folder("general")
    shipped = json.loads((folder / "source.json").read_text())["version"]
    if importlib.metadata.version("botocore") != shipped:
        pytest.skip(f"the shipped set is built from botocore {shipped}; {importlib.metadata.version('botocore')} is installed")
    build(tmp_path)
    names = ["corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "source.json", "LICENSE.txt", "NOTICE"]
    for name in names:
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == sorted(names)
