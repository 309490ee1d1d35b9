"""MLPs: SwiGLU (Shazeer, "GLU Variants Improve Transformer", 2020; Llama) and GELU (GPT-2).

Hidden width, unless `model.mlp_hidden` sets it:
- gelu, gelu_tanh: mlp_ratio * dim (GPT-2: 4 * dim);
- swiglu: 2/3 * mlp_ratio * dim rounded up to a multiple of 8, so its three matrices hold about as many
  parameters as GELU's two (Llama's rule, without Llama's rounding to 256, which would dwarf small models).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..initialization import residual_output
from ..variant import Param
from .base import Component, ComponentKind, StackShape

MLPS: ComponentKind = ComponentKind("mlp", "attention_zoo.mlps", __name__, "the feed-forward sub-layer")
register_mlp = MLPS.register


def _hidden_check(value: int | None, shape) -> str | None:
    return None if value is None or value >= 1 else "must be >= 1, or null for the MLP's default rule"


MLP_HIDDEN = Param((int, type(None)), None, "MLP hidden width; null: the MLP's rule from mlp_ratio", check=_hidden_check)
MLP_BIAS = Param(bool, False, "biases in the MLP's linear layers (GPT-2 has them, Llama does not)")


class _SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for the backward: autograd on the two ops would also keep
    silu(gate), a third tensor of the hidden width (the widest activation of a block). The backward
    recomputes silu(gate), one elementwise pass:
        d up = g * silu(gate),   d gate = silu'(gate) * (g * up)."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU's gating (Shazeer 2020, eq. 6 with Swish_1 = SiLU): silu(gate) * up, elementwise.

    gate, up: (..., hidden), same shape and dtype. Returns (..., hidden). Differentiable (first order);
    keeps two hidden-width tensors for the backward instead of three."""
    return _SwiGLUFunction.apply(gate, up)


class _MLPBase(Component, nn.Module):
    params = {"mlp_hidden": MLP_HIDDEN, "mlp_bias": MLP_BIAS}

    def __init__(self, shape: StackShape):
        super().__init__()
        self.dropout = nn.Dropout(shape.dropout)


@register_mlp("gelu")
class GELU(_MLPBase):
    """down(gelu(up(x))), exact (erf) GELU. x: (B, N, dim) -> (B, N, dim)."""

    approximate = "none"

    def __init__(self, shape: StackShape, mlp_hidden: int | None = None, mlp_bias: bool = False):
        super().__init__(shape)
        hidden = mlp_hidden or int(shape.dim * shape.mlp_ratio)
        self.up = nn.Linear(shape.dim, hidden, bias=mlp_bias)
        self.down = residual_output(nn.Linear(hidden, shape.dim, bias=mlp_bias))

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down(F.gelu(self.up(x), approximate=self.approximate)))


@register_mlp("gelu_tanh")
class GELUTanh(GELU):
    """down(gelu(up(x))) with GELU's tanh approximation (GPT-2's `gelu_new`). x: (B, N, dim) -> (B, N, dim)."""

    approximate = "tanh"


@register_mlp("swiglu")
class SwiGLU(_MLPBase):
    """down(silu(gate(x)) * up(x)). x: (B, N, dim) -> (B, N, dim)."""

    def __init__(self, shape: StackShape, mlp_hidden: int | None = None, mlp_bias: bool = False):
        super().__init__(shape)
        hidden = mlp_hidden or 8 * math.ceil(2 * shape.mlp_ratio * shape.dim / 3 / 8)
        self.gate = nn.Linear(shape.dim, hidden, bias=mlp_bias)
        self.up = nn.Linear(shape.dim, hidden, bias=mlp_bias)
        self.down = residual_output(nn.Linear(hidden, shape.dim, bias=mlp_bias))

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down(swiglu(self.gate(x), self.up(x))))


__all__ = ["MLPS", "register_mlp", "GELU", "GELUTanh", "SwiGLU", "MLP_HIDDEN", "MLP_BIAS", "swiglu"]
