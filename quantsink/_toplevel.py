"""Keep the checkout's top-level folders from shadowing packages of the same name.

``kernels/`` and ``recipes/`` sit at the repository root and are installed as
``quantsink.kernels`` and ``quantsink.recipes``. With the root on ``sys.path`` (``python -m
pytest``, ``python -c``, a notebook started there) Python would also find them as top-level
``kernels`` / ``recipes`` and hide an installed package of that name: transformers >= 5.25
imports Hugging Face's ``kernels`` when it loads a model. Each folder's ``__init__`` calls
:func:`step_aside` when it runs under the top-level name (loading this file by path, so that a
third party's import does not import quantsink); the import then yields the installed package
or, where none is installed, an empty namespace module (what a folder without ``__init__.py``
gives), so no quantsink code answers to a third-party name.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _is_root(entry: str, root: str) -> bool:
    try:
        return os.path.samefile(entry or os.getcwd(), root)
    except OSError:  # a zip file, a missing folder, a path hook placeholder
        return False


def step_aside(name: str, init_file: str) -> None:
    """Replace ``sys.modules[name]`` (this checkout's folder) with what ``name`` means elsewhere."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    path = [p for p in sys.path if not _is_root(p, root)]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None:  # nothing installed under that name: an empty namespace, as for docs/
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = []
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        if spec.loader is not None:
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
