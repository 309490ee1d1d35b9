"""The paper's auxiliary memory loss, which trains a selective model to be prunable (section 5).

    M^l_i = i - sum_j min(F^l[i, j], tau) / tau        (keys query i still needs, roughly)
    loss  = eps * sum_l max_i M^l_i / (L * N)

F^l is layer l's selection penalty (B, N, N), materialised from the structured selection the layer wrote to
the state (`selection_penalty`): training with this loss builds one dense F per writing layer;
a key with F >= tau counts as fully masked. Only layers that wrote an F take part and L counts them
(a cross-layer `share` model's non-source layers write none: their F is the source's, counted once).
max_i is taken per sequence, then averaged over the batch. Registered as the training auxiliary loss
`selective_memory`: `train.aux_losses: {selective_memory: {tau: 1.0, eps: 0.1}}`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import Field
from ..errors import UserError
from ..ops.selection import penalty_tensor
from ..state import SELECTION_PENALTY
from ..train.aux_losses import register_aux_loss


def memory_needed(penalty: Tensor, tau: float) -> Tensor:
    """M_i = i - sum_j min(F[i, j], tau) / tau for F (B, N, N) -> (B, N)."""
    i = torch.arange(penalty.shape[-2], device=penalty.device, dtype=penalty.dtype)
    return i - penalty.clamp(max=tau).sum(dim=-1) / tau


def selective_memory_loss(per_layer_updates: list[dict[str, Tensor]], tau: float = 1.0, eps: float = 0.1) -> Tensor:
    # The loss reads F itself: the layers' structured selections are materialised here, (B, N, N) each.
    penalties = [penalty_tensor(u[SELECTION_PENALTY.name]) for u in per_layer_updates if SELECTION_PENALTY.name in u]
    if not penalties:
        raise UserError("train.aux_losses.selective_memory: no layer of this model writes a selection penalty "
                        "(use a selective or cross_layer_selective attention)")
    N = penalties[0].shape[-1]
    worst = torch.stack([memory_needed(F, tau).amax(dim=-1) for F in penalties])  # (L, B)
    return eps * worst.sum(dim=0).mean() / (len(penalties) * N)


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


@register_aux_loss("selective_memory", fields={
    "tau": Field(float, 1.0, "F at which a key counts as fully masked", check=_positive),
    "eps": Field(float, 0.1, "weight of the loss (0.02 was reported to prune as well with better loss)", minimum=0),
})
def selective_memory(per_layer_updates: list[dict[str, Tensor]], params: dict[str, Any], model: nn.Module) -> Tensor:
    return selective_memory_loss(per_layer_updates, tau=float(params.get("tau", 1.0)), eps=float(params.get("eps", 0.1)))
