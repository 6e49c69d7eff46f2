"""Sweep the learning rate of a training job:  python -m tune --config sweep.yaml [--set key=value ...]

Under Ray's job API:  ray job submit --working-dir . -- python -m tune --config sweep.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys

from train.config import ConfigError
from train.data import DataError
from train.model import ModelError
from tune.config import load_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="sweep YAML (see examples/minilm-sweep.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set search.learning_rates=[1e-5,3e-5]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    from train.job import OutputConflict
    from tune.sweep import run_sweep

    try:
        summary = run_sweep(load_sweep(args.config, args.overrides))
    except (ConfigError, DataError, ModelError, OutputConflict, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if summary["best"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
