"""Positional schemes: learned absolute embeddings (GPT-2), rotary (RoPE) and none (NoPE).

A scheme may act in two places, and the stack calls both without knowing which it is:
- `embed(x, positions)`: on the token embeddings (learned positions add a table row);
- `rotate(q, k, positions)`: on every layer's q and k before the cache stores k (RoPE).
Whatever the scheme needs per forward (RoPE's cos and sin) is computed once in `prepare` and travels to
every layer inside `Positions`, so no layer recomputes it and no layer syncs with the host.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..variant import Param
from .base import Component, ComponentKind, StackShape

POSITIONS: ComponentKind = ComponentKind("position", "attention_zoo.positions", __name__,
                                         "how token positions enter the model")
register_position = POSITIONS.register


@dataclass(frozen=True)
class Positions:
    """The absolute positions of the tokens in this forward, handed from the stack to every layer.

    index: (B, N) int64, absolute positions (with a cache: they continue from what it has seen).
    tables: what the scheme precomputed for them in `prepare` (RoPE: cos and sin, (B, 1, N, head_dim)).
    """

    index: Tensor
    scheme: "PositionalScheme | None" = None
    tables: tuple[Tensor, ...] = field(default=())

    def rotate(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """q (B, H, N, D), k (B, Hkv, N, D) transformed by the scheme (identity for most). RoPE also rotates heads
        of an even width dividing D, each as a head of that width (RotaryPositions.rotate)."""
        return (q, k) if self.scheme is None else self.scheme.rotate(q, k, self)

    @classmethod
    def plain(cls, batch: int, length: int, start: int = 0, device: torch.device | str | None = None) -> "Positions":
        """Positions start..start+length-1 with no scheme: what a layer gets when called on its own."""
        return cls(torch.arange(start, start + length, device=device).expand(batch, length))


class PositionalScheme(Component, nn.Module):
    """Base class: no effect anywhere. Subclasses override `embed`, or `prepare` and `rotate`.

    max_positions: the largest sequence the scheme can encode (learned tables), or None (no cap).
    """

    max_positions: int | None = None

    def __init__(self, shape: StackShape):
        super().__init__()

    def embed(self, x: Tensor, index: Tensor) -> Tensor:
        """x (B, N, dim) token embeddings at positions index (B, N) -> (B, N, dim)."""
        return x

    def prepare(self, index: Tensor, dtype: torch.dtype) -> Positions:
        """Once per forward: the Positions every layer receives."""
        return Positions(index, self)

    def rotate(self, q: Tensor, k: Tensor, positions: Positions) -> tuple[Tensor, Tensor]:
        return q, k


@register_position("none")
class NoPositions(PositionalScheme):
    """NoPE: no positional information beyond the causal mask (Kazemnejad et al., 2023)."""


@register_position("learned")
class LearnedPositions(PositionalScheme):
    """GPT-2's learned absolute embeddings: x + table[position]. Positions end at model.max_seq_len."""

    def __init__(self, shape: StackShape):
        super().__init__(shape)
        self.max_positions = shape.max_seq_len
        self.weight = nn.Parameter(torch.empty(shape.max_seq_len, shape.dim))
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def embed(self, x: Tensor, index: Tensor) -> Tensor:
        return x + self.weight[index]


def _theta_check(value: float, shape) -> str | None:
    return None if value > 1 else "must be > 1 (RoPE's base wavelength)"


ROPE_THETA = Param(float, 10000.0, "RoPE base: inv_freq_i = rope_theta^(-2i/head_dim)", check=_theta_check)


def _for_width(table: Tensor, width: int) -> Tensor:
    """A (..., D) cos or sin table of angles (a, a), a_i = p * theta^(-2i/D), as the table for heads of `width`:
    a_j for width w is a_{j D/w} (theta^(-2j/w) = theta^(-2 (j D/w) / D)), j < w/2."""
    D = table.shape[-1]
    if width == D:
        return table
    if width % 2 or width <= 0 or D % width:
        raise ValueError(f"rope rotates heads of width {D} or an even width dividing it; got width {width}")
    half = table[..., : D // 2 : D // width]  # (..., w/2)
    return torch.cat((half, half), dim=-1)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension: pairs dimension i with i + D/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@register_position("rope")
class RotaryPositions(PositionalScheme):
    """RoPE (Su et al., "RoFormer", 2021), rotate-half convention as Llama's: q, k rotated by position.

    As in transformers' Llama and GPT-NeoX, dimension i is rotated together with i + D/2 by the angle
    position * rope_theta^(-2i/D), i < D/2. q and k of every head are rotated; v is not.

    RoFormer's own form pairs (2i, 2i + 1) instead: the same rotation up to a fixed permutation of the head
    dimension, which is why Llama weights load here unchanged.
    """

    params = {"rope_theta": ROPE_THETA}

    @classmethod
    def check_shape(cls, shape: StackShape) -> str | None:
        return None if shape.head_dim % 2 == 0 else f"rope rotates pairs of dimensions: head_dim ({shape.head_dim}) must be even"

    def __init__(self, shape: StackShape, rope_theta: float = 10000.0):
        super().__init__(shape)
        if message := self.check_shape(shape):
            raise ValueError(message)
        self.theta = float(rope_theta)
        self.head_dim = shape.head_dim

    def inv_freq(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """rope_theta^(-2i/D) for i < D/2, (D/2,). Computed as transformers does (an int64 arange turned
        float32), so imported Llama logits match; in float64 when the model runs in float64."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).to(dtype) / self.head_dim
        return 1.0 / (self.theta ** exponents)

    def prepare(self, index: Tensor, dtype: torch.dtype) -> Positions:
        table_dtype = torch.promote_types(dtype, torch.float32)  # float32 tables even for bf16 activations
        angles = index[..., None].to(table_dtype) * self.inv_freq(table_dtype, index.device)  # (B, N, D/2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, N, D): head-broadcast
        return Positions(index, self, (angles.cos(), angles.sin()))

    def rotate(self, q: Tensor, k: Tensor, positions: Positions) -> tuple[Tensor, Tensor]:
        """q (B, H, N, w), k (B, Hkv, N, w) rotated as heads of width w: w is the stack's head_dim D, or an even
        width dividing it for a variant that attends with narrower heads (differential attention's halves), whose
        angles position * rope_theta^(-2j/w) are every (D/w)-th of the tables'. Raises ValueError for another w."""
        # cos and sin in q's dtype (under autocast q is bf16 while the tables are float32: keep it bf16)
        cos, sin = (_for_width(t, q.shape[-1]).to(q.dtype) for t in positions.tables)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def extra_repr(self) -> str:
        return f"theta={self.theta:g}"


__all__ = ["POSITIONS", "Positions", "PositionalScheme", "register_position", "NoPositions", "LearnedPositions",
           "RotaryPositions", "rotate_half"]
