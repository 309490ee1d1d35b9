"""Differential attention (Ye, Dong, Xia, Sun, Zhu, Huang, Wei; "Differential Transformer", ICLR 2025).

Each head's q and k are split into halves [Q1; Q2], [K1; K2] of width d = D/2; v keeps the full width D:

    DiffAttn = (softmax(Q1 K1^T / sqrt(d) + M) - lambda * softmax(Q2 K2^T / sqrt(d) + M)) V
    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,   lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1))

for layer l = 1..L (lq*, lk* learnable vectors of size d, shared by the layer's heads). Each head's
output is RMS-normalised and scaled by (1 - lambda_init) before the output projection. The two maps are
two ordinary backend calls: the variant only overrides `attend`, so the cache and GQA work unchanged. Same
parameter count as vanilla attention, plus 4 * d + D per layer.

Under `position: rope` each half is rotated as a head of its own width d, as the paper does (`transform_qk`):
rotating the whole head would pair dimension i with i + D/2, one from each half, and each map's Q_s K_s^T
would then depend on absolute position (only their sum would be a function of the distance).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attention_zoo.backends import dispatch
from attention_zoo.components.positions import Positions, RotaryPositions
from attention_zoo.errors import UserError
from attention_zoo.variant import BASE_PARAMS, LayerShape, ProjectedAttention
from attention_zoo.variant_registry import register_variant


def _halves_as_heads(x: Tensor) -> Tensor:
    """(B, H, N, D) -> (B, 2H, N, D/2): heads 0..H-1 are the first halves, H..2H-1 the second."""
    return torch.cat(x.chunk(2, dim=-1), dim=1)


def _heads_as_halves(x: Tensor) -> Tensor:
    """The inverse of `_halves_as_heads`: (B, 2H, N, D/2) -> (B, H, N, D)."""
    return torch.cat(x.chunk(2, dim=1), dim=-1)


def lambda_init(layer_index: int) -> float:
    """The paper's depth schedule, layer_index = l - 1 counted from 0: 0.2 at the bottom, towards 0.8."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


@register_variant("differential")
class Differential(ProjectedAttention):
    """Differential attention: the difference of two softmax maps from split q/k halves cancels common-mode noise."""

    params = BASE_PARAMS

    def __init__(self, shape: LayerShape, **base):
        if shape.head_dim % 2:
            raise ValueError(f"differential attention splits each head's q and k in halves: "
                             f"head_dim {shape.head_dim} must be even")
        super().__init__(shape, **base)
        half = self.head_dim // 2
        self.scale = half ** -0.5  # each map's logits are scaled by its own width d = D/2
        self.lambda_init = lambda_init(shape.layer_index)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.randn(half) * 0.1) for _ in range(4))
        self.head_norm = nn.RMSNorm(self.head_dim, eps=shape.norm_eps)  # per head, over its D outputs

    def differential_lambda(self) -> Tensor:
        """lambda, a 0-dim tensor: exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init."""
        return (torch.exp(torch.dot(self.lambda_q1, self.lambda_k1)) - torch.exp(torch.dot(self.lambda_q2, self.lambda_k2))
                + self.lambda_init)

    def transform_qk(self, q: Tensor, k: Tensor, positions: Positions) -> tuple[Tensor, Tensor]:
        """q (B, H, N, D), k (B, Hkv, N, D) -> the same, QK-normalised over D, then under RoPE each half rotated as
        a head of width d = D/2: Q1 K1^T and Q2 K2^T each a function of the distance. Another scheme (a plug-in's
        too) gets whole heads, as with every variant: only RoPE rotates heads narrower than head_dim. Raises
        UserError under RoPE when d is odd (RoPE rotates pairs of dimensions)."""
        if not isinstance(positions.scheme, RotaryPositions):
            return super().transform_qk(q, k, positions)
        if self.head_dim % 4:
            raise UserError(f"differential attention under position rope rotates each half of a head as a head of "
                            f"width head_dim / 2, which rope needs even: head_dim ({self.head_dim}) must be a "
                            "multiple of 4 (or use position: none or learned)")
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = positions.rotate(_halves_as_heads(q), _halves_as_heads(k))  # (B, 2H, N, d), (B, 2 Hkv, N, d)
        return _heads_as_halves(q), _heads_as_halves(k)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        q1, q2 = q.chunk(2, dim=-1)  # (B, H, Nq, D/2) each
        k1, k2 = k.chunk(2, dim=-1)  # (B, Hkv, Nk, D/2) each
        a1 = dispatch(q1, k1, v, bias=bias, causal=True, scale=self.scale, backend=self.backend)  # (B, H, Nq, D)
        a2 = dispatch(q2, k2, v, bias=bias, causal=True, scale=self.scale, backend=self.backend)
        out = a1 - self.differential_lambda().to(a1.dtype) * a2
        return self.head_norm(out) * (1 - self.lambda_init)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lambda_init={self.lambda_init:.3f}"
