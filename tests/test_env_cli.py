"""`quantsink env`: versions, CPU features, the extension's state and the kernel per layer type."""
from __future__ import annotations

import os
import subprocess
import sys

from quantsink.kernels import cpu_ext


def _env(tmp_cache=None, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("QUANTSINK_CPU_ISA", "QUANTSINK_NO_CPU_KERNEL")}
    if tmp_cache is not None:
        env["QUANTSINK_CACHE"] = str(tmp_cache)
    return subprocess.run([sys.executable, "-m", "quantsink", "env"], capture_output=True, text=True,
                          timeout=600, env={**env, **extra})


def _fields(stdout: str) -> dict[str, str]:
    return dict(line.strip().split(": ", 1) for line in stdout.splitlines() if ": " in line)


def test_env_reports_versions_features_and_kernels() -> None:
    proc = _env()
    assert proc.returncode == 0, proc.stderr
    f = _fields(proc.stdout)
    for key in ("python", "torch", "transformers", "kernels (Hugging Face)", "triton", "cpu", "cpu features",
                "extension", "isa selected", "isa forced by env", "W4A32 linear (group 64)",
                "int8 rows (embedding / lm_head)", "decode attention", "int4pack (backend='int4pack')"):
        assert key in f, (key, proc.stdout)
    assert "avx2=" in f["cpu features"] and "avx512bw=" in f["cpu features"]
    if cpu_ext.available():
        best = cpu_ext.runnable_levels()[0]
        assert f["extension"] == "built" and f["isa selected"].startswith(best) and f["isa forced by env"] == "no"
        assert f["W4A32 linear (group 32)"] == f"cpu-w4a32[{best}]"
        assert f["decode attention"] == f"cpu-sink-decode[{best}]"


def test_env_with_portable_forced() -> None:
    proc = _env(QUANTSINK_CPU_ISA="portable")
    assert proc.returncode == 0, proc.stderr
    f = _fields(proc.stdout)
    assert f["isa forced by env"] == "QUANTSINK_CPU_ISA=portable"
    if cpu_ext.available():
        assert f["isa selected"] == "portable (forced by QUANTSINK_CPU_ISA)"
        assert f["W4A32 linear (group 128)"] == "cpu-w4a32[portable]"
        assert f["int8 rows (embedding / lm_head)"] == "cpu-int8rows[portable]"


def test_a_failed_build_is_one_line_with_the_compilers_first_error(tmp_path) -> None:
    proc = _env(tmp_path, CXX="c++ -fno-such-flag-quantsink")
    assert proc.returncode == 0, proc.stderr
    f = _fields(proc.stdout)
    assert f["extension"].startswith("not built:") and "-fno-such-flag-quantsink" in f["extension"]
    assert "error" in f["extension"]
    logged = [ln for ln in proc.stderr.splitlines() if ln.startswith("quantsink:")]
    assert len(logged) == 1 and "-fno-such-flag-quantsink" in logged[0], proc.stderr
    assert f["decode attention"].startswith("reference (slow:")
