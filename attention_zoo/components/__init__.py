"""The stack's components: positional schemes, norms and MLPs, each a small registry of its own.

    model:
      position: rope        # rope | learned | none          (attention_zoo.positions entry points)
      norm: rmsnorm         # rmsnorm | layernorm            (attention_zoo.norms)
      mlp: swiglu           # swiglu | gelu | gelu_tanh      (attention_zoo.mlps)

The model file composes them and never names one.
"""
from __future__ import annotations

from .base import Component, ComponentKind, StackShape
from .mlps import MLPS, register_mlp
from .norms import NORMS, register_norm
from .positions import POSITIONS, PositionalScheme, Positions, register_position

KINDS: dict[str, ComponentKind] = {kind.key: kind for kind in (POSITIONS, NORMS, MLPS)}

__all__ = ["Component", "ComponentKind", "StackShape", "KINDS", "POSITIONS", "NORMS", "MLPS", "Positions", "PositionalScheme",
           "register_position", "register_norm", "register_mlp"]
