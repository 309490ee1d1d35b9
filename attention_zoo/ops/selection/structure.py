"""What defines selective attention's penalty F, handed to a backend instead of a dense (B, Nq, Nk) bias.

Selective attention (Leviathan, Kalman, Matias, "Selective Attention Improves Transformer", ICLR 2025,
section 3) subtracts F from every head's logits, with

    S[i, j] = ReLU(scale * q_s[i] . k_s[j])  where key j is strictly earlier than query i (and j != 0 if
              BOS is protected), else 0
    F[i, j] = accumulated[j] + sum over earlier queries i' < i of S[i', j]

for the selection head's queries q_s (B, Nq, D) and keys k_s (B, Nk, D). Rows are bottom-right aligned:
with Nk - Nq cached keys, query i sits at key index Nk - Nq + i. `accumulated` (B, Nk) holds the column
sums of S over the queries a KV cache already processed (None: no cache).

A `Selection` is a weighted sum of such terms: cross-layer selective's `accumulate` mode adds its own term to
decay times the previous layer's (the cumulative sum is linear), and `share` hands the source's Selection on
as it is. The attention bias is -F, shared by every head.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class SelectionTerm:
    """One selection head's contribution weight * F (see the module docstring).

    q: (B, Nq, D) and k: (B, Nk, D), any float dtype, unscaled; scale multiplies q . k; accumulated: (B, Nk)
    float32 (float64 for float64 q), or None."""

    q: Tensor
    k: Tensor
    scale: float
    protect_bos: bool = True
    weight: float = 1.0
    accumulated: Tensor | None = None

    def __post_init__(self):
        q, k = self.q, self.k
        if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
            raise ValueError(f"selection q must be (B, Nq, D) and k (B, Nk, D), got q{tuple(q.shape)} k{tuple(k.shape)}")
        if self.q.shape[1] > self.k.shape[1]:
            raise ValueError(f"more selection queries ({self.q.shape[1]}) than keys ({self.k.shape[1]})")
        if self.accumulated is not None and tuple(self.accumulated.shape) != (self.k.shape[0], self.k.shape[1]):
            want = (self.k.shape[0], self.k.shape[1])
            raise ValueError(f"accumulated must be (B, Nk) = {want}, got {tuple(self.accumulated.shape)}")


@dataclass(frozen=True, eq=False)
class Selection:
    """F = sum of its terms; the bias every head attends with is -F. All terms share B, Nq and Nk."""

    terms: tuple[SelectionTerm, ...]

    def __post_init__(self):
        if not self.terms:
            raise ValueError("a Selection needs at least one term")
        # Compared, not hashed into a set: under torch.compile with dynamic shapes hashing a symbolic size
        # specialises it (a recompile per sequence length); a comparison only guards that the sizes agree.
        shapes = [(t.q.shape[0], t.q.shape[1], t.k.shape[1]) for t in self.terms]
        if any(shape != shapes[0] for shape in shapes[1:]):
            raise ValueError(f"selection terms disagree on (B, Nq, Nk): {sorted(set(shapes))}")

    @classmethod
    def of_head(cls, q: Tensor, k: Tensor, scale: float, *, protect_bos: bool = True,
                accumulated: Tensor | None = None) -> "Selection":
        """The Selection of one selection head: q (B, Nq, D), k (B, Nk, D)."""
        return cls((SelectionTerm(q, k, scale, protect_bos, 1.0, accumulated),))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, Nq, Nk) of F."""
        t = self.terms[0]
        return t.q.shape[0], t.q.shape[1], t.k.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """F's dtype: at least float32, never less precise than the selection q."""
        return torch.promote_types(self.terms[0].q.dtype, torch.float32)

    @property
    def requires_grad(self) -> bool:
        return any(t.q.requires_grad or t.k.requires_grad or (t.accumulated is not None and t.accumulated.requires_grad)
                   for t in self.terms)

    def scaled(self, factor: float) -> "Selection":
        """factor * F, as terms (no tensor is made)."""
        return Selection(tuple(replace(t, weight=t.weight * factor) for t in self.terms))

    def __add__(self, other: "Selection") -> "Selection":
        return Selection(self.terms + other.terms)

    def dense(self) -> Tensor:
        """F itself, (B, Nq, Nk) in `dtype`, differentiable: for what truly needs it (auxiliary losses,
        backends that take a dense bias). Built per term by the fast dense implementation."""
        from .dense import penalty

        return penalty(self)

    def dense_bias(self) -> Tensor:
        """-F as a compact head-shared bias (B, 1, Nq, Nk)."""
        from .dense import penalty

        return penalty(self, negate=True).unsqueeze(1)


def penalty_tensor(value: "Tensor | Selection") -> Tensor:
    """A `selection_penalty` state value as the dense F (B, Nq, Nk): a Selection is materialised."""
    return value.dense() if isinstance(value, Selection) else value


__all__ = ["Selection", "SelectionTerm", "penalty_tensor"]
