"""Norms: RMSNorm (Zhang & Sennrich, 2019; Llama) and LayerNorm (Ba et al., 2016; GPT-2).

LayerNorm is torch.nn's, one fused kernel forward and backward. RMSNorm has no such kernel on CPU in
torch (`F.rms_norm` runs as a composite of elementwise ops, and autograd differentiates each), so
`rms_norm` writes its backward out by hand: fewer passes over the activations than the composite
(docs/benchmarks.md, "The stack's cost"), and one input-sized tensor kept for the backward where the
composite keeps two.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..variant import Param
from .base import Component, ComponentKind, StackShape

NORMS: ComponentKind = ComponentKind("norm", "attention_zoo.norms", __name__, "the pre-norm before each sub-layer and at the top")
register_norm = NORMS.register


def _eps_check(value: float, shape) -> str | None:
    return None if 0 < value < 1 and math.isfinite(value) else "must be in (0, 1)"


NORM_EPS = Param(float, 1e-5, "epsilon added to the variance in every norm", check=_eps_check)


class _RMSNormFunction(torch.autograd.Function):
    """y = x * rstd * weight with rstd = 1 / sqrt(mean(x^2) + eps) over the last dimension.

    Backward, with xhat = x * rstd and gxhat = g * weight:
        dweight = sum over rows of g * xhat
        dx      = rstd * (gxhat - xhat * mean(gxhat * xhat))
    Computed in float32 at least (as transformers' Llama RMSNorm does for bf16/fp16 inputs)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xc = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(torch.linalg.vecdot(xc, xc).unsqueeze(-1) / x.shape[-1] + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)  # one input-sized tensor; xhat is one multiply away
        return weight * (xc * rstd).to(x.dtype)  # Llama's order: normalise in float32, cast, then scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * xhat.to(x.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gxhat = (grad * weight).to(rstd.dtype)
            mean_dot = torch.linalg.vecdot(gxhat, xhat).unsqueeze(-1) / x.shape[-1]  # (..., 1)
            grad_x = (torch.addcmul(gxhat, xhat, mean_dot, value=-1) * rstd).to(x.dtype)
        return grad_x, grad_weight, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm (Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019, eq. 4):
    x / sqrt(mean(x^2) + eps) * weight over the last dimension.

    x: (..., D) float tensor; weight: (D,). Returns (..., D) in x's dtype (promoted with weight's).
    The statistics are computed in float32 at least; differentiable in x and weight (first order)."""
    return _RMSNormFunction.apply(x, weight, eps)


@register_norm("rmsnorm")
class RMSNorm(Component, nn.RMSNorm):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension (no mean subtraction, no bias).
    x: (..., dim) -> (..., dim), same dtype."""

    params = {"norm_eps": NORM_EPS}

    def __init__(self, shape: StackShape, norm_eps: float = 1e-5):
        super().__init__(shape.dim, eps=norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


@register_norm("layernorm")
class LayerNorm(Component, nn.LayerNorm):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension. x: (..., dim) -> (..., dim)."""

    params = {"norm_eps": NORM_EPS}

    def __init__(self, shape: StackShape, norm_eps: float = 1e-5):
        super().__init__(shape.dim, eps=norm_eps)


__all__ = ["NORMS", "register_norm", "RMSNorm", "LayerNorm", "NORM_EPS", "rms_norm"]
