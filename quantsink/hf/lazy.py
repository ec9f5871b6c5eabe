"""A model whose weights stay on disk: a meta-device skeleton filled one module at a time.

:func:`build_skeleton` builds a ``*ForCausalLM`` from a Hugging Face directory's
``config.json`` with every parameter on the meta device (buffers such as RoPE's ``inv_freq``
are computed as usual); :class:`CheckpointReader` reads single tensors from the directory's
safetensors files (each read opens the file, copies the tensors out and closes it, so no
mapping keeps the checkpoint's pages resident); :func:`materialize` fills a module's meta
tensors from the checkpoint (floating tensors cast to float32, as ``load_model`` loads them)
and :func:`release` sends them back to the meta device. :func:`streamed_forward` does both
around every decoder-layer call, so that a full forward holds one layer at a time.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from quantsink.errors import check
from quantsink.hf.arch import decoder_layers, text_config
from quantsink.io import check_safetensors, read_json


class CheckpointReader:
    """Tensor name -> safetensors file of a Hugging Face directory; reads tensors on demand."""

    def __init__(self, path: str | Path,
                 on_read: Callable[[str, torch.Tensor], None] | None = None) -> None:
        self.path, self.on_read = Path(path), on_read  # on_read(name, tensor): after each read
        files = sorted(self.path.glob("*.safetensors"))
        check(bool(files), f"--stream reads safetensors weights; {str(self.path)!r} has none; allowed: "
                           "a Hugging Face directory with *.safetensors")
        self.files = files
        self.where: dict[str, Path] = {}
        for f in files:
            header = check_safetensors(f, "model weights")
            for name in header:
                if name != "__metadata__":
                    self.where[name] = f

    def has(self, name: str) -> bool:
        return name in self.where

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors (copies; the files are closed again), each passed to ``on_read``."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.where][:1]
        check(not missing, f"checkpoint {str(self.path)!r} has no tensor {missing!r} (the model "
                           "built from its config.json expects it); allowed: a checkpoint saved by "
                           "transformers for this architecture, or quantize without --stream")
        out: dict[str, torch.Tensor] = {}
        for n in names:  # one mapping per tensor: its pages are dropped as soon as it is copied
            with safe_open(str(self.where[n]), framework="pt") as handle:
                out[n] = handle.get_tensor(n).clone()
            if self.on_read is not None:
                self.on_read(n, out[n])
        return out

    def names(self, prefix: str = "") -> list[str]:
        """The checkpoint's tensor names that start with ``prefix``."""
        return sorted(n for n in self.where if n.startswith(prefix))


def build_skeleton(path: str | Path) -> nn.Module:
    """The ``*ForCausalLM`` of ``path/config.json`` on the meta device (float32, eval mode)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    check(isinstance(read_json(path / "config.json", "model config", "a Hugging Face config.json"),
                     dict), f"model config {str(path / 'config.json')!r} is not a JSON object")
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.name_or_path = str(path)
    model.config._name_or_path = str(path)
    return model.eval()


def _slots(module: nn.Module) -> list[tuple[str, nn.Module, str, torch.Tensor]]:
    """``(state-dict name, owner, attribute, tensor)`` of every parameter and persistent buffer."""
    keys = set(module.state_dict(keep_vars=True))
    out = []
    for mname, mod in module.named_modules(remove_duplicate=False):
        for kind in ("_parameters", "_buffers"):
            for attr, t in getattr(mod, kind).items():
                name = f"{mname}.{attr}" if mname else attr
                if t is not None and name in keys:
                    out.append((name, mod, attr, t))
    return out


def assign(owner: nn.Module, attr: str, tensor: torch.Tensor) -> None:
    """Set ``owner.<attr>`` (a parameter or a buffer) to ``tensor``."""
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor


def fill(module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor],
         device: str | torch.device = "cpu", skip: tuple[str, ...] = (), cast: bool = False) -> None:
    """Replace every meta tensor of ``module`` by ``tensors[prefix + state-dict name]`` on
    ``device`` (``cast``: floating tensors become float32). Names starting with one of
    ``skip`` are left alone; a missing name is one line."""
    for name, owner, attr, _ in meta_slots(module, skip):
        check(prefix + name in tensors, f"no tensor {prefix + name!r} to fill the model with")
        t = tensors.pop(prefix + name)
        assign(owner, attr, (t.float() if cast and t.is_floating_point() else t).to(device))


def meta_slots(module: nn.Module, skip: tuple[str, ...] = ()) -> list[tuple]:
    """The :func:`_slots` still on the meta device (names starting with ``skip`` left out)."""
    return [s for s in _slots(module) if s[3].device.type == "meta" and not s[0].startswith(skip)]


def materialize(module: nn.Module, prefix: str, reader: CheckpointReader,
                device: str | torch.device = "cpu", skip: tuple[str, ...] = ()) -> None:
    """Fill every meta tensor of ``module`` from ``reader`` (name ``prefix + state-dict name``);
    floating tensors become float32, as ``load_model`` loads them."""
    names = [prefix + s[0] for s in meta_slots(module, skip)]
    fill(module, prefix, reader.read(names), device, skip, cast=True)


def release(module: nn.Module) -> None:
    """Send every parameter and persistent buffer of ``module`` back to the meta device."""
    for _, owner, attr, t in _slots(module):
        if t.device.type != "meta":
            assign(owner, attr, torch.empty_like(t, device="meta"))
    for mod in module.modules():
        if hasattr(mod, "_plan"):
            mod._plan = None  # QuantLinear's derived kernel data


def _head(model: nn.Module) -> tuple[str | None, bool]:
    """(module name of the lm_head, whether it is tied to the input embedding)."""
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    return name, name is not None and bool(getattr(text_config(model), "tie_word_embeddings", False))


def materialize_rest(model: nn.Module, reader: CheckpointReader, device: str | torch.device = "cpu",
                     with_head: bool = True) -> None:
    """Everything outside the decoder layers (embeddings, final norm, lm_head) from ``reader``;
    a tied lm_head (``tie_word_embeddings``) shares the embedding's weight, as when loading.
    ``with_head=False`` leaves an untied lm_head on the meta device (:func:`materialize_head`
    reads it later: the calibration and layer passes never run it)."""
    prefix, _ = decoder_layers(model)
    head_name, tied = _head(model)
    skip = (prefix + ".",) + ((f"{head_name}.",) if tied or not with_head else ())
    materialize(model, "", reader, device, skip)
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


def materialize_head(model: nn.Module, reader: CheckpointReader, device: str | torch.device = "cpu") -> None:
    """Read an lm_head left out by ``materialize_rest(with_head=False)`` (no-op otherwise)."""
    head_name, tied = _head(model)
    if head_name is not None and not tied:
        materialize(model.get_submodule(head_name), f"{head_name}.", reader, device)


def streamable_embedding(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, module)]`` of an input embedding that can be read on demand (a plain, untied
    ``nn.Embedding``; it runs once per forward), else ``[]``."""
    emb = model.get_input_embeddings()
    head_name, tied = _head(model)
    if type(emb) is not nn.Embedding or tied:
        return []
    return [(next(n for n, m in model.named_modules() if m is emb), emb)]


def materialize_missing(model: nn.Module, reader: CheckpointReader,
                        device: str | torch.device = "cpu") -> None:
    """Read whatever is still on the meta device outside the decoder layers (a streamed
    embedding, a float lm_head), e.g. before writing the checkpoint."""
    prefix, _ = decoder_layers(model)
    head_name, tied = _head(model)
    materialize(model, "", reader, device, (prefix + ".",) + ((f"{head_name}.",) if tied else ()))


@contextmanager
def streamed_modules(modules: list[tuple[str, nn.Module]], reader: CheckpointReader,
                     device: str | torch.device = "cpu",
                     on_release: Callable[[], None] | None = None) -> Iterator[None]:
    """Each ``(name, module)`` is read from disk just before it runs and released right after
    (then ``on_release()`` runs, e.g. to hand the freed heap back to the OS); re-entrant calls
    read nothing more."""
    depth = [0] * len(modules)

    def pre(i: int, prefix: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if depth[i] == 0:
                materialize(module, prefix, reader, device)
            depth[i] += 1
        return hook

    def post(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            depth[i] -= 1
            if depth[i] == 0:
                release(module)
                if on_release is not None:
                    on_release()
        return hook

    handles = []
    for i, (name, mod) in enumerate(modules):
        handles.append(mod.register_forward_pre_hook(pre(i, f"{name}."), with_kwargs=True, prepend=True))
        handles.append(mod.register_forward_hook(post(i), with_kwargs=True, prepend=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for _, mod in modules:
            release(mod)


def streamed_forward(model: nn.Module, reader: CheckpointReader, device: str | torch.device = "cpu",
                     on_release: Callable[[], None] | None = None,
                     extra: list[tuple[str, nn.Module]] = ()) -> Any:
    """:func:`streamed_modules` over every decoder layer (and the ``extra`` modules)."""
    prefix, layers = decoder_layers(model)
    pairs = [*extra, *((f"{prefix}.{i}", layer) for i, layer in enumerate(layers))]
    return streamed_modules(pairs, reader, device, on_release)


def weights_fingerprint(path: str | Path) -> dict:
    """What identifies a checkpoint cheaply: its config bytes and each weight file's name,
    size and header (tensor names, dtypes, shapes, offsets)."""
    import hashlib

    path = Path(path)
    files = []
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = fh.read(n)
        files.append([f.name, f.stat().st_size, hashlib.sha256(header).hexdigest()])
    config = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
    return json.loads(json.dumps({"config_sha256": config, "weights": files}))
