"""Sweep the learning rate of a training job:  python -m tune --config sweep.yaml [--set key=value ...]

Under Ray's job API:  ray job submit --working-dir . -- python -m tune --config sweep.yaml
"""

from __future__ import annotations

import argparse

from rayembed.cli import run_config_cli
from tune.config import SweepConfig, load_sweep


def _user_errors() -> tuple[type[BaseException], ...]:
    from train.job import user_errors

    return user_errors()


def _run(args: argparse.Namespace) -> int:
    from tune.sweep import run_sweep

    summary = run_sweep(load_sweep(args.config, args.overrides))
    return 0 if summary["best"] else 1


def main(argv: list[str] | None = None) -> int:
    return run_config_cli(argv, prog="python -m tune", doc=__doc__, model=SweepConfig, run=_run,
                          user_errors=_user_errors, config_help="sweep YAML (see examples/minilm-sweep.yaml)",
                          set_example="search.learning_rates=[1e-5,3e-5]")


if __name__ == "__main__":
    raise SystemExit(main())
