"""Evaluation speed: the job's retrieval evaluation (`train.evaluate.evaluate_retrieval`) of one model on a BEIR
folder at several batch sizes, on the CPU, one after another in one process (compare the ratios of one run).

    python -m bench.eval_speed --model all-MiniLM-L6-v2 --eval data/debian-pkgdesc-sample/eval --batch 16 --batch 64
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.eval_speed", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="local HF directory or all-MiniLM-L6-v2 (packaged)")
    p.add_argument("--eval", default="data/debian-pkgdesc-sample/eval", help="BEIR folder (corpus, queries, qrels)")
    p.add_argument("--batch", type=int, action="append", help="texts per forward (repeatable; default 16 and 64)")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--rounds", type=int, default=2, help="passes over the batch sizes, one after another")
    args = p.parse_args(argv)

    import torch

    from rayembed.artifact import TextTokenizer
    from train.data import load_beir
    from train.evaluate import eval_batch_size, evaluate_retrieval
    from train.model import build_bi_encoder, inspect_model, quiet_libraries

    quiet_libraries()
    torch.set_num_threads(args.threads)
    info = inspect_model(args.model)
    model = build_bi_encoder(info, "all_weights").eval()
    tokenizer = TextTokenizer(info.path, args.max_seq_length)
    rset = load_beir(args.eval)
    texts = len(rset.queries) + len(rset.corpus)
    cpu = torch.device("cpu")
    print(f"{info.path}: {len(rset.queries)} queries + {len(rset.corpus)} documents, max_seq_length "
          f"{args.max_seq_length}, {args.threads} thread(s); the job's CPU default is {eval_batch_size(cpu)} texts per forward")
    rows = []
    for r in range(args.rounds):
        for batch in args.batch or [16, 64]:
            start, cpu_start = time.perf_counter(), time.process_time()
            metrics = evaluate_retrieval(model, tokenizer, rset, info.prefixes, cpu, batch_size=batch)
            seconds = time.perf_counter() - start
            row = {"round": r + 1, "batch": batch, "seconds": round(seconds, 2),
                   "cpu_seconds": round(time.process_time() - cpu_start, 2), "texts_per_s": round(texts / seconds, 1),
                   "ndcg@10": round(metrics["ndcg@10"], 6)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| batch | seconds (each round) | texts/s (last) | nDCG@10 |\n| --- | --- | --- | --- |")
    for batch in args.batch or [16, 64]:
        mine = [r for r in rows if r["batch"] == batch]
        print(f"| {batch} | {' / '.join(str(r['seconds']) for r in mine)} | {mine[-1]['texts_per_s']} | {mine[-1]['ndcg@10']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
