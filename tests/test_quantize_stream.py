"""`quantsink quantize --stream`: layer by layer from disk, the same bytes as in memory; a killed
run resumed with --resume gives the same bytes; a work directory of another model or recipe is
refused with one line, exit 2, nothing changed."""
from __future__ import annotations

import filecmp
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_models
from quantsink.cli import main
from quantsink.weights.resume import STOP_ENV

ARGS = ["--calib-samples", "4", "--calib-seq-len", "32", "--quiet"]
RECIPE = {"llama": "int4-sink", "gemma3": "w4-g64", "qwen2": "int4-sink"}  # Gemma: scaled embedding


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Tiny tied Llama and 6-layer Gemma 3 directories and a calibration text."""
    root = tmp_path_factory.mktemp("stream")
    tiny_models.save("llama", root / "llama", tie_word_embeddings=True)
    tiny_models.save("gemma3", root / "gemma3")
    tiny_models.save("qwen2", root / "qwen2", seed=3)
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"]
    (root / "calib.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(24))
                                              for _ in range(100)) + "\n")
    return root


def _quantize(root: Path, model: str, out: Path, *extra: str) -> int:
    recipe = [] if "--recipe" in extra else ["--recipe", RECIPE[model]]
    return main(["quantize", "--model", str(root / model), "--calib", str(root / "calib.txt"),
                 "--out", str(out), *recipe, *ARGS, *extra])


def _same_dirs(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def in_memory(root: Path) -> dict[str, Path]:
    """The in-memory path's checkpoints (no --stream)."""
    outs = {}
    for model in ("llama", "gemma3"):
        outs[model] = root / f"{model}-mem"
        assert _quantize(root, model, outs[model]) == 0
    return outs


@pytest.mark.parametrize("model", ["llama", "gemma3"])
def test_streamed_writes_the_in_memory_bytes(root: Path, in_memory: dict, model: str) -> None:
    out = root / f"{model}-stream"
    assert _quantize(root, model, out, "--stream") == 0
    _same_dirs(in_memory[model], out)
    assert not (root / f"{model}-stream.partial").exists()  # the work directory is gone


def test_killed_run_resumes_to_the_same_bytes(root: Path, in_memory: dict) -> None:
    out = root / "gemma3-killed"
    cmd = [sys.executable, "-m", "quantsink", "quantize", "--model", str(root / "gemma3"), "--calib",
           str(root / "calib.txt"), "--out", str(out), "--recipe", RECIPE["gemma3"], *ARGS, "--stream"]
    env = {**os.environ, STOP_ENV: "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    work = root / "gemma3-killed.partial"
    assert not out.exists()
    assert sorted(p.name for p in work.glob("layer-*")) == [f"layer-0000{i}.safetensors" for i in range(3)]
    assert _quantize(root, "gemma3", out, "--stream") == 2  # not without --resume
    assert _quantize(root, "gemma3", out, "--stream", "--resume") == 0
    _same_dirs(in_memory["gemma3"], out)
    assert not work.exists()


@pytest.fixture()
def stale_work(root: Path, tmp_path: Path, monkeypatch, capsys) -> Path:
    """A killed llama run's work directory (after layer 0), via the test hook in-process."""
    return _killed_run(root, "llama", tmp_path / "out", monkeypatch, capsys)


def _killed_run(root: Path, model: str, out: Path, monkeypatch, capsys) -> Path:
    monkeypatch.setenv(STOP_ENV, "0")
    killed, real_kill = [], os.kill

    def kill(pid: int, sig: int) -> None:
        if sig != signal.SIGKILL:
            return real_kill(pid, sig)
        killed.append(sig)
        raise KeyboardInterrupt  # stands in for the SIGKILL: the process stops right there

    monkeypatch.setattr(os, "kill", kill)
    assert _quantize(root, model, out, "--stream") == 130
    assert killed and not out.exists()
    assert "--resume continues" in capsys.readouterr().err
    monkeypatch.delenv(STOP_ENV)
    return out


@pytest.mark.parametrize("change,needle", [
    (("--model", "qwen2"), "another model"),
    (("--recipe", "w4-g64"), "another recipe"),
    (("--calib-samples", "3"), "other calibration data"),
])
def test_resume_refuses_another_run(root: Path, stale_work: Path, change: tuple, needle: str,
                                    capsys, monkeypatch) -> None:
    work = stale_work.with_name("out.partial")
    before = _snapshot(work)
    capsys.readouterr()
    model = change[1] if change[0] == "--model" else "llama"
    args = ["quantize", "--model", str(root / model), "--calib", str(root / "calib.txt"),
            "--out", str(stale_work), "--recipe", "int4-sink", *ARGS, "--stream", "--resume"]
    if change[0] != "--model":
        i = args.index(change[0])
        args[i + 1] = change[1]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "--resume" in err, err
    assert _snapshot(work) == before and not stale_work.exists()


@pytest.mark.parametrize("tensor", ["model.layers.0.mlp.down_proj.weight",  # finished: hashed up front
                                    "model.layers.1.self_attn.k_proj.weight",  # hashed as it is read
                                    "model.norm.weight"])
def test_resume_refuses_resaved_weights(root: Path, tmp_path: Path, tensor: str, capsys, monkeypatch) -> None:
    """Weights re-saved with the same names, dtypes and shapes: the same safetensors header (all
    that the manifest's fingerprint sees), other bytes; the resume is refused, nothing changed."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shutil.copytree(root / "llama", tmp_path / "llama")
    shutil.copy(root / "calib.txt", tmp_path / "calib.txt")
    out = _killed_run(tmp_path, "llama", tmp_path / "out", monkeypatch, capsys)
    work = out.with_name("out.partial")
    f = tmp_path / "llama" / "model.safetensors"
    header = f.read_bytes()[:4096]
    with safe_open(str(f), framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(f)
    tensors[tensor] = tensors[tensor] * 1.01
    save_file(tensors, str(f), metadata=meta)
    assert f.read_bytes()[:4096] == header  # the header did not change
    before = _snapshot(work)
    assert _quantize(tmp_path, "llama", out, "--stream", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and repr(tensor) in err and "--resume" in err, err
    assert _snapshot(work) == before and not out.exists()


def test_streamed_checkpoint_reloads_with_the_same_logits(root: Path, in_memory: dict) -> None:
    import quantsink

    model, tok = quantsink.load(root / "llama-stream")
    ref, _ = quantsink.load(in_memory["llama"])
    ids = tiny_models.token_ids(48, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
    qc = json.loads((root / "llama-stream" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "quantsink" and qc["modules"]


@pytest.mark.parametrize("extra,needle", [
    (["--resume"], "--resume works with --stream only"),
    (["--stream", "--device", "cuda"] if not torch.cuda.is_available() else ["--stream", "--device", "tpu"],
     "--device"),
    (["--stream", "--eval", "x.txt"], "--eval"),
    (["--stream", "--format", "compressed-tensors", "--drop-outliers"], "quantsink format only"),
    (["--stream", "--recipe", "w4-ct-awq-g128"], "does not run yet"),
])
def test_stream_bad_arguments(root: Path, tmp_path: Path, extra: list, needle: str, capsys) -> None:
    capsys.readouterr()
    assert _quantize(root, "llama", tmp_path / "o", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize("source", ["file.gguf", "moe"])
def test_stream_refuses_sources_it_cannot_read(root: Path, tmp_path: Path, source: str, capsys) -> None:
    if source == "moe":
        tiny_models.save("qwen3_moe", tmp_path / "moe")
        needle = "MoE experts"
    else:
        (tmp_path / source).write_bytes(b"GGUF")
        needle = "not a local directory"
    capsys.readouterr()
    code = main(["quantize", "--model", str(tmp_path / source), "--calib", str(root / "calib.txt"),
                 "--out", str(tmp_path / "o"), "--recipe", "w4-g64", *ARGS, "--stream"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_force_starts_over(root: Path, stale_work: Path, in_memory: dict) -> None:
    work = stale_work.with_name("out.partial")
    (work / "layer-00000.safetensors").write_bytes(b"stale")  # would break a resume, not a new run
    assert _quantize(root, "llama", stale_work, "--stream", "--force") == 0
    _same_dirs(in_memory["llama"], stale_work)
    assert not work.exists()


def test_sharded_source_and_output(root: Path, tmp_path: Path) -> None:
    """A checkpoint in several shards (with an index) streams; several output shards match."""
    import quantsink
    from quantsink.weights.streaming import quantize_streaming
    from quantsink.weights.summary import build_report

    src = tmp_path / "sharded"
    tiny_models.build("qwen2", seed=5).save_pretrained(src, max_shard_size="40KB")
    tiny_models.char_tokenizer().save_pretrained(src)
    assert len(list(src.glob("*.safetensors"))) > 2
    windows = tiny_models.token_ids(32, batch=3)
    model, tok = quantsink.load_model(str(src))
    quantsink.quantize(model, "int4-sink", calib=windows, progress=False)
    report = build_report(model, quantsink.load_recipe("int4-sink"))
    quantsink.export(model, tok, tmp_path / "mem", report=report, max_shard_bytes=16384)
    out, _ = quantize_streaming(src, "int4-sink", tmp_path / "stream", calib=windows, progress=False,
                                max_shard_bytes=16384)
    assert len(list(out.glob("model-*.safetensors"))) > 3
    _same_dirs(tmp_path / "mem", out)


def test_resume_without_a_work_directory_starts_fresh(root: Path, in_memory: dict, tmp_path: Path) -> None:
    out = tmp_path / "fresh"
    assert _quantize(root, "llama", out, "--stream", "--resume") == 0
    _same_dirs(in_memory["llama"], out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="--device cuda path: needs a CUDA GPU")
def test_streamed_gptq_on_cuda_matches_the_cpu_run(root: Path, in_memory: dict) -> None:
    """GPTQ, RTN and the calibration of each streamed layer on the GPU: the codes agree with the
    CPU run's up to rounding-boundary flips, and the checkpoint gives the same logits."""
    import quantsink
    from safetensors.torch import load_file

    out = root / "llama-cuda"
    assert _quantize(root, "llama", out, "--stream", "--device", "cuda") == 0
    gpu, cpu = load_file(out / "model.safetensors"), load_file(in_memory["llama"] / "model.safetensors")
    assert gpu.keys() == cpu.keys()
    packed = [n for n in cpu if n.endswith("weight_packed")]
    same = sum((gpu[n] == cpu[n]).float().mean().item() for n in packed) / len(packed)
    assert packed and same > 0.98, same
    ids = tiny_models.token_ids(32)
    logits = []
    for path in (out, in_memory["llama"]):
        model, _ = quantsink.load(path)
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert (logits[0] - logits[1]).abs().max().item() < 0.05
