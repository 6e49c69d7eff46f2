"""Batch work on Ray Data: exact top-k and the false-negative filter on hand-made numbers, corpus
embedding (equal to the in-process engine, resumable after a crash), mining, and the job's mining step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from batch.corpus import CorpusError, embed_corpus, read_vectors
from batch.mining import choose, top_k
from tests.conftest import ROOT, SAMPLE, sample_lines


def test_blockwise_top_k_is_exact():
    rng = np.random.default_rng(0)
    q, d = rng.normal(size=(23, 8)).astype(np.float32), rng.normal(size=(101, 8)).astype(np.float32)
    scores, idx = top_k(q, d, 7, query_block=5, doc_block=13)  # blocks that do not divide the sizes
    full = q @ d.T
    expected = np.argsort(-full, axis=1)[:, :7]
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, 1), rtol=1e-6)
    assert top_k(q, d[:3], 7)[1].shape == (23, 3)  # k larger than the corpus: all of it


def test_choose_skips_positives_and_filters_likely_false_negatives():
    scores = np.array([0.95, 0.90, 0.85, 0.70, 0.60, 0.50], np.float32)
    docs = np.array([7, 3, 9, 4, 5, 6])
    c = choose(scores, docs, positive_score=0.9, positives={7}, n=2, max_score_ratio=0.95)
    # threshold 0.855: doc 3 (0.90) is a likely false negative, doc 9 (0.85) is the hardest kept
    assert c.negatives == [9, 4]
    assert [d for d, _ in c.filtered] == [3]
    assert c.threshold == pytest.approx(0.855)
    assert choose(scores, docs, 0.9, {7}, n=10, max_score_ratio=1.0).negatives == [3, 9, 4, 5, 6]
    unfiltered = choose(scores, docs, 0.2, {7}, n=10, max_score_ratio=None)  # no filter: only the positive goes
    assert unfiltered.negatives == [3, 9, 4, 5, 6] and unfiltered.filtered == []


def corpus_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "corpus.jsonl"
    with (SAMPLE / "eval" / "corpus.jsonl").open() as fh:
        rows = [json.loads(next(fh)) for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_corpus_embedding_matches_the_engine_and_resumes_after_a_crash(ray_session, minilm_onnx, tmp_path):
    from rayembed.engine import TextEmbedder

    src, out = corpus_file(tmp_path, 150), tmp_path / "vectors"
    first = embed_corpus(str(minilm_onnx), [str(src)], str(out), id_field="_id", rows_per_file=40)
    assert first["rows"] == first["embedded_now"] == 150
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 4
    ids, vectors = read_vectors(out)
    rows = {json.loads(line)["_id"]: json.loads(line) for line in src.read_text().splitlines()}
    assert sorted(ids) == sorted(rows)
    texts = [(f"{rows[i]['title']} {rows[i]['text']}".strip() if rows[i]["title"] else rows[i]["text"]) for i in ids]
    expected = TextEmbedder(minilm_onnx, threads=1)(texts, "passage")
    assert (np.sum(vectors * expected, axis=1) > 0.9999).all()
    # a crash: one part lost, another cut short mid-write; the rerun redoes exactly their rows
    lost = len(pq.read_table(parts[1])) + len(pq.read_table(parts[2]))
    parts[1].unlink()
    parts[2].write_bytes(parts[2].read_bytes()[:100])
    again = embed_corpus(str(minilm_onnx), [str(src)], str(out), id_field="_id", rows_per_file=40)
    assert again["embedded_now"] == lost and again["resumed_from"] == 150 - lost
    ids2, vectors2 = read_vectors(out)
    assert len(ids2) == len(set(ids2)) == 150
    order = {i: k for k, i in enumerate(ids)}
    np.testing.assert_allclose(vectors2, vectors[[order[i] for i in ids2]], atol=1e-5)
    with pytest.raises(CorpusError, match="made differently"):
        embed_corpus(str(minilm_onnx), [str(src)], str(out), id_field="_id", input_type="query")
    with pytest.raises(CorpusError, match=r"no field \['nope'\]"):
        embed_corpus(str(minilm_onnx), [str(src)], str(tmp_path / "v2"), id_field="_id", text_field="nope")


def test_mining_filters_a_planted_false_negative_and_never_returns_a_positive(ray_session, minilm_onnx, tmp_path):
    from batch.mine import mine_negatives
    from rayembed.engine import TextEmbedder

    lines = sample_lines(60)
    planted = lines[0]["pos_doc"].upper()  # a duplicate of the positive in another case: the same to an uncased model
    lines[1]["neg_doc"] = [planted]  # so the planted doc is in the candidate pool
    training = tmp_path / "train.jsonl"
    training.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "mined.jsonl"
    report = mine_negatives(str(minilm_onnx), str(training), str(out), negatives=3)
    mined = [json.loads(x) for x in out.read_text().splitlines()]
    assert report["lines_written"] == len(mined) == 60 and report["lines_dropped_short"]["count"] == 0
    embed = TextEmbedder(minilm_onnx, threads=1)
    positives = {x["query"]: x["pos_doc"] for x in lines}
    assert planted not in mined[0]["neg_doc"]
    assert report["filtered_as_likely_false_negatives"]["candidates"] > 0
    for row in mined:
        assert len(row["neg_doc"]) == 3 and positives[row["query"]] not in row["neg_doc"]
    # what was kept scores below 0.95 x the positive, hardest first (unless completed from the line's own)
    row = mined[0]
    q = embed([row["query"]], "query")[0]
    docs = embed([row["pos_doc"], *row["neg_doc"], planted], "passage")
    s = docs @ q
    assert s[-1] > 0.95 * s[0], "the planted near-duplicate must score like the positive"
    assert (s[1:4] <= 0.95 * s[0] + 1e-4).all() and (np.diff(s[1:4]) <= 1e-4).all()


def test_mining_searches_past_the_top_k_when_the_filter_leaves_a_line_short(ray_session, minilm_onnx, tmp_path):
    """A line whose top candidates are all filtered gets the hardest negatives that pass from further down the
    base model's ranking: not its own neg_doc, and it is not dropped."""
    from batch.mine import mine_negatives
    from rayembed.engine import TextEmbedder

    lines = sample_lines(60)
    for line in lines:
        line.pop("neg_doc", None)  # nothing to complete from: a short line would be dropped
    training = tmp_path / "train.jsonl"
    training.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "mined.jsonl"
    ratio = 0.6  # strict: many of a query's top candidates score above 0.6 x its positive
    report = mine_negatives(str(minilm_onnx), str(training), str(out), negatives=3, max_score_ratio=ratio,
                            top_k_candidates=1)  # 1 + 8 candidates in the first pass
    mined = [json.loads(x) for x in out.read_text().splitlines()]
    deep = report["lines_searched_deeper"]["lines"]
    assert deep and report["lines_dropped_short"]["count"] == 0 and len(mined) == 60
    embed = TextEmbedder(minilm_onnx, threads=1)
    pool = list(dict.fromkeys(x["pos_doc"] for x in lines))
    pool_vecs = embed(pool, "passage")
    for n in deep[:3]:
        row = mined[n - 1]
        q = embed([row["query"]], "query")[0]
        pos = float(embed([row["pos_doc"]], "passage")[0] @ q)
        s = pool_vecs @ q
        passing = sorted((float(x) for d, x in zip(pool, s) if d != row["pos_doc"] and x <= ratio * pos + 1e-4),
                         reverse=True)
        got = sorted((float(embed([t], "passage")[0] @ q) for t in row["neg_doc"]), reverse=True)
        assert len(row["neg_doc"]) == 3 and np.allclose(got, passing[:3], atol=2e-3), (got, passing[:5])
        assert (s > ratio * pos).sum() >= 6  # most of this line's first 9 candidates were filtered


def test_job_mines_negatives_with_the_base_model_and_caches_them(ray_session, tiny_bert, tmp_path):
    from tests.test_job import job
    from train.job import run_job
    from train.mining import mine_for_job

    training = tmp_path / "train.jsonl"  # no hard negatives at all: only trainable after mining
    training.write_text("".join(json.dumps({**x, "neg_doc": []}) + "\n" for x in sample_lines(48)))
    cfg = job(tiny_bert, training, tmp_path / "job", schedule={"max_steps": 1}, optimizer={"learning_rate": 2e-5},
              # a random tiny model scores every candidate near its positive: the false-negative filter (tested on
              # MiniLM above) would drop them all
              dataset={"mining": {"negatives": 2, "cache_dir": str(tmp_path / "cache"), "max_score_ratio": None}})
    report = run_job(cfg)
    assert report["mining"]["lines_written"] == 48 and report["mining"]["negatives_per_line"] == 2
    mined_file = Path(report["mining"]["output"])
    assert json.loads((tmp_path / "job" / "mining.json").read_text())["output"] == str(mined_file)
    for row in map(json.loads, mined_file.read_text().splitlines()):
        assert len(row["neg_doc"]) == 2 and row["pos_doc"] not in row["neg_doc"]
    before = mined_file.stat().st_mtime_ns
    from train.model import inspect_model, resolve_prefixes

    info = inspect_model(str(tiny_bert))
    again, r2 = mine_for_job(cfg.with_absolute_paths(), info.path, resolve_prefixes(cfg.prefixes, info), ["a text"])
    assert r2["output"] == str(mined_file) and mined_file.stat().st_mtime_ns == before  # from the cache
    assert again.dataset.training == str(mined_file) and again.dataset.mining is None
    # other mining settings: a new mined file from the same cached vectors (nothing embedded again)
    parts = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("vectors-*/*/vectors/part-*.parquet")}
    assert len(parts) == 2  # queries and documents
    one = cfg.with_absolute_paths()
    one = one.model_copy(update={"dataset": one.dataset.model_copy(update={"mining": one.dataset.mining.model_copy(
        update={"negatives": 1})})})
    _, r3 = mine_for_job(one, info.path, resolve_prefixes(cfg.prefixes, info), ["a text"])
    assert r3["output"] != str(mined_file) and r3["negatives_per_line"] == 1
    assert {p: p.stat().st_mtime_ns for p in parts} == parts


def test_check_points_to_mining_when_negatives_are_missing(tmp_path):
    training = tmp_path / "train.jsonl"
    training.write_text("".join(json.dumps({**x, "neg_doc": []}) + "\n" for x in sample_lines(30)))
    proc = subprocess.run([sys.executable, "-m", "train", "--config", str(ROOT / "examples" / "minilm-debian.yaml"),
                           "--set", f"dataset.training={training}", "--set", "loss.negatives_per_query=0",
                           "--set", f"output.dir={tmp_path / 'o'}", "--check"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "hard negatives per line: 0: 30 lines" in proc.stdout
    assert "30 of 30 lines have no hard negatives" in proc.stdout and "dataset.mining.negatives: 3" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "train", "--config", str(ROOT / "examples" / "minilm-debian.yaml"),
                           "--set", f"dataset.training={training}", "--set", f"output.dir={tmp_path / 'o'}", "--check"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "dataset.mining.negatives: N" in proc.stderr


def test_mining_config_sets_the_negatives_the_loss_uses():
    from train.config import ConfigError, validate_config

    base = {"model": "m", "dataset": {"training": "t", "mining": {"negatives": 3}}, "output": {"dir": "o"}}
    assert validate_config(base).loss.negatives_per_query == 3
    with pytest.raises(ConfigError, match=r"loss.negatives_per_query \(1\) differs from dataset.mining.negatives \(3\)"):
        validate_config({**base, "loss": {"negatives_per_query": 1}})


def test_pool_plan_follows_the_cluster():
    from batch.corpus import plan_pool

    assert plan_pool({"CPU": 16, "GPU": 4}) == plan_pool({"CPU": 16, "GPU": 4}, None, None)
    gpu = plan_pool({"CPU": 16, "GPU": 4})
    assert (gpu.actors, gpu.gpus_per_actor, gpu.device) == (4, 1, "cuda")
    cpu = plan_pool({"CPU": 2})  # one core for reading, one actor holding the other (its session may use both)
    assert (cpu.actors, cpu.cpus_per_actor, cpu.threads, cpu.device) == (1, 1, 2, "cpu")
    big = plan_pool({"CPU": 33})
    assert (big.actors, big.cpus_per_actor, big.threads) == (4, 8, 8)


def test_corpus_embedding_on_a_two_node_cluster(minilm_onnx, tmp_path):
    """The head has 1 CPU, a second node 2: the 2-CPU embedding actor can only run on the second node,
    while the input file is read on the driver's node and the parts are written by the driver."""
    import os
    import time

    from cluster.local import free_port, kill_processes
    from rayembed.engine import TextEmbedder

    temp_dir = Path("/tmp") / f"rayembed-2node-{os.getpid()}"
    gcs = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    ports = lambda: ["--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
                     "--runtime-env-agent-port", str(free_port())]
    head = [ray_bin, "start", "--head", "--num-cpus", "1", "--temp-dir", str(temp_dir), "--port", str(gcs),
            "--include-dashboard", "false", "--ray-client-server-port", str(free_port()), *ports()]
    node = [ray_bin, "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", "2", "--resources", '{"second_node": 1}',
            *ports()]
    src, out = corpus_file(tmp_path, 120), tmp_path / "vectors"
    try:
        subprocess.run(head, check=True, env=env, capture_output=True, timeout=180)
        subprocess.run(node, check=True, env=env, capture_output=True, timeout=180)
        time.sleep(2)
        proc = subprocess.run([sys.executable, "-m", "batch", "embed", "--model-dir", str(minilm_onnx), "--input", str(src),
                               "--output", str(out)], cwd=ROOT, env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        spec = json.loads((out / "embeddings.json").read_text())
        assert spec["rows"] == 120 and spec["pool"]["cpus_per_actor"] == 2 and spec["pool"]["actors"] == 1
        ids, vectors = read_vectors(out)
        rows = {json.loads(x)["_id"]: json.loads(x) for x in src.read_text().splitlines()}
        expected = TextEmbedder(minilm_onnx)([rows[i]["text"] for i in ids], "passage")  # titles are empty here
        assert len(set(ids)) == 120 and (np.sum(vectors * expected, axis=1) > 0.9999).all()
    finally:
        kill_processes(temp_dir)
        for address_file in (temp_dir / "ray_current_cluster", Path("/tmp/ray/ray_current_cluster")):
            if address_file.is_file() and f":{gcs}" in address_file.read_text():
                address_file.unlink()


def test_the_batch_plan_changes_calls_not_embeddings(minilm_onnx):
    """Texts of mixed lengths cut into many calls (cheap calls) or few (dear calls) come back in their order, with
    the same vectors; the call cost a replica times on this machine is a sane number of tokens."""
    from rayembed.engine import TextEmbedder

    texts = [ex[key] for ex in sample_lines(20) for key in ("query", "pos_doc")]  # 3 to ~120 tokens
    many = TextEmbedder(minilm_onnx, threads=1, call_tokens=1)
    few = TextEmbedder(minilm_onnx, threads=1, call_tokens=100_000)
    a, b = many(texts, "passage"), few(texts, "passage")
    assert (np.sum(a * b, axis=1) > 0.9999).all()
    lengths = [len(e.ids) for e in many.tokenizer.tokenizer.encode_batch(texts)]
    from rayembed.engine import plan_batches

    assert len(plan_batches(lengths, 64, 16384, 1)) > 5 and len(plan_batches(lengths, 64, 16384, 100_000)) == 1
    timed = TextEmbedder(minilm_onnx, threads=1).call_tokens  # a real session: a call costs some tokens' worth,
    assert isinstance(timed, int) and 1 < timed < 4096      # neither clamp (a broken fit lands on one of them)
