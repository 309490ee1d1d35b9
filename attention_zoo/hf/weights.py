"""Weight names and layouts between transformers checkpoints and the zoo's CausalLM.

The zoo keeps k and v in one fused projection, `kv_proj`, whose rows are laid out (k|v, kv_head, head_dim);
transformers' Llama keeps `k_proj` and `v_proj` apart (rows (kv_head, head_dim) each), GPT-2 one `c_attn`
Conv1D stored (in, out) with q, k, v side by side. Nothing here changes a value, only names and layouts
(and, on import, the optional kv-head pooling of the GQA paper).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .errors import ConversionError


def pool_kv_heads(weight: Tensor, kv_heads: int, new_kv_heads: int) -> Tensor:
    """Mean-pool groups of consecutive kv heads (Ainslie et al. 2023, "GQA", section 2.1).

    weight: (kv_heads * head_dim, ...) rows of a k or v projection (a weight (Hkv*D, dim) or a bias (Hkv*D,))
    -> (new_kv_heads * head_dim, ...), pooled head g the mean of heads g*r .. g*r + r - 1, r = kv_heads /
    new_kv_heads. Query head h, which read kv head h // (H / kv_heads), then reads pooled head
    h // (H / new_kv_heads): transformers' repeat_kv order. Same dtype as `weight`.
    """
    if kv_heads % new_kv_heads:
        raise ConversionError(f"kv_heads = {new_kv_heads}: must divide the checkpoint's {kv_heads} key/value heads")
    grouped = weight.unflatten(0, (new_kv_heads, kv_heads // new_kv_heads, weight.shape[0] // kv_heads))
    return grouped.mean(dim=1).flatten(0, 1)


def non_finite_weights(state: dict[str, Tensor]) -> list[str]:
    """'NAME (n values)' for each floating-point tensor of `state` holding NaN or +-inf, in state order."""
    bad = []
    for name, tensor in state.items():
        if tensor.is_floating_point() and (count := int((~torch.isfinite(tensor)).sum())):
            bad.append(f"{name} ({count} value{'s' if count > 1 else ''})")
    return bad


class Source:
    """A state dict read key by key, so what no mapping consumed can be reported (never silently dropped)."""

    def __init__(self, state: dict[str, Tensor], where: str):
        self.state, self.where, self.used = state, where, set()

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> Tensor:
        if key not in self.state:
            raise ConversionError(f"{self.where}: expected weight {key!r} is missing")
        self.used.add(key)
        return self.state[key]

    def skip(self, key: str) -> None:
        self.used.add(key)

    def check_all_used(self) -> None:
        left = sorted(k for k in self.state if k not in self.used)
        if left:
            shown = ", ".join(left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else "")
            raise ConversionError(f"{self.where} has weights the zoo has no place for: {shown}")


Pool = Callable[[Tensor], Tensor]


def llama_to_zoo(src: Source, depth: int, tied: bool, pool: Pool) -> dict[str, Tensor]:
    """Zoo state dict from a Llama / Mistral / Qwen2 state dict (`pool` applied to k and v rows)."""
    out = {"token_embedding.weight": src.take("model.embed_tokens.weight")}
    for i in range(depth):
        h, z = f"model.layers.{i}.", f"blocks.{i}."
        out[z + "norm_attn.weight"] = src.take(h + "input_layernorm.weight")
        out[z + "norm_mlp.weight"] = src.take(h + "post_attention_layernorm.weight")
        for kind in ("weight", "bias"):
            attn = h + "self_attn."
            if src.has(attn + "q_proj." + kind):
                out[z + "attention.q_proj." + kind] = src.take(attn + "q_proj." + kind)
                k, v = (pool(src.take(attn + f"{n}_proj." + kind)) for n in "kv")
                out[z + "attention.kv_proj." + kind] = torch.cat((k, v))
            if src.has(attn + "o_proj." + kind):
                out[z + "attention.out_proj." + kind] = src.take(attn + "o_proj." + kind)
            for zoo_name, hf_name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                if src.has(f"{h}mlp.{hf_name}.{kind}"):
                    out[f"{z}mlp.{zoo_name}.{kind}"] = src.take(f"{h}mlp.{hf_name}.{kind}")
    out["norm.weight"] = src.take("model.norm.weight")
    _lm_head(src, out, tied)
    return out


def gpt2_to_zoo(src: Source, depth: int, tied: bool, pool: Pool) -> dict[str, Tensor]:
    """Zoo state dict from a GPT2LMHeadModel state dict. Conv1D weights are stored (in, out): transposed."""
    out = {"token_embedding.weight": src.take("transformer.wte.weight"),
           "position_embedding.weight": src.take("transformer.wpe.weight")}
    dim = out["token_embedding.weight"].shape[1]
    for i in range(depth):
        h, z = f"transformer.h.{i}.", f"blocks.{i}."
        for zoo_norm, hf_norm in (("norm_attn", "ln_1"), ("norm_mlp", "ln_2")):
            for kind in ("weight", "bias"):
                out[f"{z}{zoo_norm}.{kind}"] = src.take(f"{h}{hf_norm}.{kind}")
        qkv_w = src.take(h + "attn.c_attn.weight").t()  # (3 * dim, dim): rows q, k, v
        qkv_b = src.take(h + "attn.c_attn.bias")
        for kind, t in (("weight", qkv_w), ("bias", qkv_b)):
            q, k, v = t.split(dim)
            out[f"{z}attention.q_proj.{kind}"] = q
            out[f"{z}attention.kv_proj.{kind}"] = torch.cat((pool(k), pool(v)))
        out[z + "attention.out_proj.weight"] = src.take(h + "attn.c_proj.weight").t()
        out[z + "attention.out_proj.bias"] = src.take(h + "attn.c_proj.bias")
        out[z + "mlp.up.weight"] = src.take(h + "mlp.c_fc.weight").t()
        out[z + "mlp.up.bias"] = src.take(h + "mlp.c_fc.bias")
        out[z + "mlp.down.weight"] = src.take(h + "mlp.c_proj.weight").t()
        out[z + "mlp.down.bias"] = src.take(h + "mlp.c_proj.bias")
    for kind in ("weight", "bias"):
        out["norm." + kind] = src.take("transformer.ln_f." + kind)
    _lm_head(src, out, tied)
    return out


def _lm_head(src: Source, out: dict[str, Tensor], tied: bool) -> None:
    if tied:  # the zoo's lm_head.weight is the embedding; a checkpoint may list the tied copy too
        src.skip("lm_head.weight")
        out["lm_head.weight"] = out["token_embedding.weight"]
    else:
        out["lm_head.weight"] = src.take("lm_head.weight")


def zoo_to_llama(state: dict[str, Tensor], depth: int, kv_heads: int, head_dim: int) -> dict[str, Tensor]:
    """Llama / Qwen2 state dict from a zoo state dict (inverse of llama_to_zoo without pooling)."""
    out = {"model.embed_tokens.weight": state["token_embedding.weight"], "model.norm.weight": state["norm.weight"],
           "lm_head.weight": state["lm_head.weight"]}
    for i in range(depth):
        h, z = f"model.layers.{i}.", f"blocks.{i}."
        out[h + "input_layernorm.weight"] = state[z + "norm_attn.weight"]
        out[h + "post_attention_layernorm.weight"] = state[z + "norm_mlp.weight"]
        for kind in ("weight", "bias"):
            if z + "attention.q_proj." + kind in state:
                out[h + "self_attn.q_proj." + kind] = state[z + "attention.q_proj." + kind]
                k, v = state[z + "attention.kv_proj." + kind].split(kv_heads * head_dim)
                out[h + "self_attn.k_proj." + kind], out[h + "self_attn.v_proj." + kind] = k, v
            if z + "attention.out_proj." + kind in state:
                out[h + "self_attn.o_proj." + kind] = state[z + "attention.out_proj." + kind]
            for zoo_name, hf_name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                if f"{z}mlp.{zoo_name}.{kind}" in state:
                    out[f"{h}mlp.{hf_name}.{kind}"] = state[f"{z}mlp.{zoo_name}.{kind}"]
    return out


def zoo_to_gpt2(state: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """GPT2LMHeadModel state dict from a zoo state dict (Conv1D weights transposed back to (in, out))."""
    out = {"transformer.wte.weight": state["token_embedding.weight"],
           "transformer.wpe.weight": state["position_embedding.weight"],
           "transformer.ln_f.weight": state["norm.weight"], "transformer.ln_f.bias": state["norm.bias"],
           "lm_head.weight": state["lm_head.weight"]}
    for i in range(depth):
        h, z = f"transformer.h.{i}.", f"blocks.{i}."
        for zoo_norm, hf_norm in (("norm_attn", "ln_1"), ("norm_mlp", "ln_2")):
            for kind in ("weight", "bias"):
                out[f"{h}{hf_norm}.{kind}"] = state[f"{z}{zoo_norm}.{kind}"]
        out[h + "attn.c_attn.weight"] = torch.cat((state[z + "attention.q_proj.weight"],
                                                   state[z + "attention.kv_proj.weight"])).t().contiguous()
        out[h + "attn.c_attn.bias"] = torch.cat((state[z + "attention.q_proj.bias"], state[z + "attention.kv_proj.bias"]))
        out[h + "attn.c_proj.weight"] = state[z + "attention.out_proj.weight"].t().contiguous()
        out[h + "attn.c_proj.bias"] = state[z + "attention.out_proj.bias"]
        out[h + "mlp.c_fc.weight"] = state[z + "mlp.up.weight"].t().contiguous()
        out[h + "mlp.c_fc.bias"] = state[z + "mlp.up.bias"]
        out[h + "mlp.c_proj.weight"] = state[z + "mlp.down.weight"].t().contiguous()
        out[h + "mlp.c_proj.bias"] = state[z + "mlp.down.bias"]
    return out
