"""The ``quantsink`` command line. ``main(argv) -> int`` only parses and calls the Python API.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and ``run(args)``.
A :class:`~quantsink.errors.QuantsinkError` becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from quantsink.errors import QuantsinkError

_SUBCOMMANDS = ("inspect", "quantize", "eval")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="quantsink", description="Sink-aware LLM quantization.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in _SUBCOMMANDS:
        importlib.import_module(f"quantsink.cli.{name}_cmd").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except QuantsinkError as exc:
        sys.stderr.write(f"quantsink {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("quantsink: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
