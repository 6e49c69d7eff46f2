"""What Ray Train's reporting costs a loop of short steps (a GPU's, or a small model's).

    python -m bench.train_reports [--steps 200] [--log-every 10] [--rounds 2]

Runs the real training job (`train.job.run_job` on a local Ray) on a tiny BERT built offline (bench/builders.py,
no downloads) and 64 lines of the packaged sample data, whose steps take tens of milliseconds here: `--steps`
steps logging every `--log-every` steps (the default is 10) against the same job logging only at its end,
alternated `--rounds` times, no checkpoint before the end. Prints each job's training seconds and examples/s and
the median ratio; a ratio near 1 means reporting costs the loop nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from rayembed.runtime import init_ray

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/train_reports.py` as well as `python -m bench.train_reports`
    sys.path.insert(0, str(ROOT))


def job_config(model: Path, train: Path, out: Path, steps: int, log_every: int) -> dict:
    return {"model": str(model), "name": out.name, "dataset": {"training": str(train), "validation_fraction": 0.2},
            "training": {"max_seq_length": 48}, "batch": {"global_batch_size": 8, "micro_batch_size": 4},
            "optimizer": {"learning_rate": 1e-3}, "loss": {"negatives_per_query": 2}, "schedule": {"max_steps": steps},
            "output": {"dir": str(out), "checkpoint_every_steps": steps, "log_every_steps": log_every}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10, help="the job logged every N steps (against only at its end)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)


    from bench.builders import build_tiny_bert
    from train.config import validate_config
    from train.job import run_job

    init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="train-reports-"))
    with (Path(__file__).resolve().parent.parent / "data" / "debian-pkgdesc-sample" / "train.jsonl").open() as fh:
        lines = [json.loads(next(fh)) for _ in range(200)]  # the sample the tests train on
    model = build_tiny_bert(work / "tiny-bert", corpus=[t for ex in lines for t in (ex["query"], ex["pos_doc"], *ex["neg_doc"])])
    train = work / "train.jsonl"
    train.write_text("".join(json.dumps(ex) + "\n" for ex in lines[:64]))
    seconds: dict[int, list[float]] = {args.log_every: [], args.steps: []}
    for r in range(args.rounds):
        order = (args.log_every, args.steps) if r % 2 == 0 else (args.steps, args.log_every)
        for log_every in order:
            out = work / f"r{r}-log{log_every}"
            report = run_job(validate_config(job_config(model, train, out, args.steps, log_every)), verbose=False)
            t = report["training"]
            seconds[log_every].append(t["train_seconds"])
            print(json.dumps({"round": r + 1, "log_every_steps": log_every, "steps": t["steps"],
                              "train_seconds": round(t["train_seconds"], 2),
                              "examples_per_s": round(t["examples_per_s"], 1)}), flush=True)
    ratio = statistics.median(seconds[args.log_every]) / statistics.median(seconds[args.steps])
    print(json.dumps({"what": "median", "log_every_steps": args.log_every, "train_seconds": statistics.median(seconds[args.log_every]),
                      "at_end_only_train_seconds": statistics.median(seconds[args.steps]), "ratio": round(ratio, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
