"""Writing a quantized model as a compressed-tensors ``pack-quantized`` checkpoint.

The writer takes integer weight grids (:class:`Grid`: codes, scales, zero points, bits, group
size, symmetric), not ``QuantLinear`` modules, so any quantizer can feed it: GPTQ, RTN, or
weights that an AWQ-style search rescaled (and whose inverse scales it folded into the
preceding norm, which then travels as an ordinary tensor of the model) before quantizing.
:func:`model_grids` reads the grids of a model quantized by ``quantize(format=
"compressed-tensors")``. Layout of ``out/`` (see :mod:`quantsink.weights.compressed_tensors`
for the tensors):

- ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``: packed Linear
  layers (``weight_scale`` in float32, the checkpoint dtype, with fp16 values) and every other
  tensor in fp16 (lossless: ``quantize`` rounded them; tied weights once), as the native export;
- ``config.json``: the model config with compressed-tensors' ``quantization_config``
  (``dtype: float32``, so transformers reloads the exact fp32 model quantsink evaluated);
- ``quantsink.json``: recipe, KV-cache section and sink map (transformers and vLLM never
  read it; :func:`read_metadata` / :func:`sink_cache` do); tokenizer files,
  ``generation_config.json`` and ``quantsink_report.json``.

Staged in a temporary sibling directory and renamed into place; no timestamps, so the same
model gives byte-identical files.

Where an AWQ-style scale search plugs in: inside the sequential loop, per input group (q/k/v
after ``input_layernorm``, gate/up after ``post_attention_layernorm``, o after v, down after up),
scale the group's weight columns by ``s``, fold ``1/s`` into the preceding op (rounded to fp16
at once, since that is what gets exported and what the next layers must see), give GPTQ the
rescaled Hessian ``diag(1/s) H diag(1/s)``, then quantize as now. The result is still a
``QuantLinear`` without outliers (so a :class:`Grid`) plus modified ordinary tensors, which
this writer already stores: nothing here changes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsink._fs import staged_dir
from quantsink.errors import QuantsinkError, check
from quantsink.weights.compressed_tensors import COMPRESSED_TENSORS, quantization_config
from quantsink.weights.pack import pack_codes, unpack_codes
from quantsink.weights.rtn import dequantize_codes
from quantsink.weights.shards import SHARD_BYTES, check_out_dir, checkpoint_tensors, write_shards

METADATA_FILE = "quantsink.json"
METADATA_VERSION = 1


@dataclass
class Grid:
    """One Linear layer on an integer grid: value = ``(codes - zero) * scale`` per group."""

    codes: torch.Tensor  # uint8 [out, in], 0 .. 2**bits - 1
    scale: torch.Tensor  # [out, in / group_size], values on the fp16 grid
    zero: torch.Tensor  # [out, in / group_size], integers 0 .. 2**bits - 1 (2**(bits-1) if symmetric)
    bits: int
    group_size: int
    symmetric: bool

    def check(self, name: str) -> None:
        """One-line error unless the grid fits the pack-quantized format."""
        out, n = self.codes.shape
        check(n % self.group_size == 0, f"{name}: in_features={n} is not a multiple of group_size="
                                        f"{self.group_size}; {COMPRESSED_TENSORS} needs whole groups")
        g = (out, n // self.group_size)
        check(tuple(self.scale.shape) == g and tuple(self.zero.shape) == g,
              f"{name}: scale/zero shapes {tuple(self.scale.shape)}/{tuple(self.zero.shape)}, expected {g}")
        z = self.zero.float()
        check(bool((z == z.round()).all()) and 0 <= float(z.min()) and float(z.max()) < 2 ** self.bits,
              f"{name}: zero points must be integers in 0..{2 ** self.bits - 1}")
        check(not self.symmetric or bool((z == 2 ** (self.bits - 1)).all()),
              f"{name}: a symmetric grid must have every zero point at {2 ** (self.bits - 1)}")

    def dequantize(self) -> torch.Tensor:
        """The weight ``[out, in]`` in float32."""
        return dequantize_codes(self.codes, self.scale.float(), self.zero.float(), self.group_size)


def pack_grid(grid: Grid, scale_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tensors one Linear stores (local names), exactly as compressed-tensors packs them.

    ``weight_scale`` is stored in the checkpoint's dtype (compressed-tensors keeps scales in
    the model dtype; readers that dequantize in the scale's dtype stay exact); its values are
    on the fp16 grid, so vLLM's cast to fp16 is exact too.
    """
    out, n = grid.codes.shape
    tensors = {"weight_packed": pack_codes(grid.codes, grid.bits),  # [out, n*bits/32] int32
               "weight_scale": grid.scale.to(scale_dtype).contiguous(),  # [out, n/g]
               "weight_shape": torch.tensor([out, n], dtype=torch.int64)}
    if not grid.symmetric:  # packed along the output dim: [ceil(out*bits/32), n/g] int32
        tensors["weight_zero_point"] = pack_codes(grid.zero.T.to(torch.uint8), grid.bits).T.contiguous()
    return tensors


def _weights_section(model: nn.Module) -> dict:
    qc = getattr(model.config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else {})
    return qc.get("weights") or {}


def model_grids(model: nn.Module) -> dict[str, Grid]:
    """The :class:`Grid` of every ``QuantLinear`` of a model quantized by ``quantize``."""
    from quantsink.weights.linear import QuantLinear

    symmetric = bool(_weights_section(model).get("symmetric", False))
    grids = {}
    for name, q in model.named_modules():
        if not isinstance(q, QuantLinear):
            continue
        check(q.n_outliers == 0, f"{name} keeps {q.n_outliers} fp16 outlier input channels, which "
                                 f"{COMPRESSED_TENSORS} cannot store; allowed: a model quantized with "
                                 f"format={COMPRESSED_TENSORS!r} (--format {COMPRESSED_TENSORS})")
        codes = unpack_codes(q.weight_packed, q.bits, q.in_features)
        grids[name] = Grid(codes, q.weight_scale, q.weight_zero_point, q.bits, q.group_size, symmetric)
    check(bool(grids), f"the model has no quantized Linear layers; {COMPRESSED_TENSORS} export needs "
                       "a model quantized by quantsink.quantize with a weights section")
    return grids


def checkpoint_dict(model: nn.Module, grids: dict[str, Grid]) -> dict[str, torch.Tensor]:
    """All tensors to save: the model's own (fp16, ties once) with each grid's Linear packed."""
    tensors = checkpoint_tensors(model)
    for name, grid in grids.items():
        for key in [k for k in tensors if k.startswith(name + ".") and k != name + ".bias"]:
            del tensors[key]
        tensors.update({f"{name}.{k}": v for k, v in pack_grid(grid).items()})
    return tensors


def config_dict(model: nn.Module, grids: dict[str, Grid]) -> dict:
    """config.json: the model config carrying the compressed-tensors ``quantization_config``."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    layers = {n: (g.bits, g.group_size, g.symmetric) for n, g in grids.items()}
    cfg = model.config.to_dict()
    cfg.pop("transformers_version", None)
    cfg["dtype"] = "float32"  # loads back as the fp32 model quantsink evaluated
    act_order = bool(_weights_section(model).get("act_order", False))
    cfg["quantization_config"] = quantization_config(layers, [n for n in linears if n not in grids],
                                                     linears + list(grids), act_order)
    return cfg


def metadata(model: nn.Module, grids: dict[str, Grid]) -> dict:
    """``quantsink.json``: what compressed-tensors has no place for (KV recipe, sink map)."""
    qc = getattr(model.config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else {})
    sizes: dict[str, int] = {}
    for g in grids.values():
        sizes[str(g.group_size)] = sizes.get(str(g.group_size), 0) + 1
    return {"metadata_version": METADATA_VERSION, "format": COMPRESSED_TENSORS,
            "recipe": qc.get("recipe"), "weights": qc.get("weights"), "kv_cache": qc.get("kv_cache"),
            "sink_map": qc.get("sink_map"), "layers_per_group_size": sizes}


def _dump(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def export_compressed(model: nn.Module, tokenizer: Any, out: str | Path, report: dict | None = None,
                      force: bool = False, max_shard_bytes: int | None = None,
                      grids: dict[str, Grid] | None = None) -> Path:
    """Write ``model`` as a compressed-tensors pack-quantized checkpoint directory ``out``.

    ``grids`` (Linear name -> :class:`Grid`) default to :func:`model_grids`; every grid is
    checked before anything is written. Refuses an existing ``out`` unless ``force``.
    """
    out = check_out_dir(out, force)
    grids = model_grids(model) if grids is None else grids
    for name, grid in grids.items():
        grid.check(name)
    tensors, cfg = checkpoint_dict(model, grids), config_dict(model, grids)
    try:
        with staged_dir(out) as tmp:
            total = write_shards(tensors, tmp, max_shard_bytes or SHARD_BYTES)
            _dump(cfg, tmp / "config.json")
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                g = gen.to_dict()
                g.pop("transformers_version", None)
                _dump(g, tmp / "generation_config.json")
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            _dump(metadata(model, grids), tmp / METADATA_FILE)
            _dump({"checkpoint_tensor_bytes": total, "format": COMPRESSED_TENSORS, **(report or {})},
                  tmp / "quantsink_report.json")
    except OSError as exc:
        raise QuantsinkError(f"writing the checkpoint to {str(out)!r} failed ({exc}); nothing was "
                             "written; allowed: a writable location with enough free space") from None
    return out


def read_metadata(path: str | Path) -> dict:
    """The ``quantsink.json`` of a compressed-tensors checkpoint written by quantsink."""
    f = Path(path) / METADATA_FILE
    check(f.is_file(), f"{str(path)!r} has no {METADATA_FILE}; allowed: a directory written by "
                       f"quantsink quantize --format {COMPRESSED_TENSORS}")
    meta = json.loads(f.read_text())
    check(meta.get("metadata_version") == METADATA_VERSION,
          f"{METADATA_FILE} version {meta.get('metadata_version')!r} is not supported; "
          f"allowed: {METADATA_VERSION}")
    return meta


def sink_cache(model: nn.Module, path: str | Path) -> Any:
    """The checkpoint's sink-aware ``SinkQuantCache`` for ``model`` (loaded by transformers)."""
    from quantsink.calibration import SinkMap
    from quantsink.config import from_dict
    from quantsink.kv.cache import SinkQuantCache
    from quantsink.kv.config import KVConfig

    meta = read_metadata(path)
    check(bool(meta.get("kv_cache")), f"{str(path)!r} was written from a recipe without a kv_cache "
                                      "section; allowed: a recipe with one (e.g. int4-sink)")
    kv = from_dict(KVConfig, meta["kv_cache"], f"{METADATA_FILE}.kv_cache")
    sink_map = SinkMap.from_dict(meta["sink_map"]) if meta.get("sink_map") else None
    return SinkQuantCache.from_recipe(model, kv, sink_map=sink_map)
