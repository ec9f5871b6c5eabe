"""Tiny random-init decoders of every supported family (no downloads), for the matrix tests.

``build(name)`` returns an fp32 model in eval mode; ``ARCHS`` lists the supported families
(Falcon where this transformers routes its attention through the AttentionInterface),
``REFUSED`` the ones quantsink refuses with one line (and what the line says), ``MOE_EXTRA`` more MoE families
(Qwen3-MoE, Qwen2-MoE, Mixtral: concatenated gate/up experts stored ``[E, out, in]``). Every model has hidden 64, 4 query
and 2 KV heads, ``initializer_range=0.1`` (so attention is far from uniform) and a sliding
window of 40 tokens where the family has one (shorter than the 96-token test sequences,
longer than a 16-token fp16 window plus a 16-token key group, so that sliding layers attend
to quantized tokens).
"""
from __future__ import annotations

import functools

import torch

VOCAB = 128
WINDOW = 40  # sliding window: shorter than the test sequences, longer than a window + group of 16
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _configs() -> dict:
    import transformers as T

    return {
        "llama": lambda: T.LlamaConfig(num_hidden_layers=2, **COMMON),
        "qwen2": lambda: T.Qwen2Config(num_hidden_layers=2, **COMMON),
        "qwen3": lambda: T.Qwen3Config(num_hidden_layers=2, head_dim=16, **COMMON),
        "mistral": lambda: T.MistralConfig(num_hidden_layers=2, sliding_window=WINDOW, **COMMON),
        "gemma2": lambda: T.Gemma2Config(num_hidden_layers=2, head_dim=16, sliding_window=WINDOW,
                                         attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
                                         **COMMON),
        "gemma3": lambda: T.Gemma3TextConfig(num_hidden_layers=6, head_dim=16, sliding_window=WINDOW,
                                             **COMMON),
        "phi3": lambda: T.Phi3Config(num_hidden_layers=2, **COMMON),
        "olmo2": lambda: T.Olmo2Config(num_hidden_layers=2, **COMMON),
        "gpt_oss": lambda: T.GptOssConfig(num_hidden_layers=2, head_dim=16, sliding_window=WINDOW,
                                          num_local_experts=4, num_experts_per_tok=2,
                                          **{**COMMON, "max_position_embeddings": 131072}),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(num_hidden_layers=2, head_dim=16, num_experts=4,
                                              num_experts_per_tok=2, moe_intermediate_size=64,
                                              decoder_sparse_step=1, **COMMON),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=64, shared_expert_intermediate_size=64,
                                              decoder_sparse_step=1, **COMMON),
        "mixtral": lambda: T.MixtralConfig(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                           **COMMON),
        "cohere": lambda: T.CohereConfig(num_hidden_layers=2, logit_scale=1.0, **COMMON),
        "granite": lambda: T.GraniteConfig(num_hidden_layers=2, attention_multiplier=1 / 16, **COMMON),  # 1/head_dim, as released
        "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                                     initializer_range=0.1, bos_token_id=1, eos_token_id=2),
        "falcon": lambda: T.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, initializer_range=0.1,
                                         bos_token_id=1, eos_token_id=2),
        "falcon_alibi": lambda: T.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, initializer_range=0.1, alibi=True,
                                               bos_token_id=1, eos_token_id=2),
    }





def build(name: str, seed: int = 0, sink_logits: float = 1.5, **overrides: object) -> torch.nn.Module:
    """A tiny random-init ``*ForCausalLM`` of family ``name`` (fp32, eval).

    GPT-OSS's learned sink logits are drawn with standard deviation ``sink_logits`` (they
    start at zero), so that they change the softmax. ``overrides`` set config fields.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _configs()[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    # Gemma 2's softcap needs eager attention (transformers 5.17's default sdpa silently drops it)
    impl = {"attn_implementation": "eager"} if name == "gemma2" else {}
    model = AutoModelForCausalLM.from_config(config, **impl).eval()
    for module in model.modules():
        sinks = getattr(module, "sinks", None)
        if isinstance(sinks, torch.nn.Parameter):
            with torch.no_grad():
                sinks.copy_(torch.randn_like(sinks) * sink_logits)
    return model


def token_ids(length: int = 96, batch: int = 1, seed: int = 1) -> torch.Tensor:
    """Random token ids ``[batch, length]`` that avoid the special ids 0-2."""
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def cache_kwargs(model: torch.nn.Module, cache: object) -> dict:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``: what this transformers expects."""
    from quantsink.hf.forward import cache_kwargs as kwargs

    return kwargs(model, cache)


def char_tokenizer():
    """A character-level tokenizer whose ids fit ``VOCAB`` (printable ASCII and newline; specials 0-3)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def save(model: "torch.nn.Module | str", path, **build_kwargs: object) -> torch.nn.Module:
    """Save ``model`` (or a new tiny model of family ``model``) with :func:`char_tokenizer` as a
    Hugging Face directory; returns the model."""
    if isinstance(model, str):
        model = build(model, **build_kwargs)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return model


@functools.cache
def falcon_routes() -> bool:
    """Whether this transformers routes Falcon's attention through the AttentionInterface (5.25 does)."""
    from quantsink.errors import QuantsinkError
    from quantsink.hf.support import check_supported

    try:
        check_supported(build("falcon"))
    except QuantsinkError:
        return False
    return True


ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "olmo2", "gpt_oss",
         "cohere", "granite") + (("falcon",) if falcon_routes() else ())
# refused with one line: what the line says
REFUSED = {"gpt2": "Conv1D", "falcon_alibi": "uses ALiBi", **({} if falcon_routes() else
                                                               {"falcon": "does not route its attention"})}
UNSUPPORTED = tuple(REFUSED)
REFUSED_FALCON = "falcon_alibi" if falcon_routes() else "falcon"  # a Falcon this transformers refuses
MOE_EXTRA = ("qwen3_moe", "qwen2_moe", "mixtral")  # concatenated gate/up [E, out, in]; Qwen2-MoE
# adds a shared expert (Linear layers) behind a Linear gate [1, H]
