"""A separable bias, bias[i, j] = row_i + col_j per head, attended without a (B, H, Nq, Nk) tensor.

Biases made of one term per query and one per key are common: ALiBi's -m (i - j) = -m i + m j (Press et al.,
ICLR 2022), Forgetting Attention's c_i - c_j with c the running sum of log forget gates (Lin et al., ICLR 2025).
Handed to a backend as a dense tensor they cost (B, H, Nq, Nk) memory, and training one that requires grad
takes the backends' bias-gradient path.

Under softmax the row term changes nothing: it adds one constant to every score of row i, so the weights,
and the gradient that reaches it, are those of the column term alone. The column term folds into the dot
product the kernel already computes. With G = H / Hkv query heads per kv head and e_g the one-hot vector of
query head h's place g = h mod G in its group,

    [scale q_h, e_g] . [k, col_{group 0}, ..., col_{group G-1}] = scale q_h k^T + col_h,

so attention with a bias becomes plain attention at scale 1 with a q/k head dim of D + G (D + 1 when the column
term is shared by the heads, or H == Hkv) and v as it is (the scale goes into q, so any scale, 0 included,
folds): any fused kernel runs it, gradients reach `col` through k's extra columns, and nothing (Nq, Nk)-sized
is made.

Precision: the folded column holds col_j itself, not row_i + col_j, which is small where the weights are large,
and the kernel's dot product adds it to q . k: a logit then carries an absolute error up to about the spacing of
the dtype at max |col| (float32: 6e-5 at |col| = 1000, 1e-3 at 16000; float64: 1e-13 at 1000). That is what a
dense float32 bias c_i - c_j carries when c itself is a float32 running sum (Forgetting Attention's); an exact
col (ALiBi's integers) or one computed in float64 is more precise dense. In bf16 or fp16 (8 or 11 mantissa bits)
the error would be whole units at |col| ~ 100, so half-precision calls take the dense bias or a backend that
reads the column in float32 (triton); `backends.fold_plan` decides and says why.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# dtypes the fold is used in (see the module docstring's precision paragraph)
FOLDABLE_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class SeparableBias:
    """bias[b, h, i, j] = row[b, h, i] + col[b, h, j], added to the scores of a causal softmax attention.

    col: (B or 1, H or 1, Nk), one term per key (cached keys included, in the order of k); row: (B or 1, H or 1,
    Nq) or None (one term per query; softmax ignores it, so it matters only to `dense()`, to a variant's own
    non-softmax `attend`, and to the precision of a half-precision dense bias: c_i - c_j is small where the
    weights are large). Floating tensors on q's device; a size-1 batch or head dim broadcasts. col may hold -inf
    (a masked key); row must be finite (a folded call never reads it, so a -inf row would not mask its query).
    Shapes, dtypes and devices are checked against q and k by `check` (dispatch calls it): ValueError."""

    col: Tensor
    row: Tensor | None = None

    @property
    def requires_grad(self) -> bool:
        return any(isinstance(t, Tensor) and t.requires_grad for t in (self.col, self.row))

    @property
    def dtype(self) -> torch.dtype:
        return self.col.dtype

    def check(self, q: Tensor, k: Tensor) -> None:
        """Raise ValueError unless col is (B|1, H|1, Nk) and row (B|1, H|1, Nq) for q (B, H, Nq, D), k (B, Hkv, Nk, D)."""
        B, H, Nq = q.shape[:3]
        for name, term, length in (("col", self.col, k.shape[2]), ("row", self.row, Nq)):
            if term is None and name == "row":
                continue
            ok = (isinstance(term, Tensor) and term.dim() == 3 and term.shape[0] in (1, B) and term.shape[1] in (1, H)
                  and term.shape[2] == length and term.is_floating_point() and term.device == q.device)
            if not ok:
                got = (f"{tuple(term.shape)} {str(term.dtype).removeprefix('torch.')} on {term.device}"
                       if isinstance(term, Tensor) else type(term).__name__)
                keys = " (one term per key, cached keys included)" if name == "col" else ""
                raise ValueError(f"SeparableBias.{name} must be a floating (B or 1, H or 1, {length}) tensor{keys} on "
                                 f"{q.device} for q {tuple(q.shape)} and k {tuple(k.shape)} (B {B}, H {H}); got {got}")

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The bias itself, (B|1, H|1, Nq, Nk), differentiable; in `dtype` (default: col's), the sum formed in
        col's dtype first, so a half-precision bias rounds c_i - c_j, not c_i and c_j."""
        out = self.col[..., None, :] if self.row is None else self.row[..., :, None] + self.col[..., None, :]
        return out if dtype is None else out.to(dtype)

    def fold_width(self, heads: int, kv_heads: int) -> int:
        """The columns `fold` adds to the q/k head dim: G = H / Hkv for a per-head col, else 1."""
        return heads // kv_heads if self.col.shape[1] > 1 and heads != kv_heads else 1


def fold(q: Tensor, k: Tensor, bias: SeparableBias, scale: float, head_dim: int | None = None) -> tuple[Tensor, Tensor]:
    """q (B, H, Nq, D), k (B, Hkv, Nk, D) -> q' (B, H, Nq, D'), k' (B, Hkv, Nk, D'), D' = D + W (W =
    bias.fold_width) or `head_dim` if given (>= D + W; the rest zeros, for kernels that want a multiple of 8),
    such that softmax(q' k'^T + mask) = softmax(scale q k^T + bias + mask) (the module docstring): attend with the
    folded pair at scale 1. In q's dtype; differentiable in q, k and bias.col (the row term is dropped: softmax
    gives it no weight or gradient).
    A -inf in col (a masked key) is folded as the dtype's most negative number, since the one-hot selector's zeros
    times -inf would be NaN; a query all of whose keys are masked then needs its output zeroed (`sees_a_key`).
    Raises ValueError for a head_dim below D + W."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    width = bias.fold_width(H, Hkv)
    pad = 0 if head_dim is None else head_dim - D - width
    if pad < 0:
        raise ValueError(f"head_dim {head_dim} is below the folded width {D} + {width}")
    G = H // Hkv
    col = bias.col.to(q.dtype).clamp_min(torch.finfo(q.dtype).min)
    if width == 1:  # one column: the term is shared by the heads, or each query head has its own kv head
        col = col.expand(B, Hkv, Nk)[..., None]  # (B, Hkv, Nk, 1)
        selector = q.new_ones(B, H, Nq, 1)
    else:  # column g of kv head h holds query head h * G + g's term; query head h * G + g reads only column g
        col = col.expand(B, H, Nk).unflatten(1, (Hkv, G)).transpose(-1, -2)  # (B, Hkv, Nk, G)
        selector = torch.eye(G, dtype=q.dtype, device=q.device).repeat(Hkv, 1)  # (H, G): row h is e_{h mod G}
        selector = selector[None, :, None, :].expand(B, H, Nq, G)
    if pad:  # zero columns add nothing to q' . k'
        selector, col = torch.nn.functional.pad(selector, (0, pad)), torch.nn.functional.pad(col, (0, pad))
    return torch.cat([q * scale, selector], dim=-1), torch.cat([k, col], dim=-1)


def sees_a_key(bias: SeparableBias, q_len: int, k_len: int, causal: bool) -> Tensor:
    """Bool (B|1, H|1, Nq, 1): whether query i sees a key that col does not mask (-inf), causal bottom-right
    aligned. A folded -inf is the dtype's most negative finite number, so a query whose every visible key is
    masked gets an ordinary softmax over them from the kernel; the dense bias gives it 0, as a row that sees no
    key gets, and the folded output is zeroed where this is False to agree. No host sync (a cumulative count)."""
    unmasked = torch.nn.functional.pad((bias.col > float("-inf")).cumsum(-1), (1, 0))  # [..., j]: keys < j unmasked
    last = torch.arange(q_len, device=bias.col.device) + (k_len - q_len + 1) if causal else \
        torch.full((q_len,), k_len, device=bias.col.device)  # keys each query sees: [0, last)
    return (unmasked[..., last.clamp(0, k_len)] > 0)[..., None]


__all__ = ["SeparableBias", "fold", "sees_a_key", "FOLDABLE_DTYPES"]
