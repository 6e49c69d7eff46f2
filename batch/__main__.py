"""Batch work on Ray Data.

    python -m batch embed --model-dir ONNX_DIR --input corpus.jsonl --output vectors/
    python -m batch mine  --model-dir BASE_ONNX_DIR --training train.jsonl --output mined.jsonl [--negatives 3]

Under Ray's job API:  ray job submit --working-dir . -- python -m batch embed ...
"""

from __future__ import annotations

import argparse
import json
import sys

from rayembed.artifact import ArtifactError
from rayembed.cli import setup_logging


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m batch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("embed", help="embed a JSONL or Parquet corpus into Parquet (id, vector); resumable")
    e.add_argument("--model-dir", required=True, help="an ONNX artifact folder (a job's onnx/ or an exported base model)")
    e.add_argument("--input", required=True, nargs="+", help="JSONL or Parquet files (or a Parquet folder)")
    e.add_argument("--output", required=True, help="output folder; a rerun into it skips the ids already written")
    e.add_argument("--input-type", default="passage", choices=["query", "passage"], help="which prefix (default passage)")
    e.add_argument("--text-field", default="text")
    e.add_argument("--id-field", default="_id", help="default _id (BEIR corpus.jsonl)")
    e.add_argument("--title-field", default="title", help="joined in front of the text when present")
    m = sub.add_parser("mine", help="mine hard negatives for a training JSONL with the base model")
    m.add_argument("--model-dir", required=True, help="the base model's ONNX artifact (python -m train.export)")
    m.add_argument("--training", required=True, help="training JSONL ({query, pos_doc, neg_doc})")
    m.add_argument("--output", required=True, help="the mined JSONL; a report is written beside it (.report.json)")
    m.add_argument("--negatives", type=int, default=3, help="negatives per line (default 3)")
    m.add_argument("--corpus", help="JSONL or Parquet with a text field to mine from (default: the training file's documents)")
    m.add_argument("--corpus-text-field", default="text")
    m.add_argument("--max-score-ratio", type=float, default=0.95,
                   help="drop candidates scoring above this x the positive's score as likely false negatives (default 0.95)")
    m.add_argument("--no-filter", action="store_true", help="keep every candidate that is not a positive (no false-negative filter)")
    m.add_argument("--top-k", type=int, help="candidates searched per query (default max(30, 10 x negatives))")
    for sp in (e, m):
        sp.add_argument("--actors", type=int, help="embedding actors (default: one per GPU, else by CPUs)")
        sp.add_argument("--threads", type=int, help="ONNX Runtime threads per actor")
    return p


def main(argv: list[str] | None = None) -> int:
    from batch.corpus import CorpusError

    args = _parser().parse_args(argv)
    setup_logging()
    pool = {"actors": args.actors, "threads": args.threads}
    try:
        if args.command == "embed":
            from batch.corpus import embed_corpus

            r = embed_corpus(args.model_dir, args.input, args.output, input_type=args.input_type,
                             text_field=args.text_field, id_field=args.id_field, title_field=args.title_field, **pool)
            print(f"embedded {r['embedded_now']} rows ({r['resumed_from']} already there) at {r['rows_per_s']} rows/s "
                  f"-> {args.output} ({r['rows']} rows, {r['embedding_dim']}-d)")
        else:
            from batch.mine import mine_negatives, summary

            if args.negatives < 1:
                raise CorpusError("--negatives must be at least 1")
            r = mine_negatives(args.model_dir, args.training, args.output, negatives=args.negatives, corpus=args.corpus,
                               corpus_text_field=args.corpus_text_field, max_score_ratio=None if args.no_filter else args.max_score_ratio,
                               top_k_candidates=args.top_k, **pool)
            print(json.dumps({k: r[k] for k in ("examples_filtered", "examples_kept")}, indent=1, ensure_ascii=False))
            print(f"{summary(r)} -> {args.output} (report: {args.output}.report.json)")
    except (CorpusError, ArtifactError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
