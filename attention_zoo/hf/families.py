"""The transformers families the zoo reproduces exactly, and how their configs map onto a zoo `model:` section.

Two families cover the supported checkpoints:
- "llama": LlamaForCausalLM, MistralForCausalLM (without a sliding window), Qwen2ForCausalLM: RoPE
  (rotate-half, default type), RMSNorm, SwiGLU; Qwen2 adds biases on q, k, v; Llama's `attention_bias` puts
  biases on q, k, v and o.
- "gpt2": GPT2LMHeadModel: learned positions, LayerNorm, GELU (tanh approximation for `gelu_new`), biases
  everywhere.
Anything else, or an option that would change the computation (sliding window, rope_scaling, partial rotary,
another activation), raises ConversionError naming it: never a silently different model.
"""
from __future__ import annotations

from typing import Any

from .errors import ConversionError

LLAMA_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
GPT2_TYPES = {"gpt2": "GPT2LMHeadModel"}
SUPPORTED = "LlamaForCausalLM, MistralForCausalLM (sliding_window null), Qwen2ForCausalLM, GPT2LMHeadModel"
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def family_of(config: Any) -> str:
    """'llama' or 'gpt2' for a transformers config; ConversionError for any other architecture."""
    model_type = getattr(config, "model_type", None)
    if model_type in LLAMA_TYPES:
        return "llama"
    if model_type in GPT2_TYPES:
        return "gpt2"
    archs = ", ".join(getattr(config, "architectures", None) or []) or f"model_type {model_type!r}"
    raise ConversionError(f"unsupported architecture {archs}; the zoo imports {SUPPORTED}")


def causal_lm_class(config: Any) -> str:
    """The transformers class name of a supported config's causal LM ('LlamaForCausalLM', 'GPT2LMHeadModel', ...)."""
    family_of(config)
    return {**LLAMA_TYPES, **GPT2_TYPES}[config.model_type]


def _refuse(config: Any, what: str, value: Any, why: str) -> None:
    name = type(config).__name__
    raise ConversionError(f"{name}.{what} = {value!r}: {why}; the zoo cannot reproduce this model exactly")


def rope_theta(config: Any) -> float:
    """The RoPE base of a Llama-family config; ConversionError for any rope type but the default."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if scaling and not params:  # older configs keep scaling apart from the theta
        params = dict(scaling)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        _refuse(config, "rope_parameters.rope_type", rope_type, "only the default RoPE (no scaling) is implemented")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _llama_checks(config: Any) -> None:
    # Qwen2 slides only in the layers its layer_types name (those from max_window_layers on, with
    # use_sliding_window): a sliding_window no layer uses changes nothing. Mistral slides in every layer.
    if getattr(config, "sliding_window", None) is not None and config.model_type != "qwen2":
        window = config.sliding_window
        _refuse(config, "sliding_window", window, "sliding-window attention is not implemented (up to "
                f"{window} tokens it is full attention: with sliding_window null in config.json the import is exact "
                f"for sequences of at most {window} tokens, not beyond)")
    layer_types = list(getattr(config, "layer_types", None) or [])
    if other := [i for i, t in enumerate(layer_types) if t != "full_attention"]:
        _refuse(config, "layer_types", sorted(set(layer_types)), f"layer{'s' if len(other) > 1 else ''} "
                f"{', '.join(map(str, other))} run{'' if len(other) > 1 else 's'} {layer_types[other[0]]!r} (sliding_window "
                f"{getattr(config, 'sliding_window', None)}); only full attention is implemented")
    if getattr(config, "hidden_act", "silu") != "silu":
        _refuse(config, "hidden_act", config.hidden_act, "the zoo's SwiGLU uses silu")
    partial = getattr(config, "partial_rotary_factor", None)
    if partial not in (None, 1, 1.0):
        _refuse(config, "partial_rotary_factor", partial, "partial rotary embeddings are not implemented")


def zoo_model_section(config: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(family, model section without `attention`, attention base params) for a supported transformers config.

    The attention params are those the checkpoint's weights need: kv_heads (as the checkpoint has it),
    qkv_bias, out_bias. Raises ConversionError for what the zoo cannot reproduce.
    """
    family = family_of(config)
    if family == "llama":
        _llama_checks(config)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if config.model_type == "qwen2":  # Qwen2: biases on q, k, v only
            qkv_bias, out_bias = True, False
        else:  # Llama / Mistral: attention_bias puts biases on q, k, v and o
            qkv_bias = out_bias = bool(getattr(config, "attention_bias", False))
        model = {"vocab_size": config.vocab_size, "dim": config.hidden_size, "depth": config.num_hidden_layers,
                 "heads": heads, "head_dim": head_dim, "max_seq_len": config.max_position_embeddings,
                 "tie_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
                 "position": "rope", "rope_theta": rope_theta(config), "norm": "rmsnorm",
                 "norm_eps": float(config.rms_norm_eps), "mlp": "swiglu", "mlp_hidden": config.intermediate_size,
                 "mlp_bias": bool(getattr(config, "mlp_bias", False))}
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return family, model, {"kv_heads": kv_heads, "qkv_bias": qkv_bias, "out_bias": out_bias}
    # GPT-2
    activation = config.activation_function
    if activation not in GPT2_ACTIVATIONS:
        _refuse(config, "activation_function", activation, f"supported: {', '.join(GPT2_ACTIVATIONS)}")
    if not getattr(config, "scale_attn_weights", True):
        _refuse(config, "scale_attn_weights", False, "the zoo always scales logits by 1/sqrt(head_dim)")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        _refuse(config, "scale_attn_by_inverse_layer_idx", True, "per-layer logit scaling is not implemented")
    if getattr(config, "add_cross_attention", False):
        _refuse(config, "add_cross_attention", True, "cross-attention is not implemented")
    model = {"vocab_size": config.vocab_size, "dim": config.n_embd, "depth": config.n_layer, "heads": config.n_head,
             "head_dim": config.n_embd // config.n_head, "max_seq_len": config.n_positions,
             "tie_embeddings": bool(getattr(config, "tie_word_embeddings", True)),
             "position": "learned", "norm": "layernorm", "norm_eps": float(config.layer_norm_epsilon),
             "mlp": GPT2_ACTIVATIONS[activation], "mlp_hidden": config.n_inner or 4 * config.n_embd, "mlp_bias": True}
    return family, model, {"kv_heads": config.n_head, "qkv_bias": True, "out_bias": True}
