"""Norms: RMSNorm (Zhang & Sennrich, 2019; Llama) and LayerNorm (Ba et al., 2016; GPT-2).

LayerNorm is torch.nn's, one fused kernel forward and backward. RMSNorm runs `ops.rms_norm.rms_norm`,
whose backward is written out by hand (torch has no fused RMSNorm kernel on CPU).
"""
from __future__ import annotations

import math

from torch import Tensor, nn

from ..ops.rms_norm import rms_norm
from ..variant import Param
from .base import Component, ComponentKind, StackShape

NORMS: ComponentKind = ComponentKind("norm", "attention_zoo.norms", __name__, "the pre-norm before each sub-layer and at the top")
register_norm = NORMS.register


def _eps_check(value: float, shape) -> str | None:
    return None if 0 < value < 1 and math.isfinite(value) else "must be in (0, 1)"


NORM_EPS = Param(float, 1e-5, "epsilon added to the mean square (rmsnorm) or the variance (layernorm) in every norm, "
                 "QK-norm and differential attention's head norm included", check=_eps_check)


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
