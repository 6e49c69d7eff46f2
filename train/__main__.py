"""Run a customization job:  python -m train --config job.yaml [--set key=value ...] [--check]

Under Ray's job API:  ray job submit --working-dir . -- python -m train --config job.yaml
"""

from __future__ import annotations

import argparse
import sys

from rayembed.cli import run_config_cli
from train.config import JobConfig, load_config


def _user_errors() -> tuple[type[BaseException], ...]:
    from train.job import user_errors

    return user_errors()


def _run(args: argparse.Namespace) -> int:
    from train.export import ExportError
    from train.job import preflight, run_job

    cfg = load_config(args.config, args.overrides)
    if args.check:
        from train.data import negative_counts, negatives_advice

        pre = preflight(cfg)
        counts = negative_counts(cfg.dataset.training)
        print(f"ok: {pre.n_train} training / {pre.n_val} validation examples, model {pre.info.path}")
        print(f"hard negatives per line: {', '.join(f'{n}: {c} lines' for n, c in counts.items())}")
        if cfg.dataset.mining:
            print(f"mining: {cfg.dataset.mining.negatives} negatives per line will be mined with the base model before training")
        elif advice := negatives_advice(counts, cfg.loss.negatives_per_query):
            print(f"note: {advice}")
        return 0
    try:
        run_job(cfg, verbose=args.verbose, exits_with_job=True)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_config_cli(
        argv, prog="python -m train", doc=__doc__, model=JobConfig, run=_run, user_errors=_user_errors,
        config_help="job YAML (see examples/)", set_example="optimizer.learning_rate=2e-5",
        add_arguments=lambda p: p.add_argument("--check", action="store_true",
                                               help="validate config, model and data, then stop"))


if __name__ == "__main__":
    raise SystemExit(main())
