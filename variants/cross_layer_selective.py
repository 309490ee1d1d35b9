"""Cross-layer (depth-wise) selective attention: shallow layers' selection guides deeper ones.

State F_l travels up the stack through the `selection_penalty` channel as a structured `Selection`
(ops/selection: the source layers' selection q/k with their decays), never as a (B, Nq, Nk) tensor.
- share: a source layer computes its own F and writes it; any other layer attends with the latest
  source's F as it is and computes no selection logits at all.
- accumulate: F_l = own_l + decay * F_{l-1}, own_l being this layer's selective F if it is a source
  and 0 otherwise, so attention focuses progressively with depth.
"""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

from attention_zoo.ops.selection import Selection
from attention_zoo.state import SELECTION_PENALTY
from attention_zoo.variant import BASE_PARAMS, PROTECT_BOS, RESIDUAL, SELECTION_HEAD, LayerShape, Param, ProjectedAttention
from attention_zoo.variant_registry import register_variant
from attention_zoo.variants.selective import SelectionMixin


def _sources_check(value, shape: LayerShape):
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return "must be a list of layer indices (integers)"
    bad = [i for i in value if not 0 <= i < shape.depth]
    if bad:
        return f"layer indices {bad} outside [0, {shape.depth - 1}]"
    repeated = sorted({i for i in value if value.count(i) > 1})
    return f"layer indices {repeated} listed more than once; each source layer is listed once" if repeated else None


def _decay_check(value, shape: LayerShape):
    return None if value >= 0 else "must be >= 0"


def as_selection(value) -> Selection:
    """The channel's value as a Selection (a plug-in layer may have written a dense F: rejected clearly)."""
    if not isinstance(value, Selection):
        raise TypeError("state 'selection_penalty' must hold a Selection (attention_zoo.ops.selection), "
                        f"got {type(value).__name__}")
    return value


@register_variant("cross_layer_selective")
class CrossLayerSelective(SelectionMixin, ProjectedAttention):
    """Depth-wise selective attention: source layers select, other layers reuse (share) or add up (accumulate) F."""

    params = {
        **BASE_PARAMS,
        "selection_head": SELECTION_HEAD,
        "protect_bos": PROTECT_BOS,
        "residual": RESIDUAL,
        "sources": Param(list, [0], "layer indices that compute their own selection", check=_sources_check),
        "mode": Param(str, "share", "share: reuse the latest source's F; accumulate: F_l = own_l + decay * F_{l-1}",
                      choices=("share", "accumulate")),
        "decay": Param((float, int), 1.0, "weight of F_{l-1} in accumulate mode", check=_decay_check),
    }

    def __init__(self, shape: LayerShape, *, sources: list[int] = (0,), mode: str = "share", decay: float = 1.0,
                 selection_head: int = 0, protect_bos: bool = True, residual: bool = False, **base):
        self.carry_residual = residual
        super().__init__(shape, **base)
        self.selection_head = selection_head
        self.protect_bos = protect_bos
        self.is_source = shape.layer_index in set(sources)
        self.mode = mode
        self.decay = float(decay)
        channel = SELECTION_PENALTY.name
        if mode == "share":
            self.reads = () if self.is_source else (channel,)
            self.writes = (*self.writes, channel) if self.is_source else self.writes
        else:
            self.optional_reads = (*self.optional_reads, channel)
            self.writes = (*self.writes, channel)

    def missing_state_hint(self, channel: str) -> str | None:
        """What to change when no layer below this one writes `channel` (config.check_state_flow asks)."""
        if self.mode == "share" and channel == SELECTION_PENALTY.name:
            return ("mode share reuses the F of the latest layer at or below each layer that computes one (a layer "
                    "listed in `sources`, or a selective layer); list a layer at or below it in "
                    "model.attention.sources (e.g. sources: [0]), or use mode: accumulate (layers below the first "
                    "source attend as vanilla)")
        return None

    def attention_bias(self, q, k, state: Mapping[str, Tensor], cache):
        channel = SELECTION_PENALTY.name
        if self.mode == "share":
            if not self.is_source:
                return as_selection(state[channel]), {}
            selection = self.own_selection(q, k, cache)
            return selection, {channel: selection}
        previous = state.get(channel)
        own = self.own_selection(q, k, cache) if self.is_source else None
        if previous is None or not self.decay:
            if own is not None:
                return own, {channel: own}
            if previous is None:  # no source at or below this layer yet: plain attention
                return None, {}
            # decay 0 and no own term: F_l = 0. The layer attends without a penalty, and the layers above must
            # read this zero, not F_{l-1} (key_scores' _cross_layer mirrors this for pruning)
            return None, {channel: as_selection(previous).scaled(0.0)}
        # F_l = own_l + decay * F_{l-1}: the cumulative sum is linear, so this is a sum of weighted terms.
        selection = as_selection(previous).scaled(self.decay)
        if own is not None:
            selection = own + selection
        return selection, {channel: selection}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode!r}, source={self.is_source}, decay={self.decay}"
