"""The kernel objects without torch: tests/native/kern_check.cpp per ISA level, natively and on aarch64.

The driver links one level's object source (``kernels/cpu_isa_<level>.cpp``: the vector header
of the level and the kernel bodies ``cpu_kern_*.h``) and checks W4A32, decode attention and
int8 rows against naive double loops. The portable level is cross-compiled with
``aarch64-linux-gnu-g++ -static`` and run under ``qemu-aarch64`` (skipped, by name, where
either is missing); every level is also built with the host compiler and run where the CPU has
its features. ``perturb`` runs check that each comparison can fail.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cpu_levels import level_skip

from quantsink.kernels import cpu_ext

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "native" / "kern_check.cpp"
FLAGS = ["-O2", "-std=c++17", "-Wno-aggressive-loop-optimizations", f"-I{REPO / 'kernels'}"]
CROSS, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"
N_CHECKS = 12


def _build(cxx: list[str], level: str, out: Path, extra: list[str] = ()) -> Path:
    cmd = [*cxx, *FLAGS, *extra, *cpu_ext.ISA_FLAGS[level], f"-DQS_LEVEL={level}",
           str(REPO / "kernels" / f"cpu_isa_{level}.cpp"), str(DRIVER), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, cpu_ext.first_error(proc.stderr)
    return out


def _run(cmd: list[str], level: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[0] == f"level {level}", proc.stdout + proc.stderr
    assert sum(line.startswith("ok ") for line in lines) == N_CHECKS, proc.stdout
    bad = subprocess.run([*cmd, "perturb"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and sum(line.startswith("FAIL ") for line in bad.stdout.splitlines()) == N_CHECKS


@pytest.mark.skipif(shutil.which(CROSS) is None or shutil.which(QEMU) is None,
                    reason=f"aarch64 portable path: {CROSS} or {QEMU} not installed")
def test_portable_kernels_on_aarch64(tmp_path) -> None:
    exe = _build([CROSS], "portable", tmp_path / "kern_check_aarch64", ["-static"])
    head = exe.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    _run([QEMU, str(exe)], "portable")


@pytest.mark.parametrize("level", [pytest.param(lv, id=lv) for lv in cpu_ext.LEVELS])
def test_each_level_natively(level, tmp_path) -> None:
    if shutil.which(cpu_ext.compiler()[0]) is None:
        pytest.skip(f"{level} path: no C++ compiler ({cpu_ext.compiler()[0]})")
    exe = _build(cpu_ext.compiler(), level, tmp_path / f"kern_check_{level}")
    if level_skip(level) is not None:  # built (the compiler has the flags), not run
        pytest.skip(level_skip(level))
    _run([str(exe)], level)
