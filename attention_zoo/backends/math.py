"""The reference backend: plain PyTorch, every feature, no speed tricks. Returns logits on request."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import AttentionCall, Backend, causal_mask, group_queries


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
    weights = masked_softmax(scores)
    out = torch.einsum("bhgnm,bhmd->bhgnd", group_queries(weights, Hkv), v).flatten(1, 2)  # (B, H, Nq, D)
    return (out, logits) if return_logits else out


def masked_softmax(scores: Tensor) -> Tensor:
    """softmax over the last dim, with 0 (not NaN) for a row whose every score is -inf: a query that sees
    no key (more queries than keys under the causal mask, or a bias that masks the row) gets output 0
    and no gradient, as flash attention and torch's SDPA give.

    The dead rows are selected out before the softmax and after it, never multiplied by a mask: the
    softmax of an all -inf row is NaN, and NaN * 0 is NaN (in the backward too)."""
    if scores.shape[-1] == 0:  # no key at all: every row is dead, and amax has nothing to reduce
        return scores
    dead = scores.amax(dim=-1, keepdim=True) == float("-inf")
    weights = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1)
    return weights.masked_fill(dead, 0.0)


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


__all__ = ["MathBackend", "math_attention", "grouped_logits", "masked_softmax"]
