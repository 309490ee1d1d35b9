"""Selective attention's penalty F straight from the selection head's q and k, in Triton.

    L = scale q_s k_s^T                      (B, Nq, Nk), never stored
    S = ReLU(L) where key j < query i (and j != 0 with protect_bos), else 0
    F[i, j] = sum over k < i of S[k, j]      (B, Nq, Nk) float32, the one tensor written (or -F,
                                             the attention's bias, when asked: one multiply)

The PyTorch path (`functional.selection_logits` then `ops/selection/penalty.py`) makes L, S, the row
cumulative sum and its mask as separate (B, N, N) passes, each more memory traffic than the attention
kernels' own at 4096 tokens. Here one program per (key block, batch element) walks the query blocks
top to bottom with the running column sums of S in registers, so L and S live only as tiles:

- forward: F tile = running + exclusive cumsum of the S tile down its rows; running += its column sums.
- backward: dS[k, j] = sum over i > k of dF[i, j] walks the query blocks bottom to top the same way;
  dL = dS where S was active (L recomputed from q_s, k_s: one small matmul instead of a stored mask);
  dk_s is accumulated in registers, dq_s added with atomics (other key blocks add into the same rows).

Tiles of queries that see none of the block's keys (the causal future) get F = 0 without a matmul.
Tested on CPU through Triton's interpreter against `functional.penalty_from_scores(selection_scores(..))`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...backends.triton_tiles import cols_tile, dot, exclusive_rows, first_query_block, reverse_exclusive_rows, rows_tile
from ...backends.triton_tuning import PENALTY_CONFIGS, head_block, tuned


@triton.jit
def _selection_tile(q, kt, offs_m, offs_n, rows, cols, offset, qk_scale, PROTECT_BOS: tl.constexpr, FP32_DOT: tl.constexpr):
    """S (masked ReLU'd logits) of one tile, and where it is active (S = L > 0)."""
    logits = dot(q, kt, FP32_DOT) * qk_scale
    keep = rows[:, None] & cols[None, :] & (offs_n[None, :] < offs_m[:, None] + offset)  # strictly earlier keys
    if PROTECT_BOS:
        keep = keep & (offs_n[None, :] != 0)
    active = keep & (logits > 0.0)
    return tl.where(active, logits, 0.0), active


@triton.jit
def _key_program(K, skb, skn, skd, Nq, Nk, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """What a program over (key block, batch element) works on: its batch element, the block's key offsets
    and in-bounds masks, k^T, the causal offset (query i sits at absolute position i + Nk - Nq) and the
    first query block with any S (queries at or before the block's first key see none of its keys as
    earlier: their F is 0). Key blocks ascend, which is heaviest first: early keys precede most queries."""
    n_block = tl.program_id(0)
    b = tl.program_id(1)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = offs_n < Nk
    dims = offs_d < HEAD_DIM
    kt = cols_tile(K + b * skb, offs_n, cols, skn, offs_d, dims, skd)
    offset = Nk - Nq
    return b, offs_n, cols, offs_d, dims, kt, offset, first_query_block(n_block * BLOCK_N - offset + 1, Nq, BLOCK_M)


@tuned(PENALTY_CONFIGS)
@triton.jit
def _penalty_forward(Q, K, Fpen, sqb, sqm, sqd, skb, skn, skd, sfb, sfm, sfn,
                     Nq, Nk, qk_scale, sign, HEAD_DIM: tl.constexpr,
                     PROTECT_BOS: tl.constexpr, FP32_DOT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b, offs_n, cols, offs_d, dims, kt, offset, first_block = _key_program(K, skb, skn, skd, Nq, Nk, HEAD_DIM,
                                                                          BLOCK_M, BLOCK_N, BLOCK_D)
    lo = first_block * BLOCK_M
    zeros = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start_m in range(0, lo, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        tl.store(Fpen + b * sfb + offs_m[:, None] * sfm + offs_n[None, :] * sfn, zeros,
                 mask=(offs_m < Nq)[:, None] & cols[None, :])
    running = tl.zeros([BLOCK_N], tl.float32)  # column sums of S over the rows above
    for start_m in range(lo, Nq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows = offs_m < Nq
        q = rows_tile(Q + b * sqb, offs_m, rows, sqm, offs_d, dims, sqd)
        s, active = _selection_tile(q, kt, offs_m, offs_n, rows, cols, offset, qk_scale, PROTECT_BOS, FP32_DOT)
        tile = running[None, :] + exclusive_rows(s)  # rows strictly above, inside the tile too (+inf safe)
        tl.store(Fpen + b * sfb + offs_m[:, None] * sfm + offs_n[None, :] * sfn, tile * sign,
                 mask=rows[:, None] & cols[None, :])
        running += tl.sum(s, axis=0)


@tuned(PENALTY_CONFIGS, reset_to_zero=["DQ"])  # dq is added into atomically
@triton.jit
def _penalty_backward(Q, K, DF, DQ, DK, sqb, sqm, sqd, skb, skn, skd, sgb, sgm, sgn,
                      Nq, Nk, qk_scale, scale, sign, HEAD_DIM: tl.constexpr,
                      PROTECT_BOS: tl.constexpr, FP32_DOT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b, offs_n, cols, offs_d, dims, kt, offset, lo = _key_program(K, skb, skn, skd, Nq, Nk, HEAD_DIM,
                                                                 BLOCK_M, BLOCK_N, BLOCK_D)
    last = tl.cdiv(Nq, BLOCK_M) - 1
    below = tl.zeros([BLOCK_N], tl.float32)  # column sums of dF over the rows below
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for step in range(0, last + 1 - lo):  # bottom to top
        offs_m = (last - step) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = offs_m < Nq
        g = tl.load(DF + b * sgb + offs_m[:, None] * sgm + offs_n[None, :] * sgn, mask=rows[:, None] & cols[None, :],
                    other=0.0).to(tl.float32) * sign  # dF (the output was -F when sign is -1)
        ds = below[None, :] + reverse_exclusive_rows(g)  # sum of dF rows strictly below
        below += tl.sum(g, axis=0)
        q = rows_tile(Q + b * sqb, offs_m, rows, sqm, offs_d, dims, sqd)
        s, active = _selection_tile(q, kt, offs_m, offs_n, rows, cols, offset, qk_scale, PROTECT_BOS, FP32_DOT)
        dl = tl.where(active, ds, 0.0)  # gradient of L (before the scale)
        dk += dot(tl.trans(dl), q, FP32_DOT)
        tl.atomic_add(DQ + (b * Nq + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], dot(dl, tl.trans(kt), FP32_DOT) * scale,
                      mask=rows[:, None] & dims[None, :], sem="relaxed")  # a sum needs no ordering
    tl.store(DK + (b * Nk + offs_n[:, None]) * HEAD_DIM + offs_d[None, :], dk * scale, mask=cols[:, None] & dims[None, :])


def penalty_forward(q: Tensor, k: Tensor, *, scale: float, protect_bos: bool, negate: bool = False) -> Tensor:
    """F (B, Nq, Nk) float32 from the selection head's q (B, Nq, D) and k (B, Nk, D), or -F with `negate`
    (written as such: no negation pass), no autograd."""
    B, Nq, D = q.shape
    Nk = k.shape[1]
    out = torch.empty(B, Nq, Nk, dtype=torch.float32, device=q.device)
    _penalty_forward[lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), B)](
        q, k, out, *q.stride(), *k.stride(), *out.stride(), Nq, Nk, scale, -1.0 if negate else 1.0, HEAD_DIM=D,
        PROTECT_BOS=protect_bos, FP32_DOT=q.dtype == torch.float32, BLOCK_D=head_block(D))
    return out


def penalty_backward(q: Tensor, k: Tensor, dpen: Tensor, *, scale: float, protect_bos: bool, negate: bool = False
                     ) -> tuple[Tensor, Tensor]:
    """dq (B, Nq, D), dk (B, Nk, D) in float32 from dF (B, Nq, Nk), or from d(-F) with `negate`."""
    B, Nq, D = q.shape
    Nk = k.shape[1]
    dq = torch.zeros(B, Nq, D, dtype=torch.float32, device=q.device)  # atomically added into
    dk = torch.empty(B, Nk, D, dtype=torch.float32, device=q.device)
    _penalty_backward[lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), B)](
        q, k, dpen, dq, dk, *q.stride(), *k.stride(), *dpen.stride(), Nq, Nk, scale, scale, -1.0 if negate else 1.0,
        HEAD_DIM=D,
        PROTECT_BOS=protect_bos, FP32_DOT=q.dtype == torch.float32, BLOCK_D=head_block(D))
    return dq, dk


__all__ = ["penalty_forward", "penalty_backward"]
