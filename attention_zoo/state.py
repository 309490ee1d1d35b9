"""The typed channel through which layers hand state up the stack.

A variant declares which channels it reads and writes; the stack only forwards a mapping and never
knows what is inside. Each layer gets a fresh read-only view, so nothing a later layer writes can be
seen by an earlier one, even when activation checkpointing recomputes the earlier layer.

Every channel carries rows for the *current* queries against *all* visible keys (cached and new),
so cached decoding passes the same state as a full forward pass restricted to the new rows.

A channel's layout is a tuple of the dimension names in `DIMENSIONS` (and integer literals), parsed when
it is declared; every write is checked against it with the writing layer's sizes (`check_writes`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import torch
from torch import Tensor

from .registry import did_you_mean

# The sizes a layer knows when it writes state: the only names a layout may use.
DIMENSIONS: dict[str, str] = {
    "B": "batch",
    "H": "query heads",
    "Hkv": "key/value heads",
    "Nq": "current queries (the new rows in cached decoding)",
    "Nk": "all visible keys (cached and new)",
    "D": "head dim",
}
_LAYOUT = re.compile(r"\(\s*(.*?)\s*,?\s*\)")  # "(B, H, Nq, Nk)"; "(B,)" and "()" too


def parse_layout(name: str, shape: str) -> tuple[str | int, ...]:
    """'(B, H, Nq, Nk)' -> ('B', 'H', 'Nq', 'Nk'); '(B, 1, Nq, Nk)' -> ('B', 1, 'Nq', 'Nk').

    Raises ValueError naming the channel, the layout and the valid names when `shape` is not a
    parenthesised, comma-separated tuple of names from DIMENSIONS and positive integers."""
    valid = f"valid: {', '.join(DIMENSIONS)} and positive integers, e.g. '(B, H, Nq, Nk)'"
    match = _LAYOUT.fullmatch(shape.strip()) if isinstance(shape, str) else None
    if match is None:
        raise ValueError(f"state channel {name!r}: layout {shape!r} is not a parenthesised, comma-separated "
                         f"tuple of dimension names; {valid}")
    dims: list[str | int] = []
    for part in match.group(1).split(",") if match.group(1) else []:
        part = part.strip()
        if part in DIMENSIONS:
            dims.append(part)
        elif re.fullmatch(r"[1-9][0-9]*", part):
            dims.append(int(part))
        else:
            raise ValueError(f"state channel {name!r}: layout {shape!r} has unknown dimension {part!r}; "
                             f"{did_you_mean(part, list(DIMENSIONS))}{valid}")
    return tuple(dims)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Channel:
    name: str
    shape: str  # layout over DIMENSIONS, e.g. "(B, H, Nq, Nk)": parsed into `dims` here, checked on every write
    # None: the compute dtype (the layer's q dtype). A floating dtype is a floor: a float64 run carries
    # float64, and a bf16 run may carry float32 sums (see `check`).
    dtype: torch.dtype | None
    doc: str
    dims: tuple[str | int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "dims", parse_layout(self.name, self.shape))
        if self.dtype is not None and not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"state channel {self.name!r}: dtype {self.dtype!r} is not a torch.dtype; give one such as "
                             "torch.float32, or None for the compute dtype")

    def check(self, value: Any, sizes: Mapping[str, int], compute_dtype: torch.dtype, who: str) -> None:
        """Raise ValueError unless `value` (a tensor, or a structured value with .shape and .dtype such as
        ops.selection.Selection) has this layout at `sizes` (DIMENSIONS -> int) and this dtype (None: the
        compute dtype). A floating dtype may be exceeded, not undercut: float32 where bf16 is declared is
        fine, bf16 where float32 is declared is not. Shape tuples only: no device sync."""
        want = tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)
        if not isinstance(getattr(value, "dtype", None), torch.dtype) or not hasattr(value, "shape"):
            raise ValueError(f"{who} wrote state {self.name!r} as {type(value).__name__}; expected a tensor (or a "
                             f"structured value with .shape and .dtype) of layout {self.shape} = {want}")
        got = tuple(value.shape)
        dtype = compute_dtype if self.dtype is None else self.dtype
        ok_dtype = value.dtype == dtype or (
            dtype.is_floating_point and value.dtype.is_floating_point and torch.promote_types(value.dtype, dtype) == value.dtype)
        if got != want or not ok_dtype:
            raise ValueError(f"{who} wrote state {self.name!r} as {type(value).__name__} of shape {got}, "
                             f"{_name(value.dtype)}; the channel is {self.shape} = {want}, "
                             f"{_name(dtype)}{' or wider' if dtype.is_floating_point else ''}")


CHANNELS: dict[str, Channel] = {}


def declare_channel(name: str, shape: str, dtype: torch.dtype | None, doc: str) -> Channel:
    """Declare a channel once. Raises ValueError for a layout that is not a tuple over DIMENSIONS (see
    `parse_layout`), or when the name is already declared with another meaning."""
    ch = Channel(name, shape, dtype, doc)
    old = CHANNELS.get(name)
    if old is not None and old != ch:
        raise ValueError(f"state channel {name!r} already declared as {old}")
    CHANNELS[name] = ch
    return ch


# The built-in channels. Plug-ins may declare their own.
RESIDUAL_SCORES = declare_channel(
    "residual_scores",
    "(B, H, Nq, Nk)",
    None,
    "RealFormer's carried pre-mask scores R_l = L_l + bias_l + R_{l-1} (bias_l: the layer's own bias, e.g. a "
    "selective layer's -F_l), per query head.",
)
SELECTION_PENALTY = declare_channel(
    "selection_penalty",
    "(B, Nq, Nk)",
    torch.float32,
    "Selective attention's F (sum of earlier queries' selection scores), shared by all heads, float32, as a "
    "structured Selection (attention_zoo.ops.selection; .dense() makes the tensor).",
)


def fresh_view(state: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """A read-only snapshot of the state so far (a new mapping per layer)."""
    return MappingProxyType(dict(state))


def state_sizes(attention, batch: int, queries: int, keys: int, who: str) -> dict[str, int]:
    """The DIMENSIONS of a layer's state writes: B, Nq (the new rows), Nk (every key they see) from the stack,
    H, Hkv, D from the layer (its `shape`, and `kv_heads` where it groups k and v; else, or None, H). Raises ValueError for
    a variant without `shape` (AttentionVariant: the LayerShape it was built for)."""
    shape = getattr(attention, "shape", None)
    if shape is None:
        raise ValueError(f"{who} wrote state but has no `shape` (the LayerShape it was built for, which the "
                         "stack checks its writes against): keep it as self.shape")
    kv_heads = getattr(attention, "kv_heads", None) or shape.heads  # None (a Param's "one per query head") too
    return {"B": batch, "H": shape.heads, "Hkv": kv_heads, "Nq": queries, "Nk": keys, "D": shape.head_dim}


def check_writes(updates: Mapping[str, Any], sizes: Mapping[str, int], compute_dtype: torch.dtype, who: str) -> None:
    """Check each written value against its channel (`Channel.check`) at the writing layer's `sizes` (B, H, Hkv,
    Nq, Nk, D: in cached decoding Nq counts the new rows, Nk the cached and new keys); the stack (model.py) calls
    it on every layer's updates. Raises ValueError for a channel no `declare_channel` declared, or a value of
    the wrong layout or dtype."""
    for name, value in updates.items():
        channel = CHANNELS.get(name)
        if channel is None:
            raise ValueError(f"{who} wrote state {name!r}, which no declare_channel declared")
        channel.check(value, sizes, compute_dtype, who)


def merge(state: Mapping[str, Tensor], updates: Mapping[str, Tensor], writes: tuple[str, ...], who: str) -> dict[str, Tensor]:
    """The state after a layer: `updates` over `state`, in a new dict. Raises RuntimeError if the layer wrote a
    channel it did not declare in `writes` (the values themselves are checked by `check_writes`, just before)."""
    undeclared = set(updates) - set(writes)
    if undeclared:
        raise RuntimeError(f"{who} wrote state {sorted(undeclared)} it did not declare in `writes` {writes}")
    return {**state, **updates}
