"""GPT-2's initialisation: N(0, 0.02) for linear and embedding weights, zero biases, and residual-branch
output projections shrunk to N(0, 0.02 / sqrt(2 * depth)) so the residual stream's variance does not grow
with depth (Radford et al., 2019). Which layers are residual-branch outputs is marked on the module
(`residual_output`), so a variant that names its projection differently is not silently missed. A module
that initialises some of its weights its own way (a gate bias started at 5) defines `init_weights()`, which
runs after GPT-2's init has drawn them."""
from __future__ import annotations

import math

from torch import nn

RESIDUAL_OUTPUT = "residual_output"


def residual_output(linear: nn.Linear) -> nn.Linear:
    """Mark `linear` as the last layer of a residual branch (attention output, MLP down projection)."""
    setattr(linear, RESIDUAL_OUTPUT, True)
    return linear


def init_gpt2(model: nn.Module, depth: int, std: float = 0.02) -> None:
    """Initialise every nn.Linear / nn.Embedding in `model` in place; norms and scheme-specific
    parameters keep their own initialisation. Then every module that defines `init_weights()` (a plug-in
    variant or component with an init of its own) has it called, in `model.modules()` order, so what it sets
    is not overwritten by the draw above."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            residual = getattr(module, RESIDUAL_OUTPUT, False)
            nn.init.normal_(module.weight, mean=0.0, std=std / math.sqrt(2 * depth) if residual else std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    for module in model.modules():
        if callable(own_init := getattr(module, "init_weights", None)):
            own_init()
