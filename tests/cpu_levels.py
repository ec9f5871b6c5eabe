"""The CPU kernel ISA levels as pytest parameters: every level on every host, skipped by name.

A level this host cannot run (not compiled, or a CPU feature missing) is skipped with a reason
naming the level and why (``avx512 path: the CPU has no avx512bw``); the portable level runs
wherever the extension builds. Test ids carry the level (``[avx2]``), so the summary says which
paths ran.
"""
from __future__ import annotations

import functools

import pytest

from quantsink.kernels import cpu_ext


@functools.cache
def level_skip(level: str) -> str | None:
    """The skip reason of ``level`` on this host (``"<level> path: <why>"``), or None."""
    why = cpu_ext.level_problem(level)
    return None if why is None else f"{level} path: {why}"


def levels() -> list:
    """``pytest.param(level, id=level)`` for every level, skip-marked where it cannot run."""
    return [pytest.param(lv, id=lv, marks=pytest.mark.skipif(level_skip(lv) is not None,
                                                             reason=level_skip(lv) or ""))
            for lv in cpu_ext.LEVELS]


LEVELS = levels()
