"""Which weight backend the caller asks for: :func:`use_backend` (a context), else
``$QUANTSINK_WEIGHT_BACKEND``, else ``auto``. A leaf module: the backend planner
(:mod:`quantsink.weights.backend`) and the row kernels (:mod:`quantsink.weights.rows_ops`)
both read it."""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

from quantsink.errors import check

BACKENDS = ("auto", "reference", "cpu", "int4pack", "triton")
ENV = "QUANTSINK_WEIGHT_BACKEND"
_FORCED: contextvars.ContextVar = contextvars.ContextVar("quantsink_weight_backend", default=None)


def forced_backend() -> str | None:
    """The backend :func:`use_backend` set for this context, or None."""
    return _FORCED.get()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed forwards with backend ``name`` (see :mod:`quantsink.weights.backend`)."""
    check(name in BACKENDS, f"weight backend {name!r} is not supported; allowed: {list(BACKENDS)}")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def requested_backend() -> str:
    """The backend asked for by :func:`use_backend`, else ``$QUANTSINK_WEIGHT_BACKEND``, else auto.

    The environment is read when a plan is built; :func:`use_backend` is seen on every call.
    """
    name = _FORCED.get() or os.environ.get(ENV) or "auto"
    check(name in BACKENDS, f"{ENV}={name!r} is not supported; allowed: {list(BACKENDS)}")
    return name
