"""Evaluation with the report card against one-size evaluation: a job's base-vs-tuned evaluation as it was (encode
both sides, score at the full size) and as it is now (the same encodings, plus every size x float32/int8/binary and
the bootstrap), on the CPU, in one process. Both models are the base model here: only time is measured.

    python -m bench.eval_card --model all-MiniLM-L6-v2 --eval data/debian-pkgdesc-sample/eval --sizes 32,64,128,256,384
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.eval_card", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="local HF directory or all-MiniLM-L6-v2 (packaged)")
    p.add_argument("--eval", default="data/debian-pkgdesc-sample/eval", help="BEIR folder (corpus, queries, qrels)")
    p.add_argument("--sizes", default=None, help="comma-separated card sizes (default: the model's own sizes)")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from rayembed.artifact import TextTokenizer
    from rayembed.stats import paired_bootstrap
    from train.data import load_beir
    from train.evaluate import card_sizes, embed_set, paired_evaluation, per_query_scores
    from train.model import build_bi_encoder, inspect_model, quiet_libraries

    quiet_libraries()
    torch.set_num_threads(args.threads)
    info = inspect_model(args.model)
    model = build_bi_encoder(info, "all_weights").eval()
    tokenizer = TextTokenizer(info.path, args.max_seq_length)
    rset = load_beir(args.eval)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else card_sizes(info.hidden_size, info.matryoshka_dims)
    cpu = torch.device("cpu")
    print(f"{info.path}: {len(rset.queries)} queries + {len(rset.corpus)} documents, {args.threads} thread(s), "
          f"card sizes {sizes} x float32/int8/binary")
    rows = []
    for r in range(args.rounds):
        start = time.perf_counter()
        sides = {side: embed_set(model, tokenizer, rset, info.prefixes, cpu) for side in ("base", "tuned")}
        encoded = time.perf_counter()
        one = {side: per_query_scores(q, d, rset) for side, (q, d) in sides.items()}  # as it was: one size
        scored = time.perf_counter()
        out = paired_evaluation(rset, sides, sizes)  # as it is: per-query scores, the card
        ids = out["per_query"]["ids"]
        paired_bootstrap(out["per_query"]["base"]["ndcg@10"], out["per_query"]["tuned"]["ndcg@10"])  # the verdict
        carded = time.perf_counter()
        before, now = scored - start, (encoded - start) + (carded - scored)
        row = {"round": r + 1, "encode_s": round(encoded - start, 2), "one_size_score_s": round(scored - encoded, 3),
               "card_and_verdict_s": round(carded - scored, 3), "card_s": out["card"]["seconds"],
               "one_size_eval_s": round(before, 2), "all_sizes_eval_s": round(now, 2), "ratio": round(now / before, 3),
               "queries": len(ids), "cells": len(out["card"]["rows"]), "ndcg@10": round(out["tuned"]["ndcg@10"], 6),
               "same_as_one_size": out["tuned"]["ndcg@10"] == sum(m["ndcg@10"] for m in one["tuned"].values()) / len(ids)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| round | one size (s) | all sizes + verdict (s) | ratio |\n| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['round']} | {row['one_size_eval_s']} | {row['all_sizes_eval_s']} | {row['ratio']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
