"""What pruning ranks keys by: the selection penalty F each layer's *next* query will see, read from
the cache; and which layers must keep the very same keys.

For a layer that computes its own selection, F for the next query is exactly its cache accumulator
a (a[j] = sum of S[k, j] over every query k processed so far). A layer that reuses or adds up another
layer's F (cross-layer `share` / `accumulate`) sees a combination of accumulators: it is found by
replaying the forward pass's state flow on (B, T) vectors instead of (B, Nq, Nk) tensors.

Layers that hand key-indexed state to each other (RealFormer's residual scores, a shared or
accumulated F) must keep identical key sets, or the state's key axis would not line up: they form
one `KeyGroup`, and pruning takes one decision for the whole group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from ..cache import LayerCache, ModelCache
from ..state import SELECTION_PENALTY

# rule(attention module, its LayerCache, F of the latest layer that wrote one or None) -> F (B, T) or (B, ..., T),
# or None for a layer with no F of its own whose group another layer's F ranks (cross-layer accumulate below its
# first source); a group whose rules all give None while it holds keys is a PruningError (Pruner.__call__). A rule
# that gives None by design may carry `gives_penalty(attention, below) -> bool` (below: whether a layer under it
# gave F): layers it says give none are then treated as layers without F (penalty_layers), not as a broken rule;
# its `no_penalty_note` says where such layers are, for the message that nothing can be pruned by F.
PenaltyRule = Callable[[nn.Module, LayerCache, "Tensor | None"], "Tensor | None"]
PENALTY_RULES: dict[type, PenaltyRule] = {}


def register_penalty_rule(cls: type) -> Callable[[PenaltyRule], PenaltyRule]:
    """Tell pruning how variant `cls` turns its cache into F for the next query: F (B, T) float for every kept
    key, or per head (B, ..., T); None only where another layer of the same KeyGroup gives F (else pruning raises
    PruningError: the layer would stay unpruned). A variant may instead define `next_query_penalty(self, cache,
    previous)`; that method wins."""

    def decorator(rule: PenaltyRule) -> PenaltyRule:
        PENALTY_RULES[cls] = rule
        return rule

    return decorator


def _rule_for(attention: nn.Module) -> PenaltyRule | None:
    method = getattr(attention, "next_query_penalty", None)
    if callable(method):
        return lambda _attention, cache, previous: method(cache, previous)
    for klass in type(attention).__mro__:
        if klass in PENALTY_RULES:
            return PENALTY_RULES[klass]
    return None


def _register_builtin_rules() -> None:
    from attention_zoo.variants.cross_layer_selective import CrossLayerSelective
    from attention_zoo.variants.selective import ACCUMULATOR, Selective

    @register_penalty_rule(Selective)
    def _selective(attention, cache, previous):
        return cache.per_key.get(ACCUMULATOR)

    @register_penalty_rule(CrossLayerSelective)
    def _cross_layer(attention, cache, previous):
        own = cache.per_key.get(ACCUMULATOR) if attention.is_source else None
        if attention.mode == "share":
            return own if attention.is_source else previous
        if previous is not None:  # accumulate: F_l = own_l + decay * F_{l-1} (decay 0 and no own term: zeros)
            return attention.decay * previous if own is None else own + attention.decay * previous
        return own

    # Below its first source, cross-layer attention attends like vanilla and has no F (docs/variants.md): with
    # `sources: []` in accumulate mode that is every layer. (share: a non-source layer always has a source below.)
    _cross_layer.gives_penalty = lambda attention, below: attention.is_source or below
    _cross_layer.no_penalty_note = "below their first source layer (their `sources` lists none at or below them)"


_register_builtin_rules()


def attentions(model: nn.Module) -> list[nn.Module]:
    return [block.attention for block in model.blocks]


def next_query_penalties(model: nn.Module, cache: ModelCache) -> list[Tensor | None]:
    """Per layer, the F (B, T_l) float32 the next query will attend with, or None where the layer has none. A
    rule may give F per head, (B, ..., T): a key's F is then its smallest over those dims, so a key goes only
    if every head would drop it (as a group of layers decides). Raises ValueError for an F of another shape."""
    out: list[Tensor | None] = []
    previous = None
    for i, (attention, layer_cache) in enumerate(zip(attentions(model), cache.layers)):
        rule = _rule_for(attention)
        penalty = rule(attention, layer_cache, previous) if rule is not None and layer_cache.length else None
        if penalty is not None:
            penalty = _per_key(penalty, layer_cache, f"layer {i} ({type(attention).__name__})")
        out.append(penalty)
        if penalty is not None and SELECTION_PENALTY.name in attention.writes:
            previous = penalty
    return out


def _per_key(penalty: Tensor, cache: LayerCache, who: str) -> Tensor:
    """F (B, ..., T) as (B, T): the smallest over the middle dims. ValueError unless B and T are the cache's."""
    B, T = cache.k.shape[0], cache.length
    if penalty.dim() < 2 or penalty.shape[0] != B or penalty.shape[-1] != T:
        raise ValueError(f"{who}: its next-query penalty has shape {tuple(penalty.shape)}; pruning needs one value "
                         f"per kept key, (B, T) = ({B}, {T}), or per head, (B, ..., T)")
    return penalty.flatten(1, -2).amin(1) if penalty.dim() > 2 else penalty


def has_penalty_rule(attention: nn.Module) -> bool:
    return _rule_for(attention) is not None


def no_penalty_note(attention: nn.Module) -> str | None:
    """Why a layer whose rule can give F has none here (its rule's `no_penalty_note`), or None."""
    return getattr(_rule_for(attention), "no_penalty_note", None)


def penalty_layers(model: nn.Module) -> list[bool]:
    """Per layer, whether pruning can rank its keys by an F of its own, known from the model alone: it has a rule,
    and the rule's `gives_penalty` (if any) says so, given whether a layer below it on the selection_penalty
    channel has F (as next_query_penalties passes `previous` up). Raises nothing."""
    out, below = [], False
    for attention in attentions(model):
        rule = _rule_for(attention)
        judge = getattr(rule, "gives_penalty", None)  # a registered rule's; a next_query_penalty method has none
        gives = rule is not None and (judge is None or bool(judge(attention, below)))
        out.append(gives)
        below = below or (gives and SELECTION_PENALTY.name in attention.writes)
    return out


@dataclass(frozen=True)
class KeyGroup:
    """Layers that must keep identical keys, and the state channels that tie them together."""

    layers: tuple[int, ...]
    linked_by: tuple[str, ...] = ()

    def describe(self) -> str:
        layers = ", ".join(map(str, self.layers))
        return f"layers {layers} (linked by {', '.join(self.linked_by)})" if self.linked_by else f"layer {layers}"


def key_groups(model: nn.Module) -> list[KeyGroup]:
    """Union the layers that read key-indexed state with the layer that wrote it (in stack order)."""
    mods = attentions(model)
    parent = list(range(len(mods)))
    links: dict[int, set[str]] = {}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    last_writer: dict[str, int] = {}
    for index, attention in enumerate(mods):
        for channel in (*attention.reads, *attention.optional_reads):
            if channel in last_writer:
                a, b = find(index), find(last_writer[channel])
                if a != b:
                    root, other = min(a, b), max(a, b)
                    parent[other] = root
                    links.setdefault(root, set()).update(links.pop(other, set()))
                links.setdefault(find(index), set()).add(channel)
        for channel in attention.writes:
            last_writer[channel] = index
    groups: dict[int, list[int]] = {}
    for index in range(len(mods)):
        groups.setdefault(find(index), []).append(index)
    return [KeyGroup(tuple(layers), tuple(sorted(links.get(root, ())))) for root, layers in sorted(groups.items())]
