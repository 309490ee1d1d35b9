"""Selective attention fused in Triton: -F formed tile by tile from the selection heads' q_s and k_s.

    out = softmax(scale q k^T - F + causal) v,   F = sum over terms t of w_t (acc_t + exclusive cumsum of S_t)
    S_t[i, j] = ReLU(scale_t q_s[i] . k_s[j]) for keys j strictly earlier than query i (j != 0 with protect_bos)

(Leviathan, Kalman, Matias, "Selective Attention Improves Transformer", ICLR 2025, section 3; the structures
and the naive reference are `structure.py` and `reference.py`.) Nothing of size (B, Nq, Nk) is made: F lives
as tiles in registers, rebuilt from stored rows at query-block boundaries, as `blocked.py` does in PyTorch.
With query blocks of ROWS rows (triton_tuning.SELECTIVE_ROWS):

- `_selective_boundary_rows`: G[b, r, j] = F[r * ROWS, j], (B, Nq / ROWS, Nk) float32. One program per (key block,
  batch element) walks the query blocks top to bottom with the running column sums of the weighted S in
  registers (the walk of the penalty kernel in `triton.py`, storing one row per block instead of every row).
- `_selective_forward`: one program per (query block, batch x head), flash attention whose bias tile is -F, F = the
  block's G row + the exclusive cumsum of the recomputed S tile down its rows. Writes out and the base-2
  log-sum-exp.
- `_selective_key_pass`: one program per (key block, batch element) walks the query blocks bottom to top. Per tile it
  recomputes every head's P and dS (dS = d logits), sums dk and dv per kv head, and dF = -sum over heads of
  dS (-F enters every head's logits). The running column sum of dF over the rows below (the carry) gives
  dS_sel[i, j] = sum over i' > i of dF[i', j] inside the tile, hence each term's dL = w dS_sel where S was
  active and its dk_s. The carry at each block boundary is stored, (B, Nq / ROWS, Nk) float32 like G, and
  the final carry is d(accumulated) / w.
- `_selective_query_pass`: one program per (query block, batch element) walks the key blocks, recomputes every head's
  dS, sums dq, and rebuilds dS_sel from dF and the stored carry row below the block for each term's dq_s.

Why two backward passes: dk_s sums dL over queries and dq_s over keys, and dL needs dF summed over every
head, which is never stored. A program that owns a key block could only add into dq_s rows that other
programs add into too (atomics, the penalty kernel's way, in any order). The query pass recomputes every head's
dS anyway, for dq without atomics (as the other kernels' default "recompute" strategy does), and those dS
summed over heads are dF: dq_s costs only the selection's matmuls. dk, dv (key pass) and dq (query pass) are
summed into float32 buffers whose rows only that program writes: no atomics, gradients that repeat bit for
bit, 7 tile matmuls per (query block, key block, head) in the backward as in the other kernels, plus per tile
the selection's (S recomputed, and its gradient, per term).

Every program recomputes S per tile for its head: the forward once per head (one program per head), the
passes once per tile for all heads. Tiles are walked with the mask everywhere (no unmasked split).
Tested on CPU through Triton's interpreter against the `math` backend (tests/test_triton.py) and compiled for
sm_90 by tests/sm90_compile.py; not yet timed on a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...backends.triton_tiles import (
    cols_tile,
    dot,
    exclusive_rows,
    first_query_block,
    heavy_first,
    key_end,
    reverse_exclusive_rows,
    rows_tile,
)
from ...backends.triton_tuning import (
    INTERPRETER_ROW_CONFIGS,
    INTERPRETER_WIDE_CONFIGS,
    SELECTIVE_FORWARD_CONFIGS,
    SELECTIVE_QUERY_CONFIGS,
    SELECTIVE_ROW_CONFIGS,
    SELECTIVE_ROWS,
    head_block,
    tuned,
)
from .structure import Selection, SelectionTerm

LOG2E = math.log2(math.e)
MAX_SELECTION_DIM = 128  # as the attention head dim: the tile configurations are chosen up to here


# --------------------------------------------------------------------------- tiles


@triton.jit
def _term_scores(QS, KS, SCALES, BOS, t, b, B, offs_m, offs_n, rows, cols, offs_e, edims, offset, Nq, Nk,
                 SEL_DIM: tl.constexpr, SEL_FP32_DOT: tl.constexpr):
    """Term t's S tile (M, N) float32, unweighted; where it is active (S = L > 0, kept); q_s (M, E); k_s^T (E, N).
    QS (T, B, Nq, E) and KS (T, B, Nk, E) are contiguous."""
    qs = rows_tile(QS + (t * B + b) * Nq * SEL_DIM, offs_m, rows, SEL_DIM, offs_e, edims, 1)
    kst = cols_tile(KS + (t * B + b) * Nk * SEL_DIM, offs_n, cols, SEL_DIM, offs_e, edims, 1)
    logits = dot(qs, kst, SEL_FP32_DOT) * tl.load(SCALES + t)
    keep = rows[:, None] & cols[None, :] & (offs_n[None, :] < offs_m[:, None] + offset)  # strictly earlier keys
    keep = keep & ((offs_n[None, :] != 0) | (tl.load(BOS + t) == 0))  # never BOS where it is protected
    active = keep & (logits > 0.0)
    return tl.where(active, logits, 0.0), active, qs, kst


@triton.jit
def _weighted_scores(QS, KS, SCALES, WEIGHTS, BOS, T, b, B, offs_m, offs_n, rows, cols, offs_e, edims, offset, Nq, Nk,
                     SEL_DIM: tl.constexpr, SEL_FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """sum over terms of w_t S_t: one tile (M, N) float32."""
    s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for t in range(T):
        st, _, _, _ = _term_scores(QS, KS, SCALES, BOS, t, b, B, offs_m, offs_n, rows, cols, offs_e, edims, offset,
                                   Nq, Nk, SEL_DIM, SEL_FP32_DOT)
        s += st * tl.load(WEIGHTS + t)
    return s


@triton.jit
def _penalty_tile(QS, KS, SCALES, WEIGHTS, BOS, Grow, T, b, B, offs_m, offs_n, rows, cols, offs_e, edims, offset, Nq,
                  Nk, SEL_DIM: tl.constexpr, SEL_FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """F (M, N) float32 of one tile: F of its first row (`Grow`, a row of G) plus the exclusive cumsum of the
    weighted S down the tile's rows (+inf safe: a row after an infinite S gets +inf, the row itself stays finite)."""
    s = _weighted_scores(QS, KS, SCALES, WEIGHTS, BOS, T, b, B, offs_m, offs_n, rows, cols, offs_e, edims, offset, Nq,
                         Nk, SEL_DIM, SEL_FP32_DOT, BLOCK_M, BLOCK_N)
    first = tl.load(Grow + offs_n, mask=cols, other=0.0)
    return first[None, :] + exclusive_rows(s)


@triton.jit
def _visible(offs_m, offs_n, rows, cols, offset, CAUSAL: tl.constexpr):
    """Where queries see keys: in bounds and, under the causal mask, key j <= query i + offset."""
    visible = rows[:, None] & cols[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + offset)
    return visible


@triton.jit
def _head_grads(q, do, kt, vt, f, lse, delta, visible, qk_scale, FP32_DOT: tl.constexpr):
    """One head's P and dS = d logits (M, N) float32 for a tile whose penalty is f: P from the saved base-2
    log-sum-exp (rows that see no key read lse = inf, so P = 0)."""
    p = tl.math.exp2(dot(q, kt, FP32_DOT) * qk_scale - f * 1.4426950408889634 - lse[:, None])
    p = tl.where(visible, p, 0.0)
    ds = p * (dot(do, vt, FP32_DOT) - delta[:, None])
    return p, ds


@triton.jit
def _add_into(base, offs, valid, stride, offs_d, dims, value):
    """base[offs, :] += value for a float32 (rows, BLOCK_D) block this program alone writes (no atomics)."""
    ptrs = base + offs[:, None] * stride + offs_d[None, :]
    mask = valid[:, None] & dims[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + value, mask=mask)
    # The next add into these rows may load an element through another thread than the one that stored it
    # (the load's and the store's layouts need not match): a block-wide barrier makes the stores visible.
    tl.debug_barrier()


# --------------------------------------------------------------------------- kernels


@tuned(SELECTIVE_ROW_CONFIGS, interpreter=INTERPRETER_ROW_CONFIGS, key=["Nq", "Nk", "T", "SEL_DIM"])
@triton.jit
def _selective_boundary_rows(QS, KS, SCALES, WEIGHTS, BOS, Start, G, T, B, Nq, Nk, NR, SEL_DIM: tl.constexpr,
                   SEL_FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    n_block = tl.program_id(0)
    b = tl.program_id(1)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    cols = offs_n < Nk
    edims = offs_e < SEL_DIM
    offset = Nk - Nq
    running = tl.load(Start + b * Nk + offs_n, mask=cols, other=0.0)  # the weighted accumulators: F of row 0
    lo = first_query_block(n_block * BLOCK_N - offset + 1, Nq, BLOCK_M)  # blocks before lo have no S here
    for r in range(0, lo):
        tl.store(G + (b * NR + r) * Nk + offs_n, running, mask=cols)
    for r in range(lo, NR):
        tl.store(G + (b * NR + r) * Nk + offs_n, running, mask=cols)
        offs_m = r * BLOCK_M + tl.arange(0, BLOCK_M)
        s = _weighted_scores(QS, KS, SCALES, WEIGHTS, BOS, T, b, B, offs_m, offs_n, offs_m < Nq, cols, offs_e, edims,
                             offset, Nq, Nk, SEL_DIM, SEL_FP32_DOT, BLOCK_M, BLOCK_N)
        running += tl.sum(s, axis=0)


@tuned(SELECTIVE_FORWARD_CONFIGS, interpreter=INTERPRETER_WIDE_CONFIGS, also_key=("T", "SEL_DIM"))
@triton.jit
def _selective_forward(Q, K, V, Out, Lse, QS, KS, SCALES, WEIGHTS, BOS, G,
             sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
             H, GROUP, T, B, Nq, Nk, NR, qk_scale, HEAD_DIM: tl.constexpr, SEL_DIM: tl.constexpr, ROWS: tl.constexpr,
             CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr, SEL_FP32_DOT: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    bh = tl.program_id(0)
    m_block = heavy_first(tl.program_id(1), tl.num_programs(1))
    b = bh // H
    h = bh % H
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    rows = offs_m < Nq
    dims = offs_d < HEAD_DIM
    edims = offs_e < SEL_DIM
    q = rows_tile(Q + b * sqb + h * sqh, offs_m, rows, sqm, offs_d, dims, sqd)
    K, V = K + b * skb + (h // GROUP) * skh, V + b * svb + (h // GROUP) * svh
    Grow = G + (b * NR + m_block * (BLOCK_M // ROWS)) * Nk  # F of the block's first row
    offset = Nk - Nq
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max, base-2 logits
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, key_end(m_block, Nq, Nk, BLOCK_M, CAUSAL), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        cols = offs_n < Nk
        kt = cols_tile(K, offs_n, cols, skn, offs_d, dims, skd)
        v = rows_tile(V, offs_n, cols, svn, offs_d, dims, svd)
        f = _penalty_tile(QS, KS, SCALES, WEIGHTS, BOS, Grow, T, b, B, offs_m, offs_n, rows, cols, offs_e, edims, offset,
                          Nq, Nk, SEL_DIM, SEL_FP32_DOT, BLOCK_M, BLOCK_N)
        s = dot(q, kt, FP32_DOT) * qk_scale - f * 1.4426950408889634
        s = tl.where(_visible(offs_m, offs_n, rows, cols, offset, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key (or only F = inf)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p, v, FP32_DOT)
        m_i = m_new
    seen = l_i > 0.0  # a query that sees no key gets 0, and no gradient
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(Out + (bh * Nq + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=rows[:, None] & dims[None, :])
    tl.store(Lse + bh * Nq + offs_m, tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf")),
             mask=rows)


# The passes add into their outputs (read, add, write), and the autotuner runs them once per configuration.
@tuned(SELECTIVE_ROW_CONFIGS, reset_to_zero=["DK", "DV", "DKS"], interpreter=INTERPRETER_ROW_CONFIGS,
       also_key=("T", "SEL_DIM"))
@triton.jit
def _selective_key_pass(Q, K, V, DO, Lse, Delta, QS, KS, SCALES, WEIGHTS, BOS, G, Carry, DK, DV, DKS, DAcc,
              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
              H, HKV, GROUP, T, B, Nq, Nk, NR, qk_scale, scale, HEAD_DIM: tl.constexpr, SEL_DIM: tl.constexpr,
              CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr, SEL_FP32_DOT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    n_block = tl.program_id(0)  # ascending is heaviest first: early keys are seen by the most queries
    b = tl.program_id(1)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    cols = offs_n < Nk
    dims = offs_d < HEAD_DIM
    edims = offs_e < SEL_DIM
    offset = Nk - Nq
    lo = 0
    if CAUSAL:  # blocks before the first query that sees this block's first key: no P, no S, no dF here
        lo = first_query_block(n_block * BLOCK_N - offset, Nq, BLOCK_M)
    carry = tl.zeros([BLOCK_N], tl.float32)  # column sums of dF over the rows below
    for step in range(0, NR - lo):  # bottom to top
        r = NR - 1 - step
        offs_m = r * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = offs_m < Nq
        tl.store(Carry + (b * NR + r) * Nk + offs_n, carry, mask=cols)
        f = _penalty_tile(QS, KS, SCALES, WEIGHTS, BOS, G + (b * NR + r) * Nk, T, b, B, offs_m, offs_n, rows, cols,
                          offs_e, edims, offset, Nq, Nk, SEL_DIM, SEL_FP32_DOT, BLOCK_M, BLOCK_N)
        visible = _visible(offs_m, offs_n, rows, cols, offset, CAUSAL)
        df = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for hk in range(HKV):
            kt = cols_tile(K + b * skb + hk * skh, offs_n, cols, skn, offs_d, dims, skd)
            vt = cols_tile(V + b * svb + hk * svh, offs_n, cols, svn, offs_d, dims, svd)
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            for g in range(GROUP):  # the query heads reading this kv head: GQA sums here
                h = hk * GROUP + g
                q = rows_tile(Q + b * sqb + h * sqh, offs_m, rows, sqm, offs_d, dims, sqd)
                do = rows_tile(DO + b * sdob + h * sdoh, offs_m, rows, sdom, offs_d, dims, sdod)
                lse = tl.load(Lse + (b * H + h) * Nq + offs_m, mask=rows, other=float("inf"))
                delta = tl.load(Delta + (b * H + h) * Nq + offs_m, mask=rows, other=0.0)
                p, ds = _head_grads(q, do, kt, vt, f, lse, delta, visible, qk_scale, FP32_DOT)
                dv += dot(tl.trans(p), do, FP32_DOT)
                dk += dot(tl.trans(ds), q, FP32_DOT)
                df -= ds  # -F enters every head's logits
            kv_rows = (b * HKV + hk) * Nk + offs_n
            _add_into(DK, kv_rows, cols, HEAD_DIM, offs_d, dims, dk * scale)
            _add_into(DV, kv_rows, cols, HEAD_DIM, offs_d, dims, dv)
        dsel = carry[None, :] + reverse_exclusive_rows(df)  # dS_sel[i] = sum of dF over rows below i
        carry += tl.sum(df, axis=0)
        for t in range(T):
            _, active, qs, _ = _term_scores(QS, KS, SCALES, BOS, t, b, B, offs_m, offs_n, rows, cols, offs_e, edims,
                                            offset, Nq, Nk, SEL_DIM, SEL_FP32_DOT)
            dl = tl.where(active, dsel, 0.0) * (tl.load(WEIGHTS + t) * tl.load(SCALES + t))  # d(q_s . k_s)
            _add_into(DKS, (t * B + b) * Nk + offs_n, cols, SEL_DIM, offs_e, edims, dot(tl.trans(dl), qs, SEL_FP32_DOT))
    for r in range(0, lo):  # rows above see none of these keys: everything below is the whole column
        tl.store(Carry + (b * NR + r) * Nk + offs_n, carry, mask=cols)
    tl.store(DAcc + b * Nk + offs_n, carry, mask=cols)  # accumulated[j] enters every row's F


@tuned(SELECTIVE_QUERY_CONFIGS, reset_to_zero=["DQ", "DQS"], interpreter=INTERPRETER_WIDE_CONFIGS,
       also_key=("T", "SEL_DIM"))
@triton.jit
def _selective_query_pass(Q, K, V, DO, Lse, Delta, QS, KS, SCALES, WEIGHTS, BOS, G, Carry, DQ, DQS,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
                H, GROUP, T, B, Nq, Nk, NR, qk_scale, scale, HEAD_DIM: tl.constexpr, SEL_DIM: tl.constexpr,
                ROWS: tl.constexpr, CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr, SEL_FP32_DOT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    m_block = heavy_first(tl.program_id(0), tl.num_programs(0))
    b = tl.program_id(1)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    rows = offs_m < Nq
    dims = offs_d < HEAD_DIM
    edims = offs_e < SEL_DIM
    offset = Nk - Nq
    Grow = G + (b * NR + m_block * (BLOCK_M // ROWS)) * Nk
    # The carry row stored before the key pass walked this block's last stored row: dF summed below the block.
    # A partial last block reads the last stored row, whose carry is 0 as well.
    Crow = Carry + (b * NR + tl.minimum((m_block + 1) * (BLOCK_M // ROWS), NR) - 1) * Nk
    for start_n in range(0, key_end(m_block, Nq, Nk, BLOCK_M, CAUSAL), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        cols = offs_n < Nk
        f = _penalty_tile(QS, KS, SCALES, WEIGHTS, BOS, Grow, T, b, B, offs_m, offs_n, rows, cols, offs_e, edims, offset,
                          Nq, Nk, SEL_DIM, SEL_FP32_DOT, BLOCK_M, BLOCK_N)
        visible = _visible(offs_m, offs_n, rows, cols, offset, CAUSAL)
        df = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for h in range(H):
            hk = h // GROUP
            kt = cols_tile(K + b * skb + hk * skh, offs_n, cols, skn, offs_d, dims, skd)
            vt = cols_tile(V + b * svb + hk * svh, offs_n, cols, svn, offs_d, dims, svd)
            q = rows_tile(Q + b * sqb + h * sqh, offs_m, rows, sqm, offs_d, dims, sqd)
            do = rows_tile(DO + b * sdob + h * sdoh, offs_m, rows, sdom, offs_d, dims, sdod)
            lse = tl.load(Lse + (b * H + h) * Nq + offs_m, mask=rows, other=float("inf"))
            delta = tl.load(Delta + (b * H + h) * Nq + offs_m, mask=rows, other=0.0)
            _, ds = _head_grads(q, do, kt, vt, f, lse, delta, visible, qk_scale, FP32_DOT)
            _add_into(DQ, (b * H + h) * Nq + offs_m, rows, HEAD_DIM, offs_d, dims, dot(ds, tl.trans(kt), FP32_DOT) * scale)
            df -= ds
        below = tl.load(Crow + offs_n, mask=cols, other=0.0)
        dsel = below[None, :] + reverse_exclusive_rows(df)
        for t in range(T):
            _, active, _, kst = _term_scores(QS, KS, SCALES, BOS, t, b, B, offs_m, offs_n, rows, cols, offs_e, edims,
                                             offset, Nq, Nk, SEL_DIM, SEL_FP32_DOT)
            dl = tl.where(active, dsel, 0.0) * (tl.load(WEIGHTS + t) * tl.load(SCALES + t))
            _add_into(DQS, (t * B + b) * Nq + offs_m, rows, SEL_DIM, offs_e, edims, dot(dl, tl.trans(kst), SEL_FP32_DOT))


# --------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class StackedTerms:
    """A Selection's terms as the kernels read them: q_s (T, B, Nq, E) and k_s (T, B, Nk, E) contiguous in one
    dtype, per-term scale and weight (T,) float32 and protect_bos (T,) int32, and F's first row (B, Nk) float32
    (the weighted accumulators, zeros without a cache)."""

    q: Tensor
    k: Tensor
    scales: Tensor
    weights: Tensor
    bos: Tensor
    start: Tensor

    @classmethod
    def of(cls, terms: list[SelectionTerm]) -> "StackedTerms":
        dtype = terms[0].q.dtype
        for t in terms[1:]:
            dtype = torch.promote_types(dtype, t.q.dtype)
        device = terms[0].q.device
        start = torch.zeros(terms[0].k.shape[:2], dtype=torch.float32, device=device)  # (B, Nk)
        for t in terms:
            if t.accumulated is not None:
                start.add_(t.accumulated.detach().float(), alpha=t.weight)
        per_term = dict(dtype=torch.float32, device=device)
        return cls(torch.stack([t.q.detach().to(dtype) for t in terms]), torch.stack([t.k.detach().to(dtype) for t in terms]),
                   torch.tensor([t.scale for t in terms], **per_term), torch.tensor([t.weight for t in terms], **per_term),
                   torch.tensor([int(t.protect_bos) for t in terms], dtype=torch.int32, device=device), start)

    def tensors(self) -> tuple[Tensor, ...]:
        """Every field, in order: what autograd saves for the backward (`StackedTerms(*tensors)` again)."""
        return self.q, self.k, self.scales, self.weights, self.bos, self.start

    def args(self) -> tuple[Tensor, ...]:
        """The kernels' leading arguments QS, KS, SCALES, WEIGHTS, BOS."""
        return self.q, self.k, self.scales, self.weights, self.bos

    def constants(self) -> dict:
        E = self.q.shape[-1]
        return dict(SEL_DIM=E, SEL_FP32_DOT=self.q.dtype == torch.float32, BLOCK_E=head_block(E))


def _common(q: Tensor, causal: bool) -> dict:
    D = q.shape[-1]
    return dict(HEAD_DIM=D, CAUSAL=causal, FP32_DOT=q.dtype == torch.float32, BLOCK_D=head_block(D))


def boundary_rows(stacked: StackedTerms, Nq: int) -> Tensor:
    """G (B, cdiv(Nq, SELECTIVE_ROWS), Nk) float32: F at every block's first row."""
    T, B, Nk = stacked.k.shape[0], stacked.k.shape[1], stacked.k.shape[2]
    NR = triton.cdiv(Nq, SELECTIVE_ROWS)
    G = torch.empty(B, NR, Nk, dtype=torch.float32, device=stacked.k.device)
    _selective_boundary_rows[lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), B)](
        *stacked.args(), stacked.start, G, T, B, Nq, Nk, NR, **stacked.constants())
    return G


def selective_forward(q: Tensor, k: Tensor, v: Tensor, stacked: StackedTerms, *, causal: bool, scale: float
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) float32 (base 2) and G, no autograd.
    q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D), any strides."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    T = stacked.q.shape[0]
    G = boundary_rows(stacked, Nq)
    out = torch.empty(B, H, Nq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    _selective_forward[lambda meta: (B * H, triton.cdiv(Nq, meta["BLOCK_M"]))](
        q, k, v, out, lse, *stacked.args(), G, *q.stride(), *k.stride(), *v.stride(),
        H, H // Hkv, T, B, Nq, Nk, G.shape[1], scale * LOG2E, ROWS=SELECTIVE_ROWS, **_common(q, causal),
        **stacked.constants())
    return out, lse, G


def selective_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, G: Tensor,
                       stacked: StackedTerms, *, causal: bool, scale: float):
    """dq, dk, dv in the inputs' dtypes; dq_s (T, B, Nq, E), dk_s (T, B, Nk, E) float32 (weights and scales
    applied); d(sum of w_t accumulated_t) (B, Nk) float32, i.e. the column sums of dF."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    T, NR = stacked.q.shape[0], G.shape[1]
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    delta = torch.linalg.vecdot(dout.float(), out.float()).contiguous()  # (B, H, Nq): rowsum(dO * O)
    f32 = dict(dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.zeros(B, H, Nq, D, **f32), torch.zeros(B, Hkv, Nk, D, **f32), torch.zeros(B, Hkv, Nk, D, **f32)
    dqs, dks = torch.zeros(stacked.q.shape, **f32), torch.zeros(stacked.k.shape, **f32)
    carry, dacc = torch.empty(B, NR, Nk, **f32), torch.empty(B, Nk, **f32)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    _selective_key_pass[lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), B)](
        q, k, v, dout, lse, delta, *stacked.args(), G, carry, dk, dv, dks, dacc, *strides,
        H, Hkv, H // Hkv, T, B, Nq, Nk, NR, scale * LOG2E, scale, **_common(q, causal), **stacked.constants())
    _selective_query_pass[lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B)](
        q, k, v, dout, lse, delta, *stacked.args(), G, carry, dq, dqs, *strides,
        H, H // Hkv, T, B, Nq, Nk, NR, scale * LOG2E, scale, ROWS=SELECTIVE_ROWS, **_common(q, causal),
        **stacked.constants())
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dqs, dks, dacc


# --------------------------------------------------------------------------- autograd


class FusedSelectiveAttention(torch.autograd.Function):
    """q (B, H, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, D), then each term's q_s, k_s and accumulated
    (flattened, so autograd routes their gradients) -> out (B, H, Nq, D)."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, meta: tuple, *term_tensors):
        from .blocked import _terms

        terms = _terms(meta, term_tensors)
        stacked = StackedTerms.of(terms)
        out, lse, G = selective_forward(q.detach(), k.detach(), v.detach(), stacked, causal=causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, G, *stacked.tensors())
        ctx.causal, ctx.scale, ctx.meta = causal, scale, meta
        ctx.dtypes = [(t.q.dtype, t.k.dtype, None if t.accumulated is None else t.accumulated.dtype) for t in terms]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse, G, *stacked = ctx.saved_tensors
        stacked = StackedTerms(*stacked)
        dq, dk, dv, dqs, dks, dacc = selective_backward(q, k, v, out, lse, dout, G, stacked, causal=ctx.causal,
                                                        scale=ctx.scale)
        flat = []
        for t, ((qdt, kdt, adt), (_, _, weight, _)) in enumerate(zip(ctx.dtypes, ctx.meta)):
            flat += [dqs[t].to(qdt), dks[t].to(kdt)]
            if adt is not None:
                flat.append((dacc * weight).to(adt))
        return (dq, dk, dv, None, None, None, *flat)


def fused_refusal(selection: Selection) -> str | None:
    """Why these kernels cannot run this selection (the backend then hands -F to its dense-bias kernels), or None."""
    widths = sorted({t.q.shape[-1] for t in selection.terms})
    if len(widths) > 1:
        return f"selection terms of different widths {widths} cannot share one stacked tile"
    if widths[0] > MAX_SELECTION_DIM:
        return f"selection head dim {widths[0]} is above {MAX_SELECTION_DIM}"
    if any(t.q.dtype == torch.float64 for t in selection.terms):
        return "float64 selection heads (the kernels compute S in float32)"
    return None


def fused_selective_attention(q: Tensor, k: Tensor, v: Tensor, selection: Selection, *, causal: bool, scale: float
                              ) -> Tensor:
    """softmax(scale q k^T - F + causal) v, F never dense: q (B, H, Nq, D), k and v (B, Hkv, Nk, D), H % Hkv == 0,
    `selection` of shape (B, Nq, Nk) (see `fused_refusal` for what it cannot take). Returns (B, H, Nq, D) in
    q's dtype. Raises ValueError on mismatched shapes."""
    from .blocked import _flatten

    if selection.shape != (q.shape[0], q.shape[2], k.shape[2]):
        raise ValueError(f"selection (B, Nq, Nk) = {selection.shape} does not match q{tuple(q.shape)} k{tuple(k.shape)}")
    meta, tensors = _flatten(selection)
    return FusedSelectiveAttention.apply(q, k, v, causal, scale, meta, *tensors)


__all__ = ["FusedSelectiveAttention", "fused_selective_attention", "fused_refusal", "selective_forward",
           "selective_backward", "boundary_rows", "StackedTerms", "MAX_SELECTION_DIM"]
