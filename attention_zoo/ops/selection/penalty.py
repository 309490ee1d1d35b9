"""Selective attention's penalty F as one fused autograd op, cheap in time and memory on CPU and GPU.

F[i, j] = sum over earlier queries k < i of S[k, j], S = ReLU(L) with BOS (optionally), the query
itself and future keys zeroed: `functional.penalty_from_scores(functional.selection_scores(L))`,
computed differently:

- The exclusive cumulative sum runs down the rows of a row-major (B, Nq, Nk) tensor, which torch's
  cumsum does with strided reads (and two flips in the backward). Here the rows of all blocks of 64 are
  walked together, each step vectorised over every block and column, plus a prefix sum over the block
  totals: several times faster on CPU (docs/benchmarks.md, "Measurements behind the code's constants").
- Autograd of the unfused chain keeps ReLU's float output, (B, Nq, Nk) per layer; this op keeps a bool
  mask (a quarter of it) and makes two float buffers instead of five.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

ROW_BLOCK = 64  # rows walked per block (two vectorised ops each); the block totals are then prefix-summed


def selection_keep(q_len: int, k_len: int, protect_bos: bool, device) -> Tensor:
    """Bool (Nq, Nk): keys a query may penalise: strictly earlier than itself, and not BOS if protected."""
    i = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)  # absolute query positions
    j = torch.arange(k_len, device=device)[None, :]
    keep = j < i
    if protect_bos:
        keep[:, 0] = False
    return keep


def exclusive_row_cumsum(x: Tensor, reverse: bool = False, negate: bool = False) -> Tensor:
    """out[..., i, :] = sum of x[..., k, :] over k < i (reverse: over k > i), for (B, N, M) x; with
    `negate`, minus that sum, at no extra cost on CPU.

    The rows of every block of ROW_BLOCK rows are walked together: each step writes the running sums
    of all blocks and columns at once, then adds that row. The exclusive prefix of the block totals
    then adds what earlier (reverse: later) blocks hold. Returns a new tensor with x's dtype.
    """
    if x.device.type != "cpu":  # GPU scans are fast; the walk below would be 2 * ROW_BLOCK tiny launches
        if reverse:
            out = F.pad(x.flip(1).cumsum(1).flip(1)[:, 1:], (0, 0, 0, 1))
        else:
            out = F.pad(x.cumsum(1)[:, :-1], (0, 0, 1, 0))
        return out.neg_() if negate else out
    B, N, M = x.shape
    b = min(ROW_BLOCK, N)
    pad = -N % b
    if pad:  # zero rows at the end add nothing in either direction
        x = F.pad(x, (0, 0, 0, pad))
    blocks = x.view(B, -1, b, M)  # (B, nb, b, M)
    out = torch.empty_like(blocks)
    running = torch.zeros(B, blocks.shape[1], M, dtype=x.dtype, device=x.device)
    for r in (range(b - 1, -1, -1) if reverse else range(b)):
        out[:, :, r] = running
        if negate:
            running -= blocks[:, :, r]
        else:
            running += blocks[:, :, r]
    if reverse:  # running now holds each block's total
        before = F.pad(running.flip(1).cumsum(1).flip(1)[:, 1:], (0, 0, 0, 1))
    else:
        before = F.pad(running.cumsum(1)[:, :-1], (0, 0, 1, 0))
    out += before.unsqueeze(2)
    out = out.view(B, -1, M)
    return out[:, :N] if pad else out


class SelectionPenalty(torch.autograd.Function):
    """logits (B, Nq, Nk), keep (Nq, Nk) bool, accumulated (B, Nk) or None, negate -> F (B, Nq, Nk), or -F
    with `negate` (the attention bias itself, for no negation pass in either direction)."""

    @staticmethod
    def forward(ctx, logits: Tensor, keep: Tensor, accumulated: Tensor | None, negate: bool = False) -> Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)  # never less precise than float32
        # S, excluded entries selected to 0 in place: multiplying by the mask would turn an infinite logit
        # at an excluded (future) key into NaN, which the cumulative sum carries into visible entries.
        scores = torch.relu(logits.to(dtype)).masked_fill_(~keep, 0.0)
        active = scores > 0  # where S = L; elsewhere S = 0 and so is its gradient
        penalty = exclusive_row_cumsum(scores, negate=negate)
        del scores
        if accumulated is not None:
            penalty.add_(accumulated[:, None, :].to(dtype), alpha=-1 if negate else 1)
        ctx.save_for_backward(active)
        ctx.logits_dtype = logits.dtype
        ctx.accumulated_dtype = None if accumulated is None else accumulated.dtype
        ctx.negate = negate
        return penalty

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (active,) = ctx.saved_tensors
        dlogits = dacc = None
        if ctx.needs_input_grad[0]:  # dS[k] = sum of dF[i] over i > k (dF = -grad when the output was -F)
            dscores = exclusive_row_cumsum(grad, reverse=True, negate=ctx.negate)
            dlogits = dscores.masked_fill_(~active, 0.0).to(ctx.logits_dtype)
        if ctx.needs_input_grad[2]:
            dacc = grad.sum(dim=1).mul_(-1 if ctx.negate else 1).to(ctx.accumulated_dtype)
        return dlogits, None, dacc, None


class TritonSelectionPenalty(torch.autograd.Function):
    """q_s (B, Nq, D), k_s (B, Nk, D) -> F (B, Nq, Nk) float32, or -F with `negate`, with the Triton kernels
    of `ops/selection/triton.py`: L and S are never stored, in the forward or the backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, scale: float, protect_bos: bool, negate: bool = False) -> Tensor:
        from .triton import penalty_forward

        ctx.save_for_backward(q, k)
        ctx.scale, ctx.protect_bos, ctx.negate = scale, protect_bos, negate
        return penalty_forward(q.detach(), k.detach(), scale=scale, protect_bos=protect_bos, negate=negate)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        from .triton import penalty_backward

        q, k = ctx.saved_tensors
        dq, dk = penalty_backward(q, k, grad, scale=ctx.scale, protect_bos=ctx.protect_bos, negate=ctx.negate)
        return dq.to(q.dtype), dk.to(k.dtype), None, None, None


def triton_penalty_refusal(q: Tensor, k: Tensor, backend: str) -> str | None:
    """Why F is not computed by the Triton kernels for this call (None: it is). They run where the triton
    backend would (`backend: triton`, or `auto` on CUDA), with `flex` on CUDA (its kernels are Triton's
    too, and its benchmark should differ from triton's in the attention alone), and only where the triton
    backend refuses nothing of q's dtype and size."""
    from ...backends import BACKENDS, AttentionCall

    if backend not in ("auto", "triton", "flex"):
        return f"backend {backend!r} is named"
    if backend in ("auto", "flex") and q.device.type != "cuda":
        return f"{backend} uses Triton on CUDA only"
    call = AttentionCall(device=q.device.type, dtype=q.dtype, heads=1, kv_heads=1, head_dim=q.shape[-1], q_len=q.shape[1],
                         k_len=k.shape[1])
    return BACKENDS.get("triton").refuse(call)


def penalty_from_qk(q: Tensor, k: Tensor, *, scale: float, protect_bos: bool = True, backend: str = "auto",
                    negate: bool = False) -> Tensor:
    """F (B, Nq, Nk) from the selection head's queries (B, Nq, D) and keys (B, Nk, D), or -F with `negate`:
    fused Triton kernels where `triton_penalty_refusal` allows, else the logits and `fused_selection_penalty`."""
    if triton_penalty_refusal(q, k, backend) is None:
        return TritonSelectionPenalty.apply(q, k, scale, protect_bos, negate)
    logits = torch.einsum("bnd,bmd->bnm", q * scale, k)  # scaled (B, Nq, D), not the (B, Nq, Nk) product
    return fused_selection_penalty(logits, protect_bos=protect_bos, negate=negate)


def fused_selection_penalty(logits: Tensor, *, protect_bos: bool = True, accumulated: Tensor | None = None,
                            negate: bool = False) -> Tensor:
    """F from the selection head's logits (B, Nq, Nk), exactly `penalty_from_scores(selection_scores(...))`
    up to summation order; float32 (float64 for float64 logits). With `negate`, -F."""
    keep = selection_keep(logits.shape[-2], logits.shape[-1], protect_bos, logits.device)
    return SelectionPenalty.apply(logits, keep, accumulated, negate)


__all__ = [
    "fused_selection_penalty", "penalty_from_qk", "TritonSelectionPenalty", "triton_penalty_refusal",
    "exclusive_row_cumsum", "selection_keep", "SelectionPenalty"
]
