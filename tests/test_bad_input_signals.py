"""Bad input in a real process: signals during an export, and inputs that would exhaust memory.

Signal cases run ``python -m quantsink quantize`` on a tiny saved model with the testing-only
``QUANTSINK_TEST_EXPORT_DELAY`` (the exporter sleeps after each shard), wait until the staged
directory holds a shard, and send SIGINT / SIGTERM (exit 130 / 143, one line, nothing left) or
SIGKILL (the staged directory stays; the next run to the same ``--out`` removes it and succeeds).
Memory cases run the CLI in one child whose address space is capped with ``RLIMIT_AS``: every
oversized request is one line and exit 2, never a MemoryError or an OOM kill.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny_models as tm

W4 = "name: tiny\nweights:\n  bits: 4\n  group_size: 32\n  algorithm: rtn\n  outlier_channels: 0\n"
KV = "name: kv\nkv_cache:\n  key_bits: 4\n  value_bits: 4\n  key_group_size: 16\n  value_group_size: 16\n  window: 16\n"
TEXT = "The quick brown fox jumps over the lazy dog.\n" * 60
LIMIT_MB = 3072  # enough to import torch and run the tiny model, far too little for the requests below


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    tm.save("llama", root / "tiny")
    files = {"w4.yaml": W4, "kv.yaml": KV, "text.txt": TEXT,
             "sinks.yaml": KV + "  num_sinks: 1000000000\n",
             "occ.yaml": KV + "  content_sink_occurrences: 1000000000\n",
             "kgroup.yaml": KV.replace("key_group_size: 16", "key_group_size: 1073741824"),
             "wgroup.yaml": W4.replace("group_size: 32", "group_size: 1073741824"),
             "samples.yaml": W4 + "calibration:\n  samples: 1000000000\n",
             "seqlen.yaml": W4 + "calibration:\n  seq_len: 1000000000000\n"}
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def _env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _quantize(root: Path, delay: str | None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "quantsink", "quantize", "--model", str(root / "tiny"), "--recipe",
            str(root / "w4.yaml"), "--out", str(root / "out"), "--quiet"]
    env = _env(**({"QUANTSINK_TEST_EXPORT_DELAY": delay} if delay else {}))
    return subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """A shell without job control starts background jobs with SIGINT ignored, and Python then
    installs no Ctrl-C handler: give the child the default, as a terminal would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_shard(root: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the staged directory holds a written shard (the exporter then sleeps)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        if list(root.glob(".out.tmp-*/*.safetensors")):
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the export never started")


def _staged(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".out") or p.name == "out")


@pytest.mark.parametrize("sig, code, line", [(signal.SIGINT, 130, "quantsink: interrupted, nothing was written"),
                                             (signal.SIGTERM, 143, "quantsink: terminated, nothing was written")],
                         ids=["SIGINT", "SIGTERM"])
def test_signal_during_export_leaves_nothing(work, sig, code, line):
    proc = _quantize(work, delay="60")
    _wait_for_shard(work, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, (proc.returncode, err)
    assert err.strip() == line and "Traceback" not in err, err
    assert _staged(work) == [], _staged(work)


def test_sigkill_during_export_then_rerun_cleans_up(work):
    proc = _quantize(work, delay="60")
    _wait_for_shard(work, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    left = _staged(work)
    assert len(left) == 1 and left[0].startswith(".out.tmp-"), left  # the killed writer's staging dir
    rerun = _quantize(work, delay=None)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert _staged(work) == ["out"] and (work / "out" / "quantsink_report.json").is_file()
    for f in (work / "out").iterdir():  # nothing of the killed run was reused half-written
        assert f.stat().st_size > 0


MEMORY_CASES = {
    "kv a billion sinks": (["quantize", "--model", "@tiny", "--recipe", "@sinks.yaml", "--out", "@m"],
                           "num_sinks must be in 0..4096"),
    "kv a billion sink occurrences": (["quantize", "--model", "@tiny", "--recipe", "@occ.yaml", "--out", "@m"],
                                      "content_sink_occurrences must be <= 4096"),
    "kv key group 2**30": (["quantize", "--model", "@tiny", "--recipe", "@kgroup.yaml", "--out", "@m"],
                           "key_group_size must be in 1..1024"),
    "weights group 2**30": (["quantize", "--model", "@tiny", "--recipe", "@wgroup.yaml", "--out", "@m"],
                            "group_size=1073741824 is not supported"),
    "recipe a billion samples": (["quantize", "--model", "@tiny", "--recipe", "@samples.yaml", "--calib",
                                  "@text.txt", "--out", "@m"], "calibration.samples must be in 1..4096"),
    "recipe 10**12 token windows": (["quantize", "--model", "@tiny", "--recipe", "@seqlen.yaml", "--calib",
                                     "@text.txt", "--out", "@m"], "calibration.seq_len must be in 2..1048576"),
    "quantize a million samples": (["quantize", "--model", "@tiny", "--recipe", "@w4.yaml", "--calib", "@text.txt",
                                    "--calib-samples", "1000000", "--out", "@m"], "--calib-samples must be in 1..4096"),
    "quantize 10**9 token windows": (["quantize", "--model", "@tiny", "--recipe", "@w4.yaml", "--calib", "@text.txt",
                                      "--calib-seq-len", "1000000000", "--out", "@m"],
                                     "--calib-seq-len 1000000000 is longer than the model's context of 1024"),
    "inspect a million samples": (["inspect", "--model", "@tiny", "--calib", "@text.txt", "--calib-samples", "1000000",
                                   "--out", "@m"], "--calib-samples must be in 1..4096"),
    "inspect 10**9 token windows": (["inspect", "--model", "@tiny", "--calib", "@text.txt", "--calib-seq-len",
                                     "1000000000", "--out", "@m", "--no-plots", "--no-progress"],
                                    "longer than the model's context of 1024"),
    "eval 10**9 token windows": (["eval", "--model", "@tiny", "--data", "@text.txt", "--ctx", "1000000000",
                                  "--max-tokens", "1000000000", "--no-progress"], "longer than the model's context"),
}

CHILD = r"""
import contextlib, io, json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]),) * 2)
from quantsink.cli import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except BaseException as exc:  # what the test must never see: MemoryError, SystemExit, ...
            code = f"raised {type(exc).__name__}"
    results[name] = [code, err.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def memory_results(work):
    cases = {name: [str(work / a[1:]) if a.startswith("@") else a for a in argv]
             for name, (argv, _) in MEMORY_CASES.items()}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases), str(LIMIT_MB * 2**20)], cwd=work, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(MEMORY_CASES))
def test_memory_bounded_case_is_one_line(case, memory_results, work):
    code, err = memory_results[case]
    err = err.strip()
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "MemoryError" not in err, err
    assert MEMORY_CASES[case][1] in err and ("allowed" in err or "must" in err), err
    assert not (work / "m").exists()
