"""Quantizing a model bigger than memory: the weights stay on disk, one layer at a time.

:func:`quantize_streaming` builds the model on the meta device (:mod:`quantsink.hf.lazy`),
reads the embeddings, final norm and lm_head, and then runs the same steps as
:func:`quantsink.quantize` + :func:`quantsink.export`: the calibration pass (a full forward
of the float model, each decoder layer read from the safetensors files just before it runs
and dropped right after), then the layer loop of :func:`~quantsink.weights.sequential.quantize_layers`
through a :class:`LayerStore`: layer ``i`` is read from disk when the model's forward reaches
it, quantized on its real inputs, run by the model's forward (its outputs are layer ``i+1``'s
inputs), written to the work directory (:mod:`quantsink.weights.resume`) and dropped when
layer ``i+1`` comes in. The checkpoint is then assembled shard by shard from the work
directory with the in-memory export's own shard plan and writer
(:func:`~quantsink.weights.export.write_checkpoint`): the same files, byte for byte, as the
in-memory path. Memory: the non-decoder tensors, one float layer, its calibration
activations and quantization temporaries, and one output shard.

``resume=True`` continues a killed run: the finished layers are read back from the work
directory in their quantized form and run (not quantized again) to recompute the next
layer's inputs, which is deterministic, so the result is byte-identical to an
uninterrupted run. Not covered: MoE experts, the compressed-tensors format, ``--eval``,
GGUF and ``*.bin`` sources (each refused with one line).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsink.errors import check
from quantsink.hf import lazy
from quantsink.hf.arch import decoder_layers
from quantsink.weights.groups import set_submodule
from quantsink.weights.resume import WeightCheck, WorkDir, manifest_for, work_dir_for

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


def check_device(device: str) -> torch.device:
    """``cpu``, or ``cuda`` when a GPU is there (one line otherwise)."""
    check(device in ("cpu", "cuda") or device.startswith("cuda:"),
          f"--device {device!r} is not supported; allowed: cpu, cuda")
    check(device == "cpu" or torch.cuda.is_available(),
          f"--device {device} but torch sees no CUDA GPU; allowed: --device cpu")
    return torch.device(device)


def stream_source(spec: str | Path) -> Path:
    """The Hugging Face safetensors directory a streamed run reads (one line for anything else)."""
    path = Path(spec).expanduser()
    allowed = ("allowed with --stream: a local Hugging Face directory with config.json and "
               "*.safetensors (quantize without --stream for .gguf, *.bin, aliases and hub ids)")
    check(path.is_dir(), f"--stream model {str(spec)!r} is not a local directory; {allowed}")
    check((path / "config.json").is_file(), f"--stream model {str(spec)!r} has no config.json; {allowed}")
    check(any(path.glob("*.safetensors")), f"--stream model {str(spec)!r} has no *.safetensors; {allowed}")
    return path


class LayerStore:
    """The :class:`~quantsink.weights.sequential.LayerStore` of a streamed run."""

    def __init__(self, model: nn.Module, reader: lazy.CheckpointReader, work: WorkDir,
                 wcfg: Any, device: torch.device) -> None:
        self.prefix, layers = decoder_layers(model)
        self.reader, self.work, self.wcfg, self.device = reader, work, wcfg, device
        self.done = work.finished(len(layers))
        self.last: nn.Module | None = None

    def begin(self, i: int, layer: nn.Module) -> list[dict] | None:
        self.close()
        self.last = layer
        if i < self.done:  # finished by an earlier run: its quantized tensors, as they were
            reports = self.work.layer_reports(i)
            _install_shells(layer, f"{self.prefix}.{i}", reports, self.wcfg)
            lazy.fill(layer, f"{self.prefix}.{i}.", self.work.read_layer(i), self.device)
            return reports
        lazy.materialize(layer, f"{self.prefix}.{i}.", self.reader, self.device)
        return None

    def end(self, i: int, layer: nn.Module, reports: list[dict]) -> None:
        _flush_digests(self.reader)  # the digests of what layer i was made from, before its file
        tensors = {f"{self.prefix}.{i}.{n}": t.detach().cpu().contiguous()
                   for n, t in layer.state_dict().items()}
        self.work.save_layer(i, tensors, reports)

    def close(self) -> None:
        from quantsink.weights.runtime import release_freed_memory

        if self.last is not None:
            lazy.release(self.last)
            self.last = None
            release_freed_memory()


def _flush_digests(reader: lazy.CheckpointReader) -> None:
    if isinstance(reader.on_read, WeightCheck):
        reader.on_read.flush()


def _install_shells(layer: nn.Module, prefix: str, reports: list[dict], wcfg: Any) -> None:
    """Empty QuantLinear modules (meta) where an earlier run quantized this layer's Linears."""
    from quantsink.weights.linear import QuantLinear

    for row in reports:
        check(row.get("kind") != "experts" and row["name"].startswith(prefix + "."),
              f"work directory layer {prefix!r} has an unexpected report row {row['name']!r}")
        name = row["name"][len(prefix) + 1:]
        mod = layer.get_submodule(name)
        if isinstance(mod, nn.Linear):
            set_submodule(layer, name, QuantLinear(mod.in_features, mod.out_features, wcfg.bits,
                                                   wcfg.group_size, int(row["outliers"]),
                                                   mod.bias is not None, device="meta"))


def _export_nbytes(dtype: str, shape: list[int]) -> int:
    """Bytes of a tensor once :func:`~quantsink.weights.shards.export_tensor` stored it."""
    t = torch.empty(0, dtype=_ST_DTYPES[dtype])
    return math.prod(shape) * (2 if t.is_floating_point() else t.element_size())


def _calibrate(model: nn.Module, tok: Any, windows: torch.Tensor | None, calibration: Any,
               reader: lazy.CheckpointReader, work: WorkDir, progress: bool, device: torch.device,
               extra: list = ()) -> Any:
    """The calibration result: the artifact given, the one saved by an earlier run, or a
    streamed calibration pass (saved for a resume)."""
    from quantsink.calibration import CalibrationResult
    from quantsink.weights.api import _calibration

    if calibration is not None or windows is None:
        return _calibration(model, tok, windows, calibration, progress)
    saved = work.calibration_dir()
    if (saved / "calibration.json").is_file():
        return CalibrationResult.load(saved)
    from quantsink.weights.runtime import release_freed_memory

    with lazy.streamed_forward(model, reader, device, release_freed_memory, extra):
        cal = _calibration(model, tok, windows, None, progress)
    _flush_digests(reader)
    cal.save(saved)
    return cal


def _quantize_streamed(model: nn.Module, recipe: Any, windows: torch.Tensor | None, calibration: Any,
                       tok: Any, reader: lazy.CheckpointReader, work: WorkDir, progress: bool,
                       dev: torch.device) -> None:
    """Calibration and layer loop; a float embedding and lm_head are read only when they run
    (the embedding once per forward) and for the checkpoint."""
    from quantsink.weights.api import apply_recipe, check_calibration_data
    from quantsink.weights.runtime import release_freed_memory

    lazy.materialize_rest(model, reader, dev, with_head=False)
    emb = lazy.streamable_embedding(model) if recipe.weights.embedding_bits is None else []
    for _, mod in emb:
        lazy.release(mod)
    cal = _calibrate(model, tok, windows, calibration, reader, work, progress, dev, emb)
    check_calibration_data(recipe, windows, cal)
    if recipe.weights.lm_head_bits is not None:
        lazy.materialize_head(model, reader, dev)  # quantized to int8 rows before the layers
    with lazy.streamed_modules(emb, reader, dev, release_freed_memory):
        apply_recipe(model, recipe, windows, cal, progress,
                     store=LayerStore(model, reader, work, recipe.weights, dev))
    lazy.materialize_missing(model, reader, dev)  # float embedding / lm_head: for the checkpoint


def _write(model: nn.Module, tok: Any, out: Path, report: dict, force: bool, work: WorkDir,
           max_shard_bytes: int | None = None) -> Path:
    """The checkpoint, assembled shard by shard from the work directory and the rest."""
    from quantsink.weights.export import write_checkpoint
    from quantsink.weights.shards import SHARD_BYTES, checkpoint_tensors, export_tensor

    prefix, layers = decoder_layers(model)
    rest = checkpoint_tensors(model, skip=prefix + ".")
    sizes = {n: t.numel() * t.element_size() for n, t in rest.items()}
    owner: dict[str, int] = {}
    for i in range(len(layers)):
        for name, (dtype, shape) in work.layer_shapes(i).items():
            sizes[name], owner[name] = _export_nbytes(dtype, shape), i

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        got = {n: rest[n] for n in names if n in rest}
        for i in sorted({owner[n] for n in names if n in owner}):
            part = work.read_layer(i, [n for n in names if owner.get(n) == i])
            got.update({n: export_tensor(t) for n, t in part.items()})
        return got

    return write_checkpoint(model, tok, out, sizes, read, report, force,
                            max_shard_bytes or SHARD_BYTES)


def check_stream_format(fmt: str) -> None:
    """--stream writes the native format only (one line otherwise)."""
    from quantsink.weights.compressed_tensors import FORMATS

    check(fmt == FORMATS[0], f"--stream writes the {FORMATS[0]} format only; allowed: --format "
                             f"{FORMATS[0]}, or --format {fmt} without --stream")


def _refuse_unsupported(model: nn.Module, recipe: Any) -> None:
    from quantsink.weights.api import check_model_layout

    w = recipe.weights
    check(w is not None, f"recipe {recipe.name!r} has no weights section, so --stream has "
                         "nothing to quantize layer by layer; allowed: a weights recipe")
    check(not w.scale_search, f"recipe {recipe.name!r} asks for weights.scale_search, which --stream "
                              "does not run yet; allowed: quantize without --stream, or scale_search: false")
    plans = check_model_layout(model, recipe)  # names and shapes only: the meta skeleton is enough
    check(not any(p.experts for p in plans),
          f"{type(model).__name__} has MoE experts, which --stream does not quantize yet; allowed: "
          "quantize without --stream")


def quantize_streaming(model_dir: str | Path, recipe: Any, out: str | Path, calib: Any = None,
                       calibration: Any = None, *, samples: int | None = None,
                       seq_len: int | None = None, seed: int | None = None, resume: bool = False,
                       force: bool = False, device: str = "cpu", progress: bool = True,
                       format: str = "quantsink", max_shard_bytes: int | None = None
                       ) -> tuple[Path, dict]:
    """Quantize the checkpoint in ``model_dir`` layer by layer from disk and write ``out``.

    The arguments are :func:`quantsink.quantize`'s (``calib``: windows ``[N, L]`` or a text
    path / dataset name, tokenized with the model's tokenizer); ``resume`` continues the run
    left in ``<out>.partial`` (see :mod:`quantsink.weights.resume`); ``device="cuda"`` runs
    the calibration and quantization of the current layer on the GPU; ``max_shard_bytes`` as in
    :func:`quantsink.export`. Returns ``(out, report)``. Side effect: the process keeps a fixed
    glibc mmap threshold (:func:`~quantsink.weights.runtime.fixed_mmap_threshold`).
    """
    from quantsink.config import load_recipe
    from quantsink.models import load_tokenizer
    from quantsink.weights.api import _windows
    from quantsink.weights.compressed_tensors import recipe_for_format
    from quantsink.weights.shards import check_out_dir
    from quantsink.weights.runtime import fixed_mmap_threshold
    from quantsink.weights.summary import build_report

    check_stream_format(format)
    recipe = recipe_for_format(load_recipe(recipe), format, False, False)
    out, dev, path = check_out_dir(out, force), check_device(device), stream_source(model_dir)
    tok, reader, model = load_tokenizer(path), lazy.CheckpointReader(path), lazy.build_skeleton(path)
    _refuse_unsupported(model, recipe)
    windows = _windows(model, calib, tok, recipe, samples, seq_len, seed)
    n_layers = len(decoder_layers(model)[1])
    manifest = manifest_for(lazy.weights_fingerprint(path), recipe, format, windows, calibration,
                            str(dev), n_layers)
    work = WorkDir.open(work_dir_for(out), manifest, resume, force)  # nothing written before this
    work.create()
    reader.on_read = weights = WeightCheck(work, path)
    prefix = decoder_layers(model)[0]
    weights.verify(reader, [f"{prefix}.{i}." for i in range(work.finished(n_layers))])
    fixed_mmap_threshold()  # freed layers go back to the OS, whatever their size
    with torch.no_grad():
        _quantize_streamed(model, recipe, windows, calibration, tok, reader, work, progress, dev)
    report = build_report(model, recipe)
    final = _write(model, tok, out, report, force, work, max_shard_bytes)
    work.remove()
    return final, report
