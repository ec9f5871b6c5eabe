"""`quantsink eval` (placeholder until implemented)."""
from __future__ import annotations

import argparse

from quantsink.errors import QuantsinkError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="not implemented yet")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    raise QuantsinkError("'eval' is not implemented yet")
