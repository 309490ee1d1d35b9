"""The math of the built-in variants as small pure functions (attention-gym style).

Layout everywhere: q (B, H, Nq, D), k and v (B, Hkv, Nk, D), H % Hkv == 0. Rows are queries, columns
keys, bottom-right aligned: with Nk - Nq cached keys, query i sits at absolute position Nk - Nq + i.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import causal_mask as _causal_mask
from .backends import dispatch
from .backends.base import group_queries as _group_queries
from .backends.math import grouped_logits as _grouped_logits
from .ops.selection import Selection
from .ops.selection.penalty import fused_selection_penalty
from .ops.separable import SeparableBias


def attention(q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | Selection | SeparableBias | None = None, causal: bool = True,
              backend: str = "auto", scale: float | None = None) -> Tensor:
    """softmax(scale q k^T + bias + causal mask) v on the chosen backend. Returns (B, H, Nq, D); a query row
    that sees no key (more queries than keys under the causal mask, or a bias of -inf over the whole row)
    gives 0 and no gradient. `bias`: broadcastable to (B, H, Nq, Nk), a structured `Selection` (the bias
    is then -F), or a `SeparableBias` (row_i + col_j per head, attended without an (Nq, Nk) tensor where it
    can be: ops/separable.py).

    Raises ValueError for tensors that are not (B, H, N, D) with matching batch and head dim and H a multiple
    of Hkv; BackendRefused when the named backend (or, under auto, every backend) refuses the call."""
    _check_layout(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return dispatch(q, k, v, bias=bias, causal=causal, scale=scale, backend=backend)


# -- building blocks for a variant's own `attend(q, k, v, bias)` -------------------------------------------------
def causal_mask(q_len: int, k_len: int, device: torch.device | str | None = None) -> Tensor:
    """Bool (Nq, Nk), True where query i may see key j: j <= k_len - q_len + i. Bottom-right aligned, so with a
    cache (k_len - q_len keys already cached) the queries are the newest tokens; q_len == k_len is the usual
    lower triangle. With q_len > k_len the first q_len - k_len rows see no key (all False). Raises ValueError for a
    negative length."""
    if q_len < 0 or k_len < 0:
        raise ValueError(f"causal_mask({q_len}, {k_len}): lengths must be >= 0")
    return _causal_mask(q_len, k_len, device)


def _check_groups(heads: int, kv_heads: int) -> None:
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")


def _check_4d(**tensors: Tensor) -> None:
    """Each tensor (B, heads, N, width), all of one batch: what the grouped helpers index by."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if any(len(shape) != 4 for shape in shapes.values()) or len({shape[0] for shape in shapes.values()}) > 1:
        raise ValueError("expected (B, heads, N, width) tensors of one batch size, got "
                         + ", ".join(f"{name} {shape}" for name, shape in shapes.items()))


def group_queries(x: Tensor, kv_heads: int) -> Tensor:
    """GQA grouping: (B, H, N, ...) -> (B, Hkv, G, N, ...), G = H // Hkv, a view (nothing copied). Query head h
    lands at [h // G, h % G], next to kv head h // G, so `einsum("bhgnd,bhmd->bhgnm", group_queries(q, Hkv), k)`
    pairs every query head with its kv head without repeating k or v. Works for q (B, H, Nq, D) and for per-head
    weights (B, H, Nq, Nk). Raises ValueError when H is not a multiple of kv_heads."""
    _check_groups(x.shape[1], kv_heads)
    return _group_queries(x, kv_heads)


def grouped_logits(q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """scale * q k^T with GQA: q (B, H, Nq, D), k (B, Hkv, Nk, D) -> (B, H, Nq, Nk), query head h against kv
    head h // (H / Hkv); no mask, no bias. scale: default D^-0.5. Raises ValueError for tensors that are not 4-D of
    one batch, head dims that differ, or H not a multiple of Hkv."""
    _check_4d(q=q, k=k)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in head dim")
    _check_groups(q.shape[1], k.shape[1])
    return _grouped_logits(q, k, q.shape[-1] ** -0.5 if scale is None else scale)


def grouped_values(weights: Tensor, v: Tensor) -> Tensor:
    """weights (B, H, Nq, Nk) times v (B, Hkv, Nk, Dv) with GQA -> (B, H, Nq, Dv), the layout `attend` returns.
    Raises ValueError for tensors that are not 4-D of one batch, a key count that differs, or H not a multiple
    of Hkv."""
    _check_4d(weights=weights, v=v)
    if weights.shape[-1] != v.shape[2]:
        raise ValueError(f"weights {tuple(weights.shape)} have {weights.shape[-1]} keys, v {tuple(v.shape)} has {v.shape[2]}")
    _check_groups(weights.shape[1], v.shape[1])
    return torch.einsum("bhgnm,bhmd->bhgnd", _group_queries(weights, v.shape[1]), v).flatten(1, 2)


def selection_scores(logits: Tensor, *, protect_bos: bool = True) -> Tensor:
    """S = ReLU(logits) with key 0 (BOS, if protected), the query itself and future keys zeroed.

    logits: (B, Nq, Nk) of the selection head. Returns (B, Nq, Nk) in float32, or float64 for
    float64 logits: at least float32 whatever the compute dtype, never less precise than it. Excluded
    entries are 0 whatever the logit there, +-inf included. Raises nothing of its own.
    """
    Nq, Nk = logits.shape[-2:]
    strictly_earlier = _causal_mask(Nq, Nk - 1, logits.device)  # j < own position, as (Nq, Nk - 1)
    keep = F.pad(strictly_earlier, (0, 1), value=False)  # (Nq, Nk): j <= pos - 1
    if protect_bos:
        keep[:, 0] = False
    # selected, not multiplied by the mask: an infinite logit at an excluded key would give inf * 0 = NaN
    return torch.relu(logits.to(torch.promote_types(logits.dtype, torch.float32))).masked_fill(~keep, 0.0)


def selection_penalty(logits: Tensor, *, protect_bos: bool = True, accumulated: Tensor | None = None) -> Tensor:
    """F[i, j] = sum over strictly earlier queries k < i of S[k, j] (+ what a cache accumulated).

    The sum runs along the *query* axis (shift one row down, cumulative sum over rows). logits:
    (B, Nq, Nk) of the selection head; accumulated: (B, Nk) float32 column sums of S over queries
    already processed (the selective KV cache), or None. Returns (B, Nq, Nk) in at least float32, non-decreasing
    along queries. Raises nothing of its own (torch raises for an `accumulated` that does not broadcast).
    """
    # The same values as penalty_from_scores(selection_scores(...)) from one fused autograd op: a fast
    # row cumsum, and a bool mask kept for the backward instead of S (see ops/selection/penalty.py).
    return fused_selection_penalty(logits, protect_bos=protect_bos, accumulated=accumulated)


def penalty_from_scores(S: Tensor, accumulated: Tensor | None = None) -> Tensor:
    """Exclusive cumulative sum of S (B, Nq, Nk) over queries (rows), plus the cache's accumulated (B, Nk) column
    sums. Raises nothing of its own."""
    Fpen = F.pad(S.cumsum(dim=-2)[..., :-1, :], (0, 0, 1, 0))  # row i: sum of rows k < i
    return Fpen if accumulated is None else Fpen + accumulated[:, None, :]


def selection_logits(q: Tensor, k: Tensor, selection_head: int, scale: float | None = None) -> Tensor:
    """Logits of one query head against its kv head: (B, Nq, Nk). Only this head is computed. Raises ValueError
    for a selection head outside [0, H)."""
    _check_selection_head(q, selection_head)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    qs = q[:, selection_head] * scale  # (B, Nq, D): scaled here, not the (B, Nq, Nk) product
    ks = k[:, selection_head // group]  # (B, Nk, D)
    return torch.einsum("bnd,bmd->bnm", qs, ks)


def selective_attention(q: Tensor, k: Tensor, v: Tensor, *, selection_head: int = 0, protect_bos: bool = True,
                        backend: str = "auto", scale: float | None = None) -> Tensor:
    """Every head attends with softmax(L^h - F + mask); F from `selection_head` (Leviathan et al., ICLR 2025,
    section 3), handed to the backend as a structured Selection: sdpa never makes the (B, Nq, Nk) F.
    Returns (B, H, Nq, D). Raises ValueError as `attention` does and for a selection head outside [0, H);
    BackendRefused as `attention` does."""
    _check_layout(q, k, v)
    _check_selection_head(q, selection_head)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    selection = Selection.of_head(q[:, selection_head], k[:, selection_head // group], scale, protect_bos=protect_bos)
    return attention(q, k, v, bias=selection, causal=True, backend=backend, scale=scale)


def _check_selection_head(q: Tensor, selection_head: int) -> None:
    if not 0 <= selection_head < q.shape[1]:
        raise ValueError(f"selection_head must be in [0, {q.shape[1]}), got {selection_head}")


def _check_layout(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected 4-D (B, H, N, D) tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")


__all__ = ["attention", "SeparableBias", "selective_attention", "selection_penalty", "selection_scores", "selection_logits",
           "penalty_from_scores", "causal_mask", "group_queries", "grouped_logits", "grouped_values"]
