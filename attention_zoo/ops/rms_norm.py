"""RMSNorm as one autograd op (Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019, eq. 4).

torch has no fused RMSNorm kernel on CPU (`F.rms_norm` runs as a composite of elementwise ops, and
autograd differentiates each), so the backward is written out by hand: fewer passes over the
activations than the composite (docs/benchmarks.md, "The stack's cost"), and one input-sized tensor kept
for the backward where the composite keeps two. Used by the stack's RMSNorm and by QK-norm.
"""
from __future__ import annotations

import torch
from torch import Tensor


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


__all__ = ["rms_norm"]
