"""The one runner behind `python -m train` and `python -m tune`: --config, --set, --help generated
from the config model's fields, logging set-up, and user errors printed as one message (exit 2)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from pydantic import BaseModel

from rayembed.config import ConfigError, field_help


NOISY = ("onnx_ir", "onnxscript", "torch.onnx", "urllib3", "filelock")  # INFO lines a person has no use for


def setup_logging(verbose: bool = False) -> None:
    """Our INFO lines, and other libraries' warnings only (all of their INFO with --verbose)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in () if verbose else NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)


def run_config_cli(argv: list[str] | None, *, prog: str, doc: str, model: type[BaseModel],
                   run: Callable[[argparse.Namespace], int], config_help: str, set_example: str,
                   user_errors: Callable[[], tuple[type[BaseException], ...]] = tuple,
                   add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse the command line, then `run(args)`; a user error (bad config, data, model, output dir)
    is printed without a traceback and exits 2. `user_errors` is called lazily so the help stays fast."""
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (YAML keys, or --set KEY=VALUE):\n" + "\n".join(field_help(model)))
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config field, e.g. --set {set_example} (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="also show other libraries' INFO logs")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    errors = (ConfigError, FileNotFoundError, *user_errors())
    try:
        return run(args)
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
