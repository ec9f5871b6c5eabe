"""Reading user files: every encoding, truncation and format error is one line naming the file.

Each reader takes ``what`` (e.g. ``"calibration data"``, ``"recipe"``) so the message says
which input is wrong and what was expected. Nothing here unpickles anything.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from quantsink.errors import QuantsinkError, check


def existing_file(path: str | Path, what: str, allowed: str) -> Path:
    """``path`` as a readable file, or one line: missing / a directory / unreadable."""
    p = Path(path).expanduser()
    check(p.exists(), f"{what} {str(path)!r} does not exist; allowed: {allowed}")
    check(not p.is_dir(), f"{what} {str(path)!r} is a directory; allowed: {allowed}")
    check(p.is_file(), f"{what} {str(path)!r} is not a regular file; allowed: {allowed}")
    return p


def read_text(path: str | Path, what: str, allowed: str = "a UTF-8 text file") -> str:
    """The whole file as text (universal newlines); one line for missing, unreadable or non-UTF-8."""
    p = existing_file(path, what, allowed)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise QuantsinkError(f"{what} {str(path)!r} cannot be read ({exc.strerror}); allowed: {allowed}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QuantsinkError(f"{what} {str(path)!r} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                             f"{exc.start}); allowed: {allowed}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_json(path: str | Path, what: str, allowed: str = "a JSON file") -> Any:
    """Parsed JSON; one line with the line and column of a syntax error."""
    text = read_text(path, what, allowed)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise QuantsinkError(f"{what} {str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno}, column "
                             f"{exc.colno}); allowed: {allowed}") from None


def check_safetensors(path: str | Path, what: str = "weights file") -> dict:
    """Validate a safetensors file's header and size without loading it; returns the header.

    Catches truncated and garbage files (the loaders' own errors are tracebacks).
    """
    p = existing_file(path, what, "a .safetensors file")
    allowed = "an intact .safetensors file (re-export or re-download it)"
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(8)
        check(len(raw) == 8, f"{what} {str(path)!r} is truncated ({size} bytes); allowed: {allowed}")
        (n,) = struct.unpack("<Q", raw)
        check(0 < n <= min(size - 8, 100 * 2**20), f"{what} {str(path)!r} is not a safetensors file "
                                                     f"(bad header length {n}); allowed: {allowed}")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise QuantsinkError(f"{what} {str(path)!r} is not a safetensors file (unreadable header); "
                                 f"allowed: {allowed}") from None
    check(isinstance(header, dict), f"{what} {str(path)!r} has a malformed header; allowed: {allowed}")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    need = 8 + n + max(ends, default=0)
    check(size >= need, f"{what} {str(path)!r} is truncated ({size} of {need} bytes); allowed: {allowed}")
    return header


def check_gguf(path: str | Path) -> None:
    """Validate a GGUF file's magic and that its header parses (one line otherwise)."""
    p = existing_file(path, "GGUF file", "a .gguf file")
    with open(p, "rb") as f:
        magic = f.read(4)
    check(magic == b"GGUF", f"GGUF file {str(path)!r} does not start with the GGUF magic; allowed: an "
                            "intact .gguf file")
    try:
        import gguf

        gguf.GGUFReader(str(p))
    except ImportError:
        return  # the loader reports the missing package with its own line
    except (ValueError, OSError, IndexError, KeyError, struct.error) as exc:
        raise QuantsinkError(f"GGUF file {str(path)!r} is truncated or corrupt ({type(exc).__name__}); "
                             "allowed: an intact .gguf file") from None
