"""`to_hf`: a zoo CausalLM whose layers transformers can run (vanilla / GQA) as a transformers model."""
from __future__ import annotations

from typing import Any

import torch

from ..config import head_dim_of, layer_specs
from ..variant_registry import resolved_params
from .errors import ConversionError, require_transformers
from .weights import zoo_to_gpt2, zoo_to_llama

EXPORTABLE = ("vanilla", "gqa")
_GPT2_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu"}


def _attention(m: dict) -> dict[str, Any]:
    """The one attention every layer runs, resolved; ConversionError if a layer differs or is not exportable."""
    specs = layer_specs(m)
    resolved = [(s.variant, resolved_params(s.variant, s.params)) for s in specs]
    for (variant, params), spec in zip(resolved, specs):
        if variant not in EXPORTABLE:
            raise ConversionError(f"layer {spec.index} runs variant {variant!r}: transformers has no such attention; "
                                  f"to_hf exports {', '.join(EXPORTABLE)} (run other variants with the zoo, or inside "
                                  "transformers through attention_zoo.hf.register())")
        if params.get("qk_norm"):
            raise ConversionError(f"layer {spec.index}: qk_norm is not part of Llama, Qwen2 or GPT-2")
    kv = {(p.get("kv_heads") or m["heads"], bool(p.get("qkv_bias")), bool(p.get("out_bias"))) for _, p in resolved}
    if len(kv) != 1:
        raise ConversionError(f"layers differ in kv_heads / qkv_bias / out_bias {sorted(kv)}: transformers configs "
                              "give every layer the same attention")
    kv_heads, qkv_bias, out_bias = kv.pop()
    return {"kv_heads": kv_heads, "qkv_bias": qkv_bias, "out_bias": out_bias}


def hf_config(model: torch.nn.Module) -> Any:
    """The transformers config (LlamaConfig, Qwen2Config or GPT2Config) of a zoo model; ConversionError if none fits."""
    transformers = require_transformers()
    if getattr(model, "config", None) is None:
        raise ConversionError("to_hf needs a model built from a config (build_model, load_model or from_hf)")
    m = model.config["model"]
    a = _attention(m)
    head_dim = head_dim_of(m)
    hidden = model.blocks[0].mlp.down.in_features  # the MLP's resolved width (mlp_hidden may be null)
    stack = (m["position"], m["norm"], m["mlp"])
    # no special tokens: the config classes' defaults (Llama bos 1 / eos 2, GPT-2 50256) would be invented ones that
    # transformers' generate stops at; export-hf sets those of the checkpoint's generation_config.json
    common = dict(vocab_size=m["vocab_size"], tie_word_embeddings=m["tie_embeddings"], bos_token_id=None,
                  eos_token_id=None, pad_token_id=None)
    if stack == ("rope", "rmsnorm", "swiglu"):
        llama = dict(hidden_size=m["dim"], intermediate_size=hidden, num_hidden_layers=m["depth"],
                     num_attention_heads=m["heads"], num_key_value_heads=a["kv_heads"], head_dim=head_dim,
                     max_position_embeddings=m["max_seq_len"], rms_norm_eps=m["norm_eps"], hidden_act="silu",
                     rope_parameters={"rope_type": "default", "rope_theta": m["rope_theta"]}, **common)
        if a["qkv_bias"] and not a["out_bias"]:  # Qwen2: biases on q, k, v only, none in the MLP
            if m["mlp_bias"]:
                raise ConversionError("model.attention.qkv_bias without out_bias is Qwen2, which has no MLP bias: "
                                      "model.mlp_bias must be false")
            # Qwen2Config declares no head_dim, but keeps it as an attribute (saved in config.json) and Qwen2's
            # attention and rotary embedding read it, as the import does
            return transformers.Qwen2Config(**llama)
        if a["qkv_bias"] != a["out_bias"]:
            raise ConversionError("model.attention.out_bias without qkv_bias: Llama's attention_bias covers q, k, v "
                                  "and o together")
        return transformers.LlamaConfig(attention_bias=a["qkv_bias"], mlp_bias=m["mlp_bias"], **llama)
    if stack[:2] == ("learned", "layernorm") and m["mlp"] in _GPT2_ACTIVATION:
        unset = [key for key, value in (("model.attention.qkv_bias", a["qkv_bias"]),
                                        ("model.attention.out_bias", a["out_bias"]), ("model.mlp_bias", m["mlp_bias"]))
                 if not value]
        if unset:
            raise ConversionError("GPT-2 has biases on q, k, v, the output and the MLP; this model has none where "
                                  f"{' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} false (train it with "
                                  "them true to export it as GPT-2)")
        if a["kv_heads"] != m["heads"] or head_dim * m["heads"] != m["dim"]:
            raise ConversionError("GPT-2 has one kv head per query head and head_dim * heads == dim")
        return transformers.GPT2Config(n_embd=m["dim"], n_layer=m["depth"], n_head=m["heads"], n_inner=hidden,
                                       n_positions=m["max_seq_len"], layer_norm_epsilon=m["norm_eps"],
                                       activation_function=_GPT2_ACTIVATION[m["mlp"]], resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0, **common)
    raise ConversionError(f"stack position={stack[0]}, norm={stack[1]}, mlp={stack[2]} has no transformers "
                          "counterpart; exportable: rope + rmsnorm + swiglu (Llama, Qwen2), learned + layernorm + "
                          "gelu_tanh or gelu with biases (GPT-2)")


def to_hf(model: torch.nn.Module) -> Any:
    """The zoo model as a transformers LlamaForCausalLM, Qwen2ForCausalLM or GPT2LMHeadModel (float32, eval).

    Only vanilla / gqa layers, all alike, on a stack transformers has: rope + rmsnorm + swiglu -> Llama (Qwen2
    when q/k/v have biases and the output has none), learned + layernorm + gelu_tanh / gelu with biases ->
    GPT-2. Raises ConversionError naming what does not fit. Logits equal the zoo model's up to rounding.
    """
    transformers = require_transformers()
    config = hf_config(model)
    m = model.config["model"]
    state = {k: v.detach().to(torch.float32).cpu() for k, v in model.state_dict().items()}
    if config.model_type == "gpt2":
        hf = transformers.GPT2LMHeadModel(config)
        mapped = zoo_to_gpt2(state, m["depth"])
    else:
        cls = transformers.Qwen2ForCausalLM if config.model_type == "qwen2" else transformers.LlamaForCausalLM
        hf = cls(config)
        a = _attention(m)
        mapped = zoo_to_llama(state, m["depth"], a["kv_heads"], head_dim_of(m))
    hf = hf.float()
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and m["tie_embeddings"])]
    if missing or unexpected:
        raise ConversionError(f"weights do not line up with {type(hf).__name__} (missing {missing}, unexpected {unexpected})")
    if m["tie_embeddings"]:
        hf.tie_weights()
    return hf.eval()


__all__ = ["to_hf", "hf_config", "EXPORTABLE"]
