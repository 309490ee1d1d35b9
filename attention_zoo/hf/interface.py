"""`register()`: the zoo's single-layer variants as transformers attention implementations.

A stock transformers model loaded with `attn_implementation="zoo_selective"` projects, rotates and caches
q, k, v itself and hands them to the function registered here, which adds the variant's bias and calls the
zoo's backend. Only variants that need nothing beyond those tensors qualify: no parameters of their own, no
state from other layers, no steps of their own before the bias (vanilla, gqa, selective among the built-ins).

transformers builds the attention mask through `AttentionMaskInterface` under the same name; an attention
name without a mask function there would get no mask at all, so one is registered alongside (the boolean
mask sdpa uses; the zoo applies the causal mask itself and adds padding from that mask).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import Tensor

from ..variant import LayerShape, ProjectedAttention, bias_call
from ..variant_registry import check_params, get_variant, list_variants
from .errors import ConversionError, require_transformers

PREFIX = "zoo_"
CONFIG_KEY = "zoo_attention"  # optional mapping on the transformers config: the variant's parameters
# The steps transformers does itself (projections, rotation, cache, output); a variant overriding one cannot run there.
_HF_STEPS = ("forward", "project", "transform_qk", "extend_cache", "output")
_layers: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, str], ProjectedAttention]]" = weakref.WeakKeyDictionary()


def _probe(name: str) -> ProjectedAttention | None:
    """An instance of variant `name` on the meta device at a small shape (layer 1 of 2), or None if it has
    required parameters beyond kv_heads."""
    cls = get_variant(name)
    shape = LayerShape(dim=8, heads=2, head_dim=4, layer_index=1, depth=2)
    params = {"kv_heads": 1} if cls.params.get("kv_heads") is not None and cls.params["kv_heads"].required else {}
    if any(p.required and k not in params for k, p in cls.params.items()):
        return None
    with torch.device("meta"):
        return cls(shape, **params)


def runs_inside_transformers(name: str) -> bool:
    """Whether variant `name` is a bias (and/or its own `attend`) on plain projected q, k, v: no parameters
    of its own, no cross-layer state, no step transformers performs itself."""
    cls = get_variant(name)
    if not (isinstance(cls, type) and issubclass(cls, ProjectedAttention)):
        return False
    if any(getattr(cls, step) is not getattr(ProjectedAttention, step) for step in _HF_STEPS):
        return False
    try:
        layer = _probe(name)
    except Exception:  # noqa: BLE001 - a variant that cannot be built at a small shape is simply not offered
        return False
    if layer is None or layer.carry_residual or layer.reads or bias_call(layer.attention_bias, cls.__qualname__).inputs:
        return False  # transformers' attention call gives neither the layer input nor the zoo's positions
    own = {n for n, _ in layer.named_parameters()} - {f"{p}.{k}" for p in ("q_proj", "kv_proj", "out_proj")
                                                        for k in ("weight", "bias")}
    return not own


def needs_history(layer: ProjectedAttention) -> bool:
    """A bias computed from every earlier query (selective's accumulator) cannot run on a KV cache alone."""
    return type(layer).attention_bias is not ProjectedAttention.attention_bias


def _layer_for(module: torch.nn.Module, variant: str, query: Tensor, key: Tensor) -> ProjectedAttention:
    """The zoo layer (meta-device projections, never used) that computes `variant`'s bias for this module, with the
    parameters config.zoo_attention holds now (a layer per parameter set: a change after the first forward is
    read, not ignored)."""
    per_module = _layers.setdefault(module, {})
    config = getattr(module, "config", None)
    params = dict(getattr(config, CONFIG_KEY, None) or {})
    built_for = (variant, repr(sorted(params.items())))
    if built_for not in per_module:
        heads, head_dim, kv_heads = query.shape[1], query.shape[-1], key.shape[1]
        if kv_heads != heads or "kv_heads" in get_variant(variant).params and get_variant(variant).params["kv_heads"].required:
            params.setdefault("kv_heads", kv_heads)
        shape = LayerShape(heads * head_dim, heads, head_dim, getattr(module, "layer_idx", 0) or 0,
                           getattr(config, "num_hidden_layers", 1) or 1,
                           max_seq_len=getattr(config, "max_position_embeddings", None) or 1024)
        problems = check_params(variant, params, shape)
        if problems:
            raise ConversionError(f"{PREFIX}{variant}: " + "; ".join(f"{p.key} = {p.value!r}: {p.message}" for p in problems)
                                  + f" (parameters come from config.{CONFIG_KEY})")
        with torch.device("meta"):
            per_module[built_for] = get_variant(variant)(shape, **params)
    return per_module[built_for]


def attention_function(variant: str) -> Callable[..., tuple[Tensor, None]]:
    """The transformers attention function running zoo variant `variant`."""

    def zoo_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[Tensor, None]:
        """query (B, H, N, D), key / value (B, Hkv, T, D) as transformers passes them (rotated, cache included);
        attention_mask None or (B, 1, N, T) (bool: True = attend; float: additive) -> ((B, N, H, D), None).
        Raises NotImplementedError where a cache would need the variant's own state (selective's accumulator), and
        ConversionError for attention dropout (which zoo attention does not apply) rather than train without it."""
        if dropout:  # transformers passes the model's attention dropout in training mode only
            raise ConversionError(
                f"attn_implementation={PREFIX + variant!r} applies no attention dropout, and this model asks for "
                f"{dropout:g} in training mode: load it with none (GPT-2: from_pretrained(..., attn_pdrop=0.0); Llama, "
                "Qwen2, Mistral: attention_dropout=0.0) to train without it, or call model.eval()")
        layer = _layer_for(module, variant, query, key)
        if needs_history(layer) and key.shape[-2] != query.shape[-2]:
            raise NotImplementedError(
                f"attn_implementation={PREFIX + variant!r}: transformers' KV cache cannot hold {variant}'s per-key "
                f"accumulator, so cached decoding (generate) is not possible here; convert the model with "
                f"attention_zoo.hf.from_hf(model, variant={variant!r}) and generate with the zoo's cache "
                "(model.new_cache(), or `attention-zoo generate` on an import-hf checkpoint)")
        if scaling is not None:
            layer.scale = scaling
        bias, _ = layer.attention_bias(query, key, {}, None)
        if attention_mask is not None:  # padding (the causal part is applied again by the backend: harmless)
            if attention_mask.dtype == torch.bool:
                attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                    ~attention_mask, torch.finfo(query.dtype).min)
            attention_mask = attention_mask[..., : key.shape[-2]].to(query.dtype)
            bias = attention_mask if bias is None else bias + attention_mask
        out = layer.attend(query, key, value, bias)  # (B, H, N, D)
        return out.transpose(1, 2).contiguous(), None

    zoo_attention.__name__ = f"{PREFIX}{variant}"
    return zoo_attention


def register() -> list[str]:
    """Register every qualifying zoo variant as `zoo_<variant>` in transformers' AttentionInterface, with the
    sdpa mask function under the same name in AttentionMaskInterface. Returns the names registered.

    Variant parameters (e.g. selection_head) come from an optional `zoo_attention` mapping on the model's config.
    """
    require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    names = []
    for variant in list_variants():
        if runs_inside_transformers(variant):
            name = f"{PREFIX}{variant}"
            AttentionInterface.register(name, attention_function(variant))
            AttentionMaskInterface.register(name, sdpa_mask)
            names.append(name)
    return names


__all__ = ["register", "runs_inside_transformers", "attention_function", "CONFIG_KEY"]
