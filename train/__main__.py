"""Run a customization job:  python -m train --config job.yaml [--set key=value ...]

Under Ray's job API:  ray job submit --working-dir . -- python -m train --config job.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys

from train.config import ConfigError, load_config
from train.data import DataError
from train.model import ModelError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="job YAML (see examples/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set optimizer.learning_rate=2e-5 (repeatable)")
    parser.add_argument("--check", action="store_true", help="validate config, model and data, then stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one INFO line per folded initializer
    from train.export import ExportError
    from train.job import OutputConflict, preflight, run_job

    try:
        cfg = load_config(args.config, args.overrides)
        if args.check:
            pre = preflight(cfg)
            print(f"ok: {pre.n_train} training / {pre.n_val} validation examples, model {pre.info.path}")
            return 0
        run_job(cfg)
    except (ConfigError, DataError, ModelError, OutputConflict, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
