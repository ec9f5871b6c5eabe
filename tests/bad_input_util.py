"""What every bad-input CLI case asserts: exit 2, one line naming the problem and what is allowed,
no traceback, nothing left on disk (shared by the ``test_bad_input*.py`` files)."""
from __future__ import annotations

from pathlib import Path

ALLOWED_WORDS = ("allowed", "must", "needs", "expected", "available", "supported")


def expand(argv: list[str], root: Path) -> list[str]:
    """``@name`` arguments become paths under ``root``."""
    return [str(root / a[1:]) if a.startswith("@") else a for a in argv]


def leftovers(root: Path) -> list[str]:
    """Hidden staging directories and outputs under ``root``."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") or p.name in ("out", "rep"))


def run_cli_case(main, argv: list[str], needle: str, root: Path, capsys) -> str:
    """Run one CLI case under ``root`` and assert the refusal; returns the error line."""
    before = leftovers(root)
    code = main(expand(argv, root))
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err and any(w in err for w in ALLOWED_WORDS), err
    assert leftovers(root) == before
    return err
