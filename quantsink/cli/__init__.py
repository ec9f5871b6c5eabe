"""The ``quantsink`` command line. ``main(argv) -> int`` only parses and calls the Python API.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and ``run(args)``.
A :class:`~quantsink.errors.QuantsinkError` becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
from typing import Sequence

from quantsink.errors import QuantsinkError

_SUBCOMMANDS = ("inspect", "quantize", "eval", "env")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C so that staged directories are removed."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def build_parser() -> argparse.ArgumentParser:
    from quantsink import __version__

    parser = _Parser(prog="quantsink", description="Sink-aware LLM quantization.")
    parser.add_argument("--version", action="version", version=f"quantsink {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in _SUBCOMMANDS:
        importlib.import_module(f"quantsink.cli.{name}_cmd").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (2: bad input, 130: Ctrl-C, 143: SIGTERM)."""
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        return int(args.run(args) or 0)
    except QuantsinkError as exc:
        sys.stderr.write(f"quantsink {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("quantsink: interrupted, nothing was written\n")
        return 130
    except Terminated:
        sys.stderr.write("quantsink: terminated, nothing was written\n")
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    raise SystemExit(main())
