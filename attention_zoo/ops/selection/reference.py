"""The naive reference of the selection op: F materialised from the equations, then plain attention.

Written for clarity, not speed: (B, Nq, Nk) logits, S and F are all made. The `math` backend runs it, and
the tests compare the blocked and Triton implementations with it. Equations: Leviathan, Kalman, Matias,
"Selective Attention Improves Transformer" (ICLR 2025), section 3; see `structure.py`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as tF
from torch import Tensor

from .structure import Selection, SelectionTerm


def keep_mask(q_len: int, k_len: int, protect_bos: bool, device) -> Tensor:
    """Bool (Nq, Nk): True where query i may penalise key j: j strictly earlier than i's own key index
    (bottom-right aligned, k_len - q_len cached keys), and j != 0 when BOS is protected."""
    i = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    j = torch.arange(k_len, device=device)[None, :]
    keep = j < i
    if protect_bos:
        keep = keep & (j > 0)
    return keep


def scores(term: SelectionTerm) -> Tensor:
    """S (B, Nq, Nk) of one term, in at least float32: ReLU'd logits where kept, exactly 0 elsewhere."""
    dtype = torch.promote_types(term.q.dtype, torch.float32)
    logits = torch.einsum("bnd,bmd->bnm", term.q.to(dtype), term.k.to(dtype)) * term.scale
    keep = keep_mask(term.q.shape[1], term.k.shape[1], term.protect_bos, term.q.device)
    return torch.where(keep, torch.relu(logits), torch.zeros((), dtype=dtype, device=logits.device))


def penalty(selection: Selection) -> Tensor:
    """F (B, Nq, Nk): per term, weight * (accumulated + exclusive cumulative sum of S over queries)."""
    total = None
    for term in selection.terms:
        S = scores(term)
        F = tF.pad(S.cumsum(dim=1)[:, :-1], (0, 0, 1, 0))  # row i: sum of rows i' < i (along queries, not keys)
        if term.accumulated is not None:
            F = F + term.accumulated[:, None, :].to(F.dtype)
        F = F * term.weight
        total = F if total is None else total + F
    return total


def selective_attention(q: Tensor, k: Tensor, v: Tensor, selection: Selection, *, causal: bool, scale: float) -> Tensor:
    """softmax(scale q k^T - F + causal mask) v with F from `penalty`: q (B, H, Nq, D), k and v (B, Hkv, Nk, D)."""
    from ...backends.math import math_attention

    bias = -penalty(selection)[:, None]  # (B, 1, Nq, Nk): one F for every head
    return math_attention(q, k, v, bias=bias, causal=causal, scale=scale)


__all__ = ["keep_mask", "scores", "penalty", "selective_attention"]
