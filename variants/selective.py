"""Selective attention (Leviathan, Kalman, Matias; ICLR 2025, section 3).

The selection head's ReLU'd logits S say how much each query wants later tokens to ignore each key;
F[i, j] = sum over k < i of S[k, j] is subtracted from every head's logits. The layer hands the backend
a structured `Selection` (the selection head's q and k, protect_bos, scale; see ops/selection) rather
than F itself, and writes the same value to the `selection_penalty` state channel: a backend that fuses it
never makes the (B, Nq, Nk) F, and a reader that needs F calls `.dense()`.
"""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

from attention_zoo.cache import LayerCache
from attention_zoo.ops.selection import Selection
from attention_zoo.ops.selection.blocked import column_sums
from attention_zoo.state import SELECTION_PENALTY
from attention_zoo.variant import BASE_PARAMS, PROTECT_BOS, RESIDUAL, SELECTION_HEAD, LayerShape, ProjectedAttention
from attention_zoo.variant_registry import register_variant

ACCUMULATOR = "selection"  # the per-key cache statistic: column sums of S over processed queries


class SelectionMixin:
    """Computes this layer's own F, from the full sequence or incrementally through the cache."""

    selection_head: int
    protect_bos: bool

    def own_selection(self, q: Tensor, k: Tensor, cache: LayerCache | None) -> Selection:
        """This layer's own Selection from q (B, H, Nq, D) and k (B, Hkv, Nk, D): the selection head reads its
        own kv head (GQA). With a cache, F = a + exclusive cumsum of this chunk's S rows, then a += the
        chunk's column sums of S (made block by block, no (B, Nq, Nk))."""
        group = q.shape[1] // k.shape[1]
        qs, ks = q[:, self.selection_head], k[:, self.selection_head // group]  # (B, Nq, D), (B, Nk, D)
        if cache is None:
            return Selection.of_head(qs, ks, self.scale, protect_bos=self.protect_bos)
        acc = cache.stat(ACCUMULATOR, q.shape[0], q.device)  # (B, Nk)
        selection = Selection.of_head(qs, ks, self.scale, protect_bos=self.protect_bos, accumulated=acc)
        cache.per_key[ACCUMULATOR] = acc + column_sums(selection.terms[0])
        return selection


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
        selection = self.own_selection(q, k, cache)
        return selection, {SELECTION_PENALTY.name: selection}
