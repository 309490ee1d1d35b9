"""F as one dense (B, Nq, Nk) tensor, fast: for the backends that take a dense bias and for what reads F.

Per term, the selection head's F comes from the fused penalty op (a CPU-friendly blocked row cumsum
keeping a bool mask for its backward) or, on CUDA, from Triton kernels that never store the logits
(`penalty.py`, `triton.py`); terms are then weighted and summed.
"""
from __future__ import annotations

from torch import Tensor

from .structure import Selection


def penalty(selection: Selection, *, negate: bool = False, backend: str = "auto") -> Tensor:
    """F (B, Nq, Nk), or -F with `negate` (made as such: no negation pass), differentiable in every term's
    q, k and accumulated. `backend` picks the Triton kernels where it would (see `penalty_from_qk`)."""
    from .penalty import fused_selection_penalty, penalty_from_qk

    total = None
    for term in selection.terms:
        if term.accumulated is None:
            part = penalty_from_qk(term.q, term.k, scale=term.scale, protect_bos=term.protect_bos, backend=backend,
                                   negate=negate)
        else:
            logits = torch_logits(term)
            part = fused_selection_penalty(logits, protect_bos=term.protect_bos, accumulated=term.accumulated, negate=negate)
        if term.weight != 1.0:
            part = part * term.weight
        total = part if total is None else total + part
    return total


def torch_logits(term) -> Tensor:
    import torch

    return torch.einsum("bnd,bmd->bnm", term.q * term.scale, term.k)  # scaled (B, Nq, D), not the product


__all__ = ["penalty"]
