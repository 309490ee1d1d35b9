"""Selective attention (Leviathan, Kalman, Matias; ICLR 2025, section 3).

The selection head's ReLU'd logits S say how much each query wants later tokens to ignore each key;
F[i, j] = sum over k < i of S[k, j] is subtracted from every head's logits. F is one float32
(B, Nq, Nk) tensor per layer, passed to the backend as a head-broadcast bias: never one per head.
"""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

from attention_zoo.cache import LayerCache
from attention_zoo.functional import (
    head_broadcast,
    penalty_and_bias_source,
    penalty_from_scores,
    selection_logits,
    selection_scores,
)
from attention_zoo.state import SELECTION_PENALTY
from attention_zoo.variant import BASE_PARAMS, PROTECT_BOS, RESIDUAL, SELECTION_HEAD, LayerShape, ProjectedAttention
from attention_zoo.variant_registry import register_variant

ACCUMULATOR = "selection"  # the per-key cache statistic: column sums of S over processed queries


class SelectionMixin:
    """Computes this layer's own F, from the full sequence or incrementally through the cache."""

    selection_head: int
    protect_bos: bool

    def own_penalty(self, q: Tensor, k: Tensor, cache: LayerCache | None) -> tuple[Tensor, Tensor]:
        """(F, -F) of this layer, (B, Nq, Nk) each: F for the state channel, -F for the bias. Over a whole
        sequence both are one tensor (`functional.penalty_and_bias_source`: no negation pass)."""
        if cache is None:
            return penalty_and_bias_source(q, k, self.selection_head, self.scale, protect_bos=self.protect_bos,
                                           backend=self.backend)
        logits = selection_logits(q, k, self.selection_head, self.scale)  # (B, Nq, Nk)
        # F = a + exclusive cumsum of this chunk's S rows; then a += the chunk's column sums.
        acc = cache.stat(ACCUMULATOR, q.shape[0], q.device)  # (B, Nk)
        S = selection_scores(logits, protect_bos=self.protect_bos)
        cache.per_key[ACCUMULATOR] = acc + S.sum(dim=1).detach()
        Fpen = penalty_from_scores(S, acc)
        return Fpen, -Fpen


@register_variant("selective")
class Selective(SelectionMixin, ProjectedAttention):
    """Selective attention: every head attends with softmax(L - F + mask), F from one selection head."""

    params = {**BASE_PARAMS, "selection_head": SELECTION_HEAD, "protect_bos": PROTECT_BOS, "residual": RESIDUAL}

    def __init__(self, shape: LayerShape, *, selection_head: int = 0, protect_bos: bool = True,
                 residual: bool = False, **base):
        self.carry_residual = residual
        super().__init__(shape, **base)
        self.selection_head = selection_head
        self.protect_bos = protect_bos
        self.writes = (*self.writes, SELECTION_PENALTY.name)

    def attention_bias(self, q, k, state: Mapping[str, Tensor], cache):
        Fpen, negated = self.own_penalty(q, k, cache)
        return head_broadcast(negated, self.heads), {SELECTION_PENALTY.name: Fpen}
