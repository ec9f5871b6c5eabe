"""Calibration / evaluation text readers and reproducible windows."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from quantsink.data import calibration_windows, eval_tokens, load_text, tokenize
from quantsink.errors import QuantsinkError


class WordTokenizer:
    """Tiny stand-in tokenizer: one id per whitespace-separated word ("w17" -> 17, else its length)."""

    class _Out:
        def __init__(self, ids: list[int]) -> None:
            self.input_ids = torch.tensor([ids])

    def __call__(self, text: str, add_special_tokens: bool = False, return_tensors: str = "pt"):
        return self._Out([int(w[1:]) if w[1:].isdigit() else len(w) for w in text.split()])


TEXT = " ".join(f"w{i}" for i in range(400))


@pytest.fixture
def tok() -> WordTokenizer:
    return WordTokenizer()


def test_txt_raw_and_crlf(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one two\nthree", encoding="utf-8")
    (tmp_path / "b.raw").write_bytes(b"line one\r\nline two\r\n")
    assert load_text(tmp_path / "a.txt") == "one two\nthree"
    assert load_text(tmp_path / "b.raw") == "line one\nline two\n"  # text mode: CRLF -> LF


def test_jsonl_text_field(tmp_path: Path) -> None:
    rows = [{"text": "first doc"}, {"text": "second doc", "id": 2}]
    (tmp_path / "d.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n", encoding="utf-8")
    assert load_text(tmp_path / "d.jsonl") == "first doc\n\nsecond doc"
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(QuantsinkError, match="line 2: expected a JSON object with a string 'text' field"):
        load_text(tmp_path / "bad.jsonl")


def test_parquet(tmp_path: Path) -> None:
    if importlib.util.find_spec("pyarrow") is None:
        pytest.skip("pyarrow is not installed (it comes with `pip install 'quantsink[datasets]'`)")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", "", "beta"]}), tmp_path / "t.parquet")
    assert load_text(tmp_path / "t.parquet") == "alpha\n\nbeta"


def test_empty_missing_and_unsupported(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(QuantsinkError, match="is empty; allowed"):
        load_text(tmp_path / "empty.txt")
    with pytest.raises(QuantsinkError, match="does not exist; allowed"):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(QuantsinkError, match="is a directory; allowed"):
        load_text(tmp_path)  # a directory
    (tmp_path / "x.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(QuantsinkError, match="unsupported calibration data file 'x.csv'; allowed"):
        load_text(tmp_path / "x.csv")


def test_windows_reproducible_with_seed(tmp_path: Path, tok: WordTokenizer) -> None:
    (tmp_path / "c.txt").write_text(TEXT, encoding="utf-8")
    a = calibration_windows(tok, tmp_path / "c.txt", samples=5, seq_len=32, seed=3)
    b = calibration_windows(tok, tmp_path / "c.txt", samples=5, seq_len=32, seed=3)
    c = calibration_windows(tok, tmp_path / "c.txt", samples=5, seq_len=32, seed=4)
    assert a.shape == (5, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids = tokenize(tok, TEXT).tolist()
    for row in a.tolist():  # every window is a contiguous slice of the corpus
        start = ids.index(row[0])
        assert ids[start:start + 32] == row


def test_short_text_and_bad_counts(tmp_path: Path, tok: WordTokenizer) -> None:
    (tmp_path / "short.txt").write_text("only five words in here", encoding="utf-8")
    with pytest.raises(QuantsinkError, match="has 5 tokens, shorter than one window of 16; allowed"):
        calibration_windows(tok, tmp_path / "short.txt", samples=2, seq_len=16)
    assert calibration_windows(tok, tmp_path / "short.txt", samples=2, seq_len=5).shape == (2, 5)
    with pytest.raises(QuantsinkError, match="--calib-samples must be >= 1, got 0"):
        calibration_windows(tok, tmp_path / "short.txt", samples=0, seq_len=4)
    with pytest.raises(QuantsinkError, match="--calib-seq-len must be >= 2"):
        calibration_windows(tok, tmp_path / "short.txt", samples=1, seq_len=1)


def test_unknown_dataset_name_without_datasets(tok: WordTokenizer) -> None:
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed; this checks the message when it is not")
    with pytest.raises(QuantsinkError, match="needs `datasets`"):
        load_text("wikitext:wikitext-2-raw-v1")


def test_eval_tokens_prefix(tmp_path: Path, tok: WordTokenizer) -> None:
    (tmp_path / "e.txt").write_text(TEXT, encoding="utf-8")
    all_ids = eval_tokens(tok, tmp_path / "e.txt")
    assert all_ids.numel() == 400
    assert torch.equal(eval_tokens(tok, tmp_path / "e.txt", 10), all_ids[:10])


@pytest.mark.model
def test_real_calibration_windows(smollm, calib_path: Path) -> None:
    _, real_tok = smollm
    w = calibration_windows(real_tok, calib_path, samples=3, seq_len=64, seed=0)
    assert w.shape == (3, 64) and int(w.max()) < 49152
    assert torch.equal(w, calibration_windows(real_tok, calib_path, samples=3, seq_len=64, seed=0))
