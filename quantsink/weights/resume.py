"""The work directory of a streamed quantization: what lets a killed run resume.

``<out>.partial/`` (next to ``--out``; no ``.tmp-``/``.old-`` name, so the leftovers
cleanup of :mod:`quantsink._fs` never takes it) holds

- ``manifest.json``: what the run is for: the model (config bytes; each weight file's name,
  size and header hash), the recipe and format, the calibration windows (hash) or artifact,
  the device, the quantsink version. ``--resume`` refuses a directory whose manifest differs,
  with one line, before anything is written;
- ``weights-sha256.json``: the sha256 of every source tensor the run has read, computed from
  the bytes as they are read (:class:`WeightCheck`; no second pass). On ``--resume`` the
  finished layers' source tensors (which the resumed run does not otherwise read) are hashed
  up front and every other tensor as it is read; one that differs (weights re-saved with the
  same shapes, which the header hash cannot see) is refused with one line;
- ``calibration/``: the calibration result (:meth:`CalibrationResult.save`, safetensors + JSON);
- ``layer-00000.safetensors``, ...: each finished decoder layer's tensors exactly as they were
  in memory (float32 norms, packed codes, ...), its report rows in the file's metadata. Each
  file is written under a temporary name and renamed: a layer file is whole or absent, and
  the finished layers are the files ``0..k-1``.

Test hook (tests only): ``QUANTSINK_TEST_STOP_AFTER_LAYER=k`` makes the process SIGKILL itself
right after layer ``k``'s file is in place, like a run killed halfway.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

from quantsink.errors import QuantsinkError, check

WORK_VERSION = 2  # 2: weights-sha256.json
MANIFEST = "manifest.json"
DIGESTS = "weights-sha256.json"
STOP_ENV = "QUANTSINK_TEST_STOP_AFTER_LAYER"


def work_dir_for(out: str | Path) -> Path:
    """The work directory of ``--out``: the sibling ``<out>.partial``."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def tensor_digest(t: torch.Tensor | None) -> str | None:
    """sha256 of a tensor's dtype, shape and bytes (None for None)."""
    if t is None:
        return None
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own buffer, no copy
    return h.hexdigest()


def dir_digest(path: str | Path | None) -> str | None:
    """sha256 over the names and bytes of the files in a directory (None for None)."""
    if path is None:
        return None
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


_WHAT = {"model": "another model (config.json or weight files differ)",
         "recipe": "another recipe or format", "calibration": "other calibration data",
         "device": "another --device", "quantsink": "another quantsink version",
         "version": "another work-directory layout", "num_layers": "another model"}


def _read_manifest(path: Path) -> dict:
    """The manifest of work directory ``path`` ({} when unreadable)."""
    try:
        old = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return old if isinstance(old, dict) else {}


class WorkDir:
    """The work directory of one streamed run (see the module docstring)."""

    def __init__(self, path: Path, manifest: dict, resume: bool = False) -> None:
        self.path, self.manifest, self.resume = path, manifest, resume

    @classmethod
    def open(cls, path: Path, manifest: dict, resume: bool, force: bool) -> "WorkDir":
        """Check ``path`` against ``manifest`` (nothing is written yet): with ``resume`` it must
        be absent or match; without, it must be absent unless ``force`` (then it is replaced
        by :meth:`create`)."""
        manifest = json.loads(json.dumps(manifest))
        if not path.exists():
            return cls(path, manifest)
        check(path.is_dir() and (path / MANIFEST).is_file(),
              f"work directory {str(path)!r} exists but is not a quantsink work directory (no "
              f"{MANIFEST}); allowed: remove it, or another --out")
        if not resume:
            check(force, f"work directory {str(path)!r} of an earlier run exists; allowed: --resume to "
                         "continue it, or --force to start over")
            return cls(path, manifest)
        old = _read_manifest(path)
        differ = [k for k in manifest if old.get(k) != manifest[k]] or [""]
        check(not differ[0], f"--resume: work directory {str(path)!r} was made for "
                             f"{_WHAT.get(differ[0], differ[0])}; allowed: the same "
                             "--model, recipe and calibration, or remove it (or --force) to start over")
        return cls(path, manifest, resume=True)

    def create(self) -> None:
        """Make the directory with its manifest (an old one is replaced), unless resuming (then
        :meth:`open` has matched the manifest: only stale temporaries go)."""
        if self.resume:
            self._clean_temporaries()
            return
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        self._write(self.path / MANIFEST, json.dumps(self.manifest, indent=1, sort_keys=True).encode())

    def _clean_temporaries(self) -> None:
        for f in self.path.glob("*.tmp-*"):
            if f.is_file():
                f.unlink()

    @staticmethod
    def _write(target: Path, data: bytes) -> None:
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def layer_file(self, i: int) -> Path:
        return self.path / f"layer-{i:05d}.safetensors"

    def finished(self, num_layers: int) -> int:
        """How many leading layers are finished (their files are in place)."""
        k = 0
        while k < num_layers and self.layer_file(k).is_file():
            k += 1
        return k

    def save_layer(self, i: int, tensors: dict[str, torch.Tensor], reports: list[dict]) -> None:
        """Layer ``i``'s tensors (as they are) and report rows, whole or not at all."""
        from safetensors.torch import save_file

        target = self.layer_file(i)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata={"reports": json.dumps(reports)})
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise QuantsinkError(f"writing layer {i} to the work directory {str(self.path)!r} failed "
                                 f"({exc.strerror or type(exc).__name__}); the {i} finished layers are "
                                 "kept; allowed: free some space, then the same command with "
                                 "--resume") from None
        if os.environ.get(STOP_ENV) == str(i):  # tests only: a run killed halfway
            os.kill(os.getpid(), signal.SIGKILL)

    def layer_reports(self, i: int) -> list[dict]:
        from safetensors import safe_open

        with safe_open(str(self.layer_file(i)), framework="pt") as f:
            return json.loads(f.metadata()["reports"])

    def read_layer(self, i: int, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Layer ``i``'s tensors (all, or ``names``), copied out of the file."""
        from safetensors import safe_open

        with safe_open(str(self.layer_file(i)), framework="pt") as f:
            return {n: f.get_tensor(n).clone() for n in (names if names is not None else f.keys())}

    def layer_shapes(self, i: int) -> dict[str, tuple[str, list[int]]]:
        """``{name: (safetensors dtype, shape)}`` of layer ``i``'s file, without reading tensors."""
        from safetensors import safe_open

        with safe_open(str(self.layer_file(i)), framework="pt") as f:
            return {n: (f.get_slice(n).get_dtype(), f.get_slice(n).get_shape()) for n in f.keys()}

    def digests(self) -> dict[str, str]:
        """``{source tensor name: sha256}`` recorded so far ({} when none)."""
        f = self.path / DIGESTS
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}

    def save_digests(self, digests: dict[str, str]) -> None:
        self._write(self.path / DIGESTS, json.dumps(digests, indent=0, sort_keys=True).encode())

    def calibration_dir(self) -> Path:
        return self.path / "calibration"

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def manifest_for(model_fp: dict, recipe: Any, fmt: str, windows: torch.Tensor | None,
                 calibration: Any, device: str, num_layers: int) -> dict:
    """The manifest of a run (see the module docstring)."""
    from quantsink import __version__
    from quantsink.config import to_dict

    recipe_dict = {"name": recipe.name, "weights": to_dict(recipe.weights) if recipe.weights else None,
                   "kv_cache": to_dict(recipe.kv_cache) if recipe.kv_cache else None, "format": fmt}
    recipe_hash = hashlib.sha256(json.dumps(recipe_dict, sort_keys=True).encode()).hexdigest()
    cal = {"windows": tensor_digest(windows),
           "artifact": dir_digest(calibration) if isinstance(calibration, (str, Path)) else None}
    return {"version": WORK_VERSION, "quantsink": __version__, "model": model_fp,
            "recipe": recipe_hash, "calibration": cal, "device": device, "num_layers": num_layers}


class WeightCheck:
    """The ``on_read`` hook of a streamed run's checkpoint reader: hashes each source tensor as
    it is read, records new digests in the work directory (:meth:`flush`) and refuses, with
    one line, a tensor whose bytes differ from what an earlier run of this work directory read."""

    def __init__(self, work: WorkDir, source: Path) -> None:
        self.work, self.source = work, source
        self.known = work.digests() if work.resume else {}
        self.pending: dict[str, str] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        digest = tensor_digest(tensor)
        old = self.known.get(name)
        check(old is None or old == digest,
              f"--resume: tensor {name!r} of {str(self.source)!r} is not the one the interrupted run "
              "read (the weights were re-saved or changed); allowed: the same weights, or remove "
              f"{str(self.work.path)!r} (or --force) to start over")
        if old is None:
            self.pending[name] = digest

    def flush(self) -> None:
        """Make the new digests durable (before the layer file that depends on them)."""
        if self.pending:
            self.known.update(self.pending)
            self.pending = {}
            self.work.save_digests(self.known)

    def verify(self, reader: Any, prefixes: list[str]) -> None:
        """Hash (and so check) the tensors under ``prefixes`` now, one prefix at a time: the
        finished layers of a resumed run, which it does not read otherwise."""
        for prefix in prefixes:
            reader.read(reader.names(prefix))
        self.flush()
