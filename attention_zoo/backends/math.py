"""The reference backend: plain PyTorch, every feature, no speed tricks. Returns logits on request."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import AttentionCall, Backend, causal_mask, group_bias, group_queries


def grouped_logits(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """scale * q k^T per query head, reading grouped k without copying: (B, H, Nq, Nk)."""
    qg = group_queries(q, k.shape[1])  # (B, Hkv, G, Nq, D)
    logits = torch.einsum("bhgnd,bhmd->bhgnm", qg, k) * scale  # (B, Hkv, G, Nq, Nk)
    return logits.flatten(1, 2)


def math_attention(
    q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None = None, causal: bool = True, scale: float | None = None,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """softmax(scale q k^T + bias + mask) v; with return_logits also the pre-bias, pre-mask logits."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, H, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    logits = grouped_logits(q, k, scale)  # (B, H, Nq, Nk)
    scores = logits if bias is None else logits + bias.to(logits.dtype)
    if causal:
        scores = scores.masked_fill(~causal_mask(Nq, Nk, q.device), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgnm,bhmd->bhgnd", group_queries(weights, Hkv), v).flatten(1, 2)  # (B, H, Nq, D)
    return (out, logits) if return_logits else out


class MathBackend(Backend):
    name = "math"
    description = "plain PyTorch reference (materialises (B, H, Nq, Nk))"

    def refuse(self, call: AttentionCall) -> str | None:
        return None

    def attention(self, q, k, v, *, bias, causal, scale):
        return math_attention(q, k, v, bias=bias, causal=causal, scale=scale)

    def selective_attention(self, q, k, v, selection, *, causal, scale):
        """The reference: F materialised from the equations (ops/selection/reference.py)."""
        from ..ops.selection.reference import selective_attention

        return selective_attention(q, k, v, selection, causal=causal, scale=scale)


__all__ = ["MathBackend", "math_attention", "grouped_logits", "group_bias"]
