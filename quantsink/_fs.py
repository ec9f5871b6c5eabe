"""Writing directories atomically: stage in a temporary sibling, then swap into place.

An interrupted write leaves nothing at the target; an existing target is replaced only
once the new directory is complete. Staged and swapped-out siblings carry the writer's PID
(``.<name>.tmp-<pid>-*``, ``.<name>.old-<pid>-*``): an exception, Ctrl-C or (in the CLI)
SIGTERM removes them on the way out, and leftovers of a writer that was killed outright
(SIGKILL, power loss) are removed by the next write to the same target.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from quantsink.errors import QuantsinkError, check


def default_permissions(path: Path, mode: int) -> None:
    """Give ``path`` the permissions a plain open()/mkdir() would (mkdtemp makes 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(out: Path) -> list[Path]:
    """Remove staged/old siblings of ``out`` left by writers that no longer run; returns them."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for p in out.parent.glob(f".{out.name}.{kind}-*-*"):
            pid = p.name[len(f".{out.name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def check_target(out: Path, what: str = "--out") -> Path:
    """Refuse targets that cannot be replaced atomically: the working directory or one of its
    parents, the filesystem root, the home directory."""
    resolved = out.expanduser().resolve()
    cwd = Path.cwd().resolve()
    check(resolved != cwd and resolved not in cwd.parents and resolved != Path.home().resolve()
          and resolved.parent != resolved,
          f"{what} {str(out)!r} is the current directory, one of its parents, the home directory or the root; "
          "allowed: a directory of its own, e.g. out/")
    return resolved


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out``; on success it becomes ``out``.

    On any exception (KeyboardInterrupt and the CLI's SIGTERM included) the staged directory
    is removed and ``out`` is left as it was.
    """
    out = check_target(Path(out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise _write_error(out, exc) from None
    try:
        yield tmp
        default_permissions(tmp, 0o777)
        for f in tmp.iterdir():
            default_permissions(f, 0o777 if f.is_dir() else 0o666)
        _swap(tmp, out)
    except OSError as exc:  # full disk, read-only target, ...
        raise _write_error(out, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_error(out: Path, exc: OSError) -> QuantsinkError:
    return QuantsinkError(f"writing {str(out)!r} failed ({exc.strerror or type(exc).__name__}); nothing was "
                          "written; allowed: a writable location with enough free space")


def _swap(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    try:
        os.replace(out, old / out.name)
        os.replace(tmp, out)
    finally:
        if not out.exists() and (old / out.name).exists():  # interrupted between the renames
            os.replace(old / out.name, out)
        shutil.rmtree(old, ignore_errors=True)
