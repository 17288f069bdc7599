"""Command line: ``python -m influence_over_inference <command> --help``.

Each command's defaults come from the same dataclasses the library uses. The commands live in
:mod:`.commands`, one module each; this module only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

# The commands, in the order --help lists them; each module exposes register(subparsers).
COMMAND_MODULES: list[str] = ["train", "influence", "validate", "notebook", "slides"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m influence_over_inference", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f".commands.{name}", __package__).register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as error:
        from .study.checkpoints import CheckpointError
        from .study.data import DataSourceError

        if isinstance(error, (CheckpointError, DataSourceError, ValueError, OSError)):
            print(f"error: {one_line(error)}", file=sys.stderr)
            return 2
        raise


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(error: BaseException) -> str:
    """An exception's message on one line, without terminal colour codes, never empty."""
    text = _ANSI.sub("", str(error)).strip()
    if isinstance(error, OSError) and error.filename and error.strerror and not text.startswith("cannot"):
        text = f"{error.strerror}: {error.filename}"
    return " ".join(text.split()) or type(error).__name__

if __name__ == "__main__":
    sys.exit(main())
