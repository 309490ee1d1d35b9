"""The typed channel through which layers hand state up the stack.

A variant declares which channels it reads and writes; the stack only forwards a mapping and never
knows what is inside. Each layer gets a fresh read-only view, so nothing a later layer writes can be
seen by an earlier one, even when activation checkpointing recomputes the earlier layer.

Every channel carries rows for the *current* queries against *all* visible keys (cached and new),
so cached decoding passes the same state as a full forward pass restricted to the new rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import torch
from torch import Tensor


@dataclass(frozen=True)
class Channel:
    name: str
    shape: str  # documented layout, checked by `check`
    dtype: torch.dtype | None  # None: follows the compute dtype
    doc: str

    def check(self, value: Tensor, batch: int, heads: int, queries: int, keys: int) -> None:
        want = {
            "(B, H, Nq, Nk)": (batch, heads, queries, keys),
            "(B, Nq, Nk)": (batch, queries, keys),
        }[self.shape]
        if tuple(value.shape) != want:  # a structured value (ops.selection.Selection) has .shape and .dtype too
            raise ValueError(f"state {self.name!r}: expected shape {self.shape} = {want}, got {tuple(value.shape)}")
        if self.dtype is not None and value.dtype != self.dtype:
            raise ValueError(f"state {self.name!r}: expected dtype {self.dtype}, got {value.dtype}")


CHANNELS: dict[str, Channel] = {}


def declare_channel(name: str, shape: str, dtype: torch.dtype | None, doc: str) -> Channel:
    """Declare a channel once; declaring the same name with another meaning is an error."""
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
    "RealFormer's carried pre-mask scores R_l = L_l + R_{l-1}, per query head.",
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


def merge(state: Mapping[str, Tensor], updates: Mapping[str, Tensor], writes: tuple[str, ...], who: str) -> dict[str, Tensor]:
    undeclared = set(updates) - set(writes)
    if undeclared:
        raise RuntimeError(f"{who} wrote state {sorted(undeclared)} it did not declare in `writes` {writes}")
    return {**state, **updates}
