"""int8 embedding / lm_head: exact rows, the bf16 product bound, ties, recipes, export + reload."""
from __future__ import annotations

import pytest
import torch
from quant_layers import BF16_U
from tiny_models import COMMON, token_ids

import quantsink
from quantsink.config import load_recipe
from quantsink.errors import QuantsinkError
from quantsink.weights import rows_ops
from quantsink.weights.backend import use_backend
from quantsink.weights.embedding import Int8Embedding, Int8LMHead, quantize_rows
from quantsink.weights.runtime import quantize_embeddings


def _tiny(tied: bool, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=2, tie_word_embeddings=tied, **COMMON)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_rows_are_exact_and_within_half_a_step() -> None:
    w = torch.randn(300, 70) * torch.rand(300, 1) * 3
    codes, scale = quantize_rows(w)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127 and scale.dtype == torch.float16
    deq = codes.float() * scale.float()[:, None]
    assert ((deq - w).abs() <= 0.5 * scale.float()[:, None] + 1e-7).all()
    emb = Int8Embedding.from_float(torch.nn.Embedding.from_pretrained(w))
    ids = torch.tensor([[0, 5, 299], [7, 7, 1]])
    assert torch.equal(emb(ids), deq[ids])  # the lookup is exact


@pytest.mark.parametrize("hidden", [64, 70])  # 70: the aten kernel needs H % 16 == 0 -> tiled
@pytest.mark.parametrize("rows", [1, rows_ops.INT8_MAX_ROWS, rows_ops.INT8_MAX_ROWS + 1])
def test_lm_head_within_bf16_bound(hidden: int, rows: int) -> None:
    head = torch.nn.Linear(hidden, 5000, bias=False)
    q = Int8LMHead.from_float(head)
    x = torch.randn(rows, hidden) * 2
    with use_backend("reference"):
        ref = q(x)
    assert torch.allclose(ref, x @ q.dequantize().T, rtol=1e-5, atol=1e-5)
    # x rounded to bf16 once, exact int8 rows, fp32 accumulation, one bf16 rounding, fp32 scale
    bound = 2 * BF16_U * (x.abs() @ q.dequantize().abs().T) * 1.01 + 1e-6
    y = q(x)
    assert ((y - ref).abs() <= bound).all()
    q.weight_scale.mul_(1.25)  # a wrong scale breaks the bound
    assert not ((q(x) - ref).abs() <= bound).all()


@pytest.mark.parametrize("rows", [1, 3, 4, rows_ops.INT8_MAX_ROWS])
def test_misaligned_views_are_safe(rows: int) -> None:
    """torch 2.13's int8pack kernel faults on unaligned x, and on unaligned weights (mmap'd
    checkpoints) from 4 rows on: those get an aligned copy first (a fault kills the run). The
    C++ int8_rows kernel reads any alignment: no copy."""
    q = Int8LMHead.from_float(torch.nn.Linear(64, 2000, bias=False))
    buf = torch.empty(q.weight_int8.numel() + 64, dtype=torch.int8)
    view = buf[8:8 + q.weight_int8.numel()].view_as(q.weight_int8)
    view.copy_(q.weight_int8)
    want = q(torch.randn(rows, 64, generator=torch.Generator().manual_seed(0)))
    q.weight_int8 = view  # as a safetensors mmap view may be
    xs = torch.randn(rows * 64 + 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    x = xs[8:].view(rows, 64)  # a bf16 input at a 16-byte offset
    x.copy_(torch.randn(rows, 64, generator=torch.Generator().manual_seed(0)).bfloat16())
    assert torch.allclose(q(x).float(), want, rtol=0.02, atol=0.05)  # (x itself rounded to bf16)
    copied = rows >= 4 and q.kernel == "int8pack[bf16]"
    assert (q.weight_int8 is view) == (not copied)  # the copy is made only when needed
    assert torch.equal(q.weight_int8, view)


def test_tied_pair_is_quantized_once() -> None:
    model = _tiny(tied=True)
    ids = token_ids(24)
    with torch.no_grad():
        before = model(ids).logits
    rows = quantize_embeddings(model, 8, 8)
    assert [r["packed_bytes"] > 0 for r in rows] == [True, False]
    assert model.lm_head.rows is model.model.embed_tokens
    assert not model.all_tied_weights_keys
    names = set(model.state_dict())
    assert "model.embed_tokens.weight_int8" in names and not any(n.startswith("lm_head") for n in names)
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() < 0.05 * before.abs().max()
    with pytest.raises(QuantsinkError, match="ties embed_tokens and lm_head"):
        quantize_embeddings(_tiny(tied=True), 8, None)


def test_untied_head_gets_its_own_rows() -> None:
    model = _tiny(tied=False)
    quantize_embeddings(model, None, 8)
    assert isinstance(model.lm_head, Int8LMHead) and model.lm_head.rows is model.lm_head
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert "lm_head.weight_int8" in model.state_dict()


def test_scaled_embeddings_keep_their_scale_and_odd_ones_are_refused() -> None:
    import tiny_models

    gemma = tiny_models.build("gemma3")  # its embedding multiplies by sqrt(hidden) in forward
    ids = torch.arange(40)[None]
    want = gemma.get_input_embeddings()(ids)
    quantize_embeddings(gemma, 8, 8)
    got = gemma.get_input_embeddings()(ids)
    assert gemma.get_input_embeddings().embed_scale == 8.0
    assert (got - want).abs().max() <= 8.0 * gemma.get_input_embeddings().weight_scale.float().max() / 2 + 1e-6
    odd = tiny_models.build("gemma3")
    odd.get_input_embeddings().scalar_embed_scale = 3.0  # says 3, multiplies by 8: not what it claims
    with pytest.raises(QuantsinkError, match="scaled by a constant"):
        quantize_embeddings(odd, 8, 8)
    with pytest.raises(QuantsinkError, match="scaled by a constant"):  # before any work: no calibration
        quantsink.quantize(odd, "int4-sink", calib=torch.zeros(1, 8, dtype=torch.long), progress=False)
    model = _tiny(tied=False)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
    with pytest.raises(QuantsinkError, match="bias-free nn.Linear"):
        quantize_embeddings(model, None, 8)


@pytest.mark.parametrize("value", [4, "8", True, 16])
def test_recipe_values_are_strict(value) -> None:
    # ints outside the allowed set are refused by the config; other types by the recipe parser
    with pytest.raises(QuantsinkError, match="embedding_bits(=.*not supported; allowed|: expected int or null)"):
        load_recipe({"name": "x", "weights": {"embedding_bits": value}})


def test_export_and_reload_through_from_pretrained(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from quantsink.weights.export import export
    from quantsink.weights.linear import QuantLinear

    model = _tiny(tied=True)
    recipe = {"name": "tiny-w4-e8", "weights": {"algorithm": "rtn", "group_size": 32,
                                                "outlier_channels": 0, "embedding_bits": 8,
                                                "lm_head_bits": 8}}
    quantsink.quantize(model, recipe, progress=False)
    out = export(model, None, tmp_path / "ckpt")
    ids = token_ids(20, batch=2)
    with torch.no_grad():
        want = model(ids).logits
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(loaded.model.embed_tokens, Int8Embedding)
    assert loaded.lm_head.rows is loaded.model.embed_tokens
    layer = loaded.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.kernel is not None  # chosen at load time
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)


def test_compiled_lm_head_matches_eager() -> None:
    q = Int8LMHead.from_float(torch.nn.Linear(64, 300, bias=False))
    x = torch.randn(2, 64)
    assert torch.equal(torch.compile(q, backend="aot_eager", fullgraph=True)(x), q(x))
