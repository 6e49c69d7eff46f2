"""Quality benchmark: base vs tuned nDCG@10 of the real training job at several learning rates.

    python -m bench.quality --data ../shared/data/debian-pkgdesc --lr 5e-6 --lr 2e-5 \
        --max-examples 1000 --negatives 1 --out runs/quality-sub1000
    python -m bench.quality --data ../shared/data/debian-pkgdesc --lr 5e-6 --negatives 3 --mine --out runs/quality-full-mined3

Each learning rate is one full `python -m train` job (Ray Train, eval vs base, ONNX export);
the table goes to stdout and <out>/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml


def job_config(args, lr: float, out: Path) -> dict:
    cfg = {
        "model": args.model, "name": f"quality-lr{lr:g}",
        "dataset": {"training": str(Path(args.data) / "train.jsonl"), "evaluation": str(Path(args.data) / "eval")},
        "training": {"max_seq_length": args.max_seq_length, "seed": args.seed},
        "schedule": {"epochs": 1}, "batch": {"global_batch_size": args.batch},
        "optimizer": {"learning_rate": lr},
        "loss": {"temperature": args.temperature, "negatives_per_query": args.negatives, "in_batch_negatives": True},
        "output": {"dir": str(out), "checkpoint_every_steps": 1000, "log_every_steps": 10},
    }
    if args.max_examples:
        cfg["dataset"]["max_examples"] = args.max_examples
    if args.micro_batch:  # gradient accumulation over micro-batches of this many queries
        cfg["batch"]["micro_batch_size"] = args.micro_batch
    if args.cached:  # GradCache: one loss over the whole --batch, every query against all its documents
        cfg["loss"]["cached"] = True
    if args.matryoshka:  # the loss summed over these prefix sizes (the full size must be among them)
        cfg["loss"]["matryoshka_dims"] = [int(d) for d in args.matryoshka.split(",")]
    if args.mine:  # negatives mined with the base model (cached across the runs), not the file's own
        cfg["dataset"]["mining"] = {"negatives": args.negatives, "max_score_ratio": None if args.no_filter else args.max_score_ratio,
                                    "cache_dir": str(Path(args.mining_cache).absolute())}
        del cfg["loss"]["negatives_per_query"]
    return cfg


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with train.jsonl and eval/ (BEIR)")
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--lr", type=float, action="append", required=True)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--negatives", type=int, default=1)
    p.add_argument("--mine", action="store_true", help="mine --negatives per query with the base model (dataset.mining)")
    p.add_argument("--max-score-ratio", type=float, default=0.95, help="mining's false-negative filter")
    p.add_argument("--no-filter", action="store_true", help="mining without the false-negative filter")
    p.add_argument("--mining-cache", default="runs/mining-cache")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=None, help="queries per forward pass (default: --batch)")
    p.add_argument("--cached", action="store_true", help="loss.cached (GradCache) over the whole --batch")
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--matryoshka", default=None, help="Matryoshka loss over these sizes, e.g. 384,256,128,64")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for lr in args.lr:
        out = root / f"lr{lr:g}"
        cfg_path = root / f"lr{lr:g}.yaml"
        cfg_path.write_text(yaml.safe_dump(job_config(args, lr, out), sort_keys=False))
        start = time.time()
        rc = subprocess.call([sys.executable, "-m", "train", "--config", str(cfg_path)])
        if rc:
            print(f"lr {lr:g}: job failed (exit {rc})", file=sys.stderr)
            continue
        report = json.loads((out / "eval.json").read_text())
        tr = report["training"]
        row = {"lr": lr, "base_ndcg@10": report["base"]["ndcg@10"], "tuned_ndcg@10": report["tuned"]["ndcg@10"],
               "tuned_recall@10": report["tuned"]["recall@10"], "tuned_mrr@10": report["tuned"]["mrr@10"],
               "verdict": report["verdict"]["outcome"], "train_examples": tr["train_examples"],
               "negatives": args.negatives, "mined": args.mine, "job_seconds": round(time.time() - start, 1), "timing": report["timing"]}
        rows.append(row)
        with (root / "results.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    print(f"{'lr':>8} {'base':>7} {'tuned':>7} {'R@10':>6} {'MRR@10':>7} {'examples':>8} {'seconds':>8}")
    for r in rows:
        print(f"{r['lr']:>8g} {r['base_ndcg@10']:>7.4f} {r['tuned_ndcg@10']:>7.4f} {r['tuned_recall@10']:>6.3f} "
              f"{r['tuned_mrr@10']:>7.4f} {r['train_examples']:>8} {r['job_seconds']:>8}")
    return 0 if len(rows) == len(args.lr) else 1


if __name__ == "__main__":
    raise SystemExit(main())
