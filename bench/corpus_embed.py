"""Corpus embedding throughput: the Ray Data pipeline (`python -m batch embed`) vs the same engine in one process.

    python -m bench.corpus_embed --model-dir runs/minilm-base --corpus ../shared/data/debian-pkgdesc/eval/corpus.jsonl

Alternates the two `--rounds` times in one run (this VM's speed drifts; compare the ratio). The
in-process side is `rayembed.engine.TextEmbedder` over all texts with every core as ONNX Runtime
threads; the pipeline side is `batch.corpus.embed_corpus` into a fresh folder on a local Ray,
timed from the call to its return (Ray start excluded: it is joined once before the first round).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, help="an ONNX artifact (python -m train.export ...)")
    p.add_argument("--corpus", required=True, help="BEIR corpus.jsonl (_id, title, text)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    from batch.corpus import embed_corpus
    from rayembed.runtime import ensure_ray
    from rayembed.engine import TextEmbedder

    rows = [json.loads(line) for line in Path(args.corpus).read_text().splitlines() if line.strip()]
    texts = [f"{r['title']} {r['text']}".strip() if r.get("title") else r["text"] for r in rows]
    cores = len(os.sched_getaffinity(0))
    ensure_ray()
    results = []
    for r in range(args.rounds):
        embed = TextEmbedder(args.model_dir, threads=cores)
        start = time.perf_counter()
        embed(texts, "passage")
        local = len(texts) / (time.perf_counter() - start)
        out = Path(tempfile.mkdtemp(prefix="bench-corpus-"))
        start = time.perf_counter()
        report = embed_corpus(args.model_dir, [args.corpus], str(out / "v"), id_field="_id")
        pipeline = len(texts) / (time.perf_counter() - start)
        shutil.rmtree(out)
        results.append((local, pipeline, report["pool"]))
        print(f"round {r}: in-process {local:.1f} texts/s, Ray Data pipeline {pipeline:.1f} texts/s "
              f"({pipeline / local:.2f}x), pool {report['pool']}", flush=True)
    print("| round | in-process (texts/s) | Ray Data pipeline (texts/s) | ratio |")
    print("| --- | --- | --- | --- |")
    for r, (local, pipeline, _) in enumerate(results):
        print(f"| {r} | {local:.1f} | {pipeline:.1f} | {pipeline / local:.2f} |")
    print(f"{len(texts)} documents, {cores} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
