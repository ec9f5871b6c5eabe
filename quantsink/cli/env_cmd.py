"""`quantsink env`: versions, CPU features, the C++ extension and the kernel each layer type takes.

    quantsink env

prints ``key: value`` lines (:func:`quantsink.env.environment`); ``QUANTSINK_CPU_ISA`` and
``QUANTSINK_NO_CPU_KERNEL`` are honoured, so it shows what a run with them would use.
"""
from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "env", help="print versions, CPU features, the C++ extension state and the kernel per layer type",
        description="Report what this install runs on this host (for bug reports and benchmarks).")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from quantsink.env import environment, format_environment

    print(format_environment(environment()))
    return 0
