"""Context pruning: drop cached keys that selective attention has masked, freeing their memory.

Policies (docs/inference.md), each applied after every forward call:
- `threshold:TAU`  drop key j once the F the next query would give it is >= TAU (its attention weight
                   is then below exp(-TAU) times what it would be unmasked; F never decreases, so it
                   stays masked).
- `budget:K`       or `budget:K1,K2,...` per layer: while a layer holds more than K_l keys, drop the
                   key with the largest F.
- `window:K`       the sliding-window baseline: keep BOS and the K - 1 most recent keys (no F needed).
Never dropped: BOS (position 0) and the newest token.

Layers that pass key-indexed state to each other (`key_scores.KeyGroup`: residual scores, a shared
or accumulated F) take one decision together, ranked by the smallest F any of them gives a key, so
a key leaves only once every F-carrying layer of the group masks it. Layers without any F (vanilla,
gqa, residual alone, cross-layer accumulate below its first source) are not pruned by `threshold`/`budget`.

With batch > 1 each row keeps its own keys: `budget`/`window` keep exactly K per row; `threshold`
keeps, in every row, as many keys as the row that keeps the most (rows with more masked keys keep
their least-masked extras), because the cache is one rectangular (B, Hkv, T, D) tensor.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..cache import ModelCache
from ..errors import UserError
from ..numbers import finite_problem, is_whole
from .key_scores import KeyGroup, attentions, key_groups, next_query_penalties, no_penalty_note, penalty_layers

SPEC_FORMS = "threshold:TAU (e.g. threshold:1.0), budget:K or budget:K1,K2,... (one per layer, 'none' = not pruned), window:K"
MIN_BUDGET = 2  # BOS and the newest token are never dropped


class PruningError(UserError, ValueError):
    """A pruning policy that cannot apply to this model or was written wrong."""


def protected(positions: Tensor) -> Tensor:
    """(B, T) bool: keys that are never dropped, BOS (position 0) and the newest (last) key."""
    keep = positions == 0
    keep[:, -1] = True
    return keep


def keep_lowest(value: Tensor, count: int) -> Tensor:
    """Indices (B, count), ascending, of the `count` smallest values per row; ties keep the newer key."""
    T = value.shape[-1]
    order = torch.sort(value.flip(-1), dim=-1, stable=True).indices[:, :count]  # flipped: newer first among ties
    return (T - 1 - order).sort(dim=-1).values


class PruningPolicy:
    """Decides which keys a (group of) layer(s) keeps. `keep` returns (B, K) indices or None (keep all)."""

    needs_penalty: bool = True  # ranks keys by F; groups without one are left alone

    def keep(self, penalty: Tensor | None, positions: Tensor, budget: int | None) -> Tensor | None:
        raise NotImplementedError

    def spec(self) -> str:
        raise NotImplementedError


@dataclass
class ThresholdPolicy(PruningPolicy):
    """Drop a key once its F is >= tau. Raises PruningError unless tau is a finite number > 0 (a NaN tau would
    silently drop nothing, a negative one everything but BOS and the newest key)."""

    tau: float

    def __post_init__(self):
        tau = self.tau
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or finite_problem(tau) or not tau > 0:
            raise PruningError(f"ThresholdPolicy(tau={tau!r}): the threshold must be a finite number > 0")

    def keep(self, penalty, positions, budget):
        safe = protected(positions)
        evict = (penalty >= self.tau) & ~safe
        if not evict.any():
            return None
        count = int((~evict).sum(-1).max())  # rows keep the same number of keys: the largest count
        return keep_lowest(penalty.masked_fill(safe, float("-inf")), count)

    def spec(self) -> str:
        """`threshold:TAU`, TAU exact (reports and calibrate's journal key measurements by it): 6 digits where they
        say it all, Python's shortest round-trip form where they do not (0.5000004 is not 0.5)."""
        short = f"{self.tau:g}"
        return f"threshold:{short if float(short) == self.tau else repr(float(self.tau))}"


@dataclass
class BudgetPolicy(PruningPolicy):
    """Per-layer budgets K_l; one int means the same budget for every layer that has an F."""

    budgets: int | list[int | None]

    def __post_init__(self):
        """PruningError unless every budget is a whole number >= MIN_BUDGET (None, in a per-layer list: not pruned).
        parse_prune_spec checks the text; this guards the Python API, where BudgetPolicy(1) dropped BOS and
        BudgetPolicy(0) emptied the cache, silently."""
        name = type(self).__name__
        items = self.budgets if isinstance(self.budgets, (list, tuple)) else [self.budgets]
        if isinstance(self.budgets, (list, tuple)) and not self.budgets:
            raise PruningError(f"{name}([]): give one budget, or one per layer")
        for item in items:
            if item is None and isinstance(self.budgets, (list, tuple)):
                continue
            if not is_whole(item) or item < MIN_BUDGET:
                raise PruningError(f"{name}({self.budgets!r}): budget {item!r} is not a whole number >= {MIN_BUDGET} "
                                   "(BOS and the newest token are always kept)" +
                                   ("; None (not pruned) only in a per-layer list" if item is None else ""))

    def keep(self, penalty, positions, budget):
        if budget is None or positions.shape[-1] <= budget:
            return None
        return keep_lowest(penalty.masked_fill(protected(positions), float("-inf")), budget)

    def spec(self) -> str:
        return f"budget:{_budgets_text(self.budgets)}"


@dataclass
class WindowPolicy(BudgetPolicy):
    """Sliding window of K keys per layer: BOS and the K - 1 most recent tokens. Ignores F."""

    needs_penalty = False

    def keep(self, penalty, positions, budget):
        if budget is None or positions.shape[-1] <= budget:
            return None
        return keep_lowest((-positions.float()).masked_fill(protected(positions), float("-inf")), budget)

    def spec(self) -> str:
        return f"window:{_budgets_text(self.budgets)}"


def _variant_name(attention: nn.Module) -> str:
    """`Selective, variant 'selective'`: the class, and the name it is registered under (none for a subclass made
    outside the registry)."""
    from ..variant_registry import VARIANTS

    cls = type(attention)
    names = [name for name in VARIANTS.names() if VARIANTS.get(name) is cls]
    return f"{cls.__name__}, variant {names[0]!r}" if names else cls.__name__


def _budgets_text(budgets: int | list[int | None]) -> str:
    return str(budgets) if isinstance(budgets, int) else ",".join("none" if b is None else str(b) for b in budgets)


def parse_prune_spec(text: str, given_as: str | None = None) -> PruningPolicy:
    """`threshold:1.0`, `budget:64`, `budget:64,32,none,16`, `window:64` -> a policy. `given_as` names where the
    user wrote it, to start an error message (default `--prune 'TEXT'`, generate's flag)."""
    kind, sep, value = text.partition(":")
    where = given_as or f"--prune {text!r}"
    bad = lambda why: PruningError(f"{where}: {why}; valid forms: {SPEC_FORMS}")  # noqa: E731
    if not sep or kind not in ("threshold", "budget", "window"):
        raise bad("unknown policy" if sep else "expected POLICY:VALUE")
    if kind == "threshold":
        try:
            tau = float(value)
        except ValueError:
            raise bad(f"threshold {value!r} is not a number") from None
        if message := finite_problem(tau):
            raise bad(f"the threshold {message}")
        if not tau > 0:
            raise bad("the threshold must be > 0")
        return ThresholdPolicy(tau)
    budgets: list[int | None] = []
    for item in value.split(","):
        item = item.strip()
        if item.lower() == "none" and kind == "budget":
            budgets.append(None)
            continue
        if not (item.isascii() and item.isdigit()):  # str.isdigit() is also true of '²', which int() refuses
            raise bad(f"{kind} {item!r} is not a whole number" + (" or 'none'" if kind == "budget" else ""))
        if int(item) < MIN_BUDGET:
            raise bad(f"{kind} {item} is below {MIN_BUDGET} (BOS and the newest token are always kept)")
        budgets.append(int(item))
    policy = BudgetPolicy if kind == "budget" else WindowPolicy
    return policy(budgets[0] if len(budgets) == 1 and budgets[0] is not None else budgets)


def without_f_note(mods: list[nn.Module], gives: list[bool]) -> str:
    """`; layers 0, 1 (CrossLayerSelective) have none: below their first source layer (...)`, for the layers whose
    variant can have F but has none in this model (`gives`: key_scores.penalty_layers); "" when there are none."""
    notes: dict[str, list[str]] = {}
    for i, (attention, has_f) in enumerate(zip(mods, gives)):
        if not has_f and (note := no_penalty_note(attention)) is not None:
            notes.setdefault(f"({type(attention).__name__}) have none: {note}", []).append(str(i))
    return "".join(f"; layer{'s' * (len(ids) > 1)} {', '.join(ids)} {why}" for why, ids in notes.items())


class Pruner:
    """Applies a policy to a ModelCache after each forward call: `logits = model(x, cache); pruner(cache)`.

    Raises PruningError when the policy cannot apply to `model` (no layer has an F to rank keys by, a budget list
    of the wrong length, different budgets inside a linked group, a budget for a layer without F); the message
    starts with `given_as` (where the user wrote the policy, e.g. `--prune 'budget:3,4'`), else the policy."""

    def __init__(self, model: nn.Module, policy: PruningPolicy, given_as: str | None = None):
        self.model, self.policy = model, policy
        self.where = given_as or policy.spec()
        self.groups: list[KeyGroup] = key_groups(model)
        mods = attentions(model)
        self.depth = len(mods)
        # A group is ranked when one of its layers has F: not merely a rule, since cross-layer attention below its
        # first source (every layer, with accumulate and `sources: []`) attends like vanilla and has none.
        self.gives = penalty_layers(model)
        self.ranked = [any(self.gives[i] for i in g.layers) for g in self.groups]
        if policy.needs_penalty and not any(self.ranked):
            names = sorted({type(m).__name__ for m in mods})
            raise PruningError(f"{self.where}: no layer of this model has a selection penalty F to rank keys by "
                               f"(attention: {', '.join(names)}){without_f_note(mods, self.gives)}; use window:K for a "
                               "sliding window")
        self.group_budgets = self._resolve_budgets()

    def _resolve_budgets(self) -> list[int | None]:
        budgets = self.policy.budgets if isinstance(self.policy, BudgetPolicy) else None
        if budgets is None:
            return [None] * len(self.groups)
        if isinstance(budgets, int):  # one budget for every layer that can be pruned by this policy
            return [budgets if ranked or not self.policy.needs_penalty else None for ranked in self.ranked]
        if len(budgets) != self.depth:
            raise PruningError(f"{self.where}: {len(budgets)} budgets for {self.depth} layers; give one "
                               f"number for every layer, or a single number for all")
        out = []
        for group, ranked in zip(self.groups, self.ranked):
            values = {budgets[i] for i in group.layers}
            if len(values) > 1:
                raise PruningError(f"{self.where}: {group.describe()} must keep the same keys (their state is "
                                   f"indexed by key), so give them one budget; got {[budgets[i] for i in group.layers]}")
            value = values.pop()
            if value is not None and self.policy.needs_penalty and not ranked:
                raise PruningError(f"{self.where}: {group.describe()} has no selection penalty F to rank its "
                                   f"keys by; write 'none' for it (it is then not pruned)")
            out.append(value)
        return out

    def layer_budgets(self, context: int) -> list[int]:
        """K_l per layer for the memory ratio; unpruned layers count the full context."""
        per_layer = [context] * self.depth
        for group, budget in zip(self.groups, self.group_budgets):
            for i in group.layers:
                per_layer[i] = context if budget is None else min(budget, context)
        return per_layer

    def safe_prefill(self) -> int:
        """Tokens that may go in one chunk before the first pruning step without changing any result:
        with fixed budgets nothing is dropped before a cache exceeds its smallest budget."""
        if isinstance(self.policy, BudgetPolicy):
            budgets = [b for b in self.group_budgets if b is not None]
            return min(budgets) if budgets else 1 << 62
        return 1

    def __call__(self, cache: ModelCache) -> None:
        """Prune `cache` in place. Raises PruningError when a group the policy prunes by F (one whose layers have a
        penalty rule) gets None from every one of its rules while it holds keys: it would stay unpruned while
        `layer_budgets`, and the memory figures built on it, count it at its budget."""
        penalties = next_query_penalties(self.model, cache) if self.policy.needs_penalty else None
        for group, ranked, budget in zip(self.groups, self.ranked, self.group_budgets):
            first = cache.layers[group.layers[0]]
            if not first.length:
                continue
            penalty = None
            if penalties is not None:
                found = [penalties[i] for i in group.layers if penalties[i] is not None]
                if not found:
                    if ranked:
                        raise PruningError(self._no_penalty_message(group, first.length))
                    continue  # no layer of the group has a rule: not pruned, as describe() and layer_budgets() say
                penalty = found[0] if len(found) == 1 else torch.stack(found).amin(dim=0)
            index = self.policy.keep(penalty, first.positions, budget)
            if index is not None:
                for i in group.layers:
                    cache.layers[i].keep(index)

    def _no_penalty_message(self, group: KeyGroup, keys: int) -> str:
        mods = attentions(self.model)
        by_variant: dict[str, list[str]] = {}  # layers 0, 1 (Selective, variant 'selective'): each variant once
        for i in group.layers:
            if self.gives[i]:
                by_variant.setdefault(_variant_name(mods[i]), []).append(str(i))
        who = ", ".join(f"layer{'s' * (len(ids) > 1)} {', '.join(ids)} ({name})" for name, ids in by_variant.items())
        return (f"{self.where}: {who} gave no selection penalty F for the {keys} key{'s' * (keys != 1)} held: the "
                "penalty rule (next_query_penalty, or one registered with key_scores.register_penalty_rule) returned "
                "None, so pruning would leave these keys while counting the layer as pruned (a budget's memory "
                "figure counts its K keys). A penalty rule must return F for every kept key, (B, T) or per head "
                "(B, ..., T); None only for a layer whose group another layer's F ranks (layers linked by "
                "key-indexed state). A variant with no F defines no rule: its layers are then not pruned by budget "
                "or threshold (window:K prunes any layer)")

    def describe(self) -> str:
        """Per group of layers, what the policy does there: e.g. `layer 0: budget 32; layer 1: not pruned (no F)`."""
        parts = []
        for group, ranked, budget in zip(self.groups, self.ranked, self.group_budgets):
            if self.policy.needs_penalty and not ranked:
                what = "not pruned (no F)"
            elif isinstance(self.policy, BudgetPolicy):  # window:K too: say which policy the K is for
                kind = "window" if isinstance(self.policy, WindowPolicy) else "budget"
                what = "not pruned" if budget is None else f"{kind} {budget}"
            else:
                what = self.policy.spec()
            parts.append(f"{group.describe()}: {what}")
        return "; ".join(parts)
