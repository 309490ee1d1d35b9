"""Flash-attention kernels in Triton with a trainable bias whose gradient comes back summed over heads.

    out = softmax(scale q k^T + bias + causal) v

Selective attention's bias -F is one float32 (B, Nq, Nk) tensor read by every head. The fused kernels
of torch and xformers read such a bias but return no gradient for it (or only per head, (B, H, N, N)),
which is why `fused.BiasGradAttention` recomputes its backward in PyTorch blocks. These kernels do the
whole thing on chip, never materialising anything per head larger than (B, H, Nq) statistics:

- `_forward`: one program per (query block, batch x head); online softmax over the key blocks the
  block can see; writes out and the row log-sum-exp (base 2).
- `_backward_dk_dv`: one program per (key block, batch x kv head); walks the query blocks that can
  see it for each of the G query heads of its kv head, so GQA sums into dk and dv with no copies.
- `_backward_dq`: one program per (query block, batch x head); dq summed in registers over the key
  blocks and written once. A per-head bias (residual scores) gets this head's dS as its gradient.
- `_backward_dq_dbias_shared`: one program per (span of KEY_SPAN keys, query block, batch element),
  for a head-shared bias that needs a gradient (selective's -F). The heads are looped *inside* the
  key-block loop: the bias tile is read once and its gradient (sum over heads of dS) is accumulated in
  registers and written once per tile. dq tiles are added with atomics, since a program holds one key
  block of every head at a time (H dq accumulators would not fit in registers). The key spans exist
  for parallelism: a program walks H heads per key block, so one per (query block, batch element)
  alone would be B x Nq / BLOCK_M long programs (256 at batch 4 x 4096: two waves on an H200, the
  longest 8 heads x 64 key blocks); the spans' dbias tiles are disjoint and their dq adds are atomic.

Query blocks are launched last-first (`heavy_first`): under the causal mask they see the most keys.
Every kernel walks its tiles in two loops, as flash attention does: the tiles all of whose rows see all
of whose keys (`unmasked_key_end`, `unmasked_query_start`) without the mask and its select, then the
few on the causal diagonal or at the end of the keys with it (each loop body is one `*_tile` function).

The backward kernels (dk/dv, then one of the two dq kernels) recompute P = exp2(s - lse) from q, k and
the bias, as flash attention does: 7 tile matmuls per (query block, key block, head) in all, the count
of a standard Triton flash backward; the bias gradient costs only the register sum over heads.
Tile sizes: `triton_tuning.py`; tests/sm90_compile.py compiles every kernel for sm_90 without a GPU.

Nothing here knows a variant. `attention_zoo.backends.triton` wraps these in an autograd Function and
decides when they are used; the math backend is the reference they are tested against, on CPU through
Triton's interpreter (TRITON_INTERPRET=1) and on CUDA in tests/gpu.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_tiles import (
    cols_tile,
    dot,
    first_query_block,
    heavy_first,
    key_end,
    rows_tile,
    unmasked_key_end,
    unmasked_query_start,
)
from .triton_tuning import (
    ATTENTION_CONFIGS,
    DKDV_CONFIGS,
    DQ_CONFIGS,
    INTERPRETED,
    INTERPRETER_MIN_VERSION,
    KEY_SPAN,
    SHARED_DQ_CONFIGS,
    VERSION,
    head_block,
    shared_dq_strategy,
    tuned,
)

LOG2E = math.log2(math.e)


@triton.jit
def _bias_and_mask(base, offs_m, offs_n, rows, cols, offset, sbm, sbn, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr):
    """One tile's bias, float32 in base-2 units (the softmax runs in base 2; 0.0 without a bias), and where
    queries see keys: in bounds and, under the causal mask, key j <= query i + offset."""
    visible = rows[:, None] & cols[None, :]
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(base + offs_m[:, None] * sbm + offs_n[None, :] * sbn, mask=visible, other=0.0).to(tl.float32) \
            * 1.4426950408889634
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + offset)
    return bias, visible


@triton.jit
def _probs(q, kt, bias, lse, visible, qk_scale, FP32_DOT: tl.constexpr, MASKED: tl.constexpr):
    """P = exp2(scale q k^T + bias - lse) of one tile, from the saved base-2 log-sum-exp; 0 where not visible.
    Unmasked tiles (MASKED false) skip the select: rows past the end read lse = inf, so their P is 0."""
    p = tl.math.exp2(dot(q, kt, FP32_DOT) * qk_scale + bias - lse[:, None])
    if MASKED:
        p = tl.where(visible, p, 0.0)
    return p


@triton.jit
def _query_program(H, GROUP, Nq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a program over (batch x head, query block) works on: its batch element, head, kv head, query
    block (heaviest first), the block's row and head-dim offsets and their in-bounds masks."""
    bh = tl.program_id(0)
    m_block = heavy_first(tl.program_id(1), tl.num_programs(1))
    b = bh // H
    h = bh % H
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dims = offs_d < HEAD_DIM  # all true, and compiled away, when the head dim is a power of two
    return bh, b, h, h // GROUP, m_block, offs_m, offs_d, offs_m < Nq, dims


@triton.jit
def _forward_tile(acc, l_i, m_i, q, K, V, Bias, start_n, offs_m, offs_d, rows, dims, Nk, offset, qk_scale,
                  skn, skd, svn, svd, sbm, sbn, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr,
                  MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block of the online softmax. MASKED: the tile crosses the causal diagonal or the end of the
    keys, so invisible logits become -inf; other tiles skip that select."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    cols = offs_n < Nk
    kt = cols_tile(K, offs_n, cols, skn, offs_d, dims, skd)  # (D, N)
    v = rows_tile(V, offs_n, cols, svn, offs_d, dims, svd)
    bias, visible = _bias_and_mask(Bias, offs_m, offs_n, rows, cols, offset, sbm, sbn, HAS_BIAS, CAUSAL)
    s = dot(q, kt, FP32_DOT) * qk_scale + bias
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p, v, FP32_DOT)
    return acc, l_i, m_new


@tuned(ATTENTION_CONFIGS)
@triton.jit
def _forward(Q, K, V, Bias, Out, Lse,
             sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
             sbb, sbh, sbm, sbn, sob, soh, som, sod,
             H, GROUP, Nq, Nk, qk_scale, HEAD_DIM: tl.constexpr,
             HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, b, h, hk, m_block, offs_m, offs_d, rows, dims = _query_program(H, GROUP, Nq, HEAD_DIM, BLOCK_M, BLOCK_D)
    q = rows_tile(Q + b * sqb + h * sqh, offs_m, rows, sqm, offs_d, dims, sqd)
    K, V, Bias = K + b * skb + hk * skh, V + b * svb + hk * svh, Bias + b * sbb + h * sbh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max, base-2 logits
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offset = Nk - Nq  # bottom-right aligned causal: query i sees keys j <= i + offset
    unmasked_end = unmasked_key_end(m_block, Nq, Nk, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, unmasked_end, BLOCK_N):  # keys every row sees: no mask (flash attention's split)
        acc, l_i, m_i = _forward_tile(acc, l_i, m_i, q, K, V, Bias, start_n, offs_m, offs_d, rows, dims, Nk, offset,
                                      qk_scale, skn, skd, svn, svd, sbm, sbn, HAS_BIAS, CAUSAL, FP32_DOT, False, BLOCK_N)
    for start_n in range(unmasked_end, key_end(m_block, Nq, Nk, BLOCK_M, CAUSAL), BLOCK_N):  # the diagonal, the end
        acc, l_i, m_i = _forward_tile(acc, l_i, m_i, q, K, V, Bias, start_n, offs_m, offs_d, rows, dims, Nk, offset,
                                      qk_scale, skn, skd, svn, svd, sbm, sbn, HAS_BIAS, CAUSAL, FP32_DOT, True, BLOCK_N)
    seen = l_i > 0.0  # a query that sees no key (more queries than keys) gets 0, and no gradient
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, out.to(Out.dtype.element_ty),
             mask=rows[:, None] & dims[None, :])
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(Lse + bh * Nq + offs_m, lse, mask=rows)


@triton.jit
def _dk_dv_tile(dk, dv, dkey, k, v, Q, DO, Lse, Delta, Bias, start_m, offs_n, offs_d, cols, dims, Nq, offset, qk_scale,
                sqm, sqd, sdom, sdod, sbm, sbn, HAS_BIAS: tl.constexpr, KEY_BIAS_GRAD: tl.constexpr,
                CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr):
    """One query block's share of a key block's dk and dv (for one query head), and with KEY_BIAS_GRAD of the
    gradient of a per-key bias (the sum of dS over the block's rows)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows = offs_m < Nq
    q = rows_tile(Q, offs_m, rows, sqm, offs_d, dims, sqd)
    do = rows_tile(DO, offs_m, rows, sdom, offs_d, dims, sdod)
    lse = tl.load(Lse + offs_m, mask=rows, other=float("inf"))
    delta = tl.load(Delta + offs_m, mask=rows, other=0.0)
    bias, visible = _bias_and_mask(Bias, offs_m, offs_n, rows, cols, offset, sbm, sbn, HAS_BIAS, CAUSAL)
    p = _probs(q, tl.trans(k), bias, lse, visible, qk_scale, FP32_DOT, MASKED)  # (M, N)
    dv += dot(tl.trans(p), do, FP32_DOT)
    ds = p * (dot(do, tl.trans(v), FP32_DOT) - delta[:, None])  # gradient of the logits
    dk += dot(tl.trans(ds), q, FP32_DOT)
    if KEY_BIAS_GRAD:  # rows past the end and invisible entries have P = 0, so dS = 0 there
        dkey += tl.sum(ds, 0)
    return dk, dv, dkey


@tuned(DKDV_CONFIGS)
@triton.jit
def _backward_dk_dv(Q, K, V, Bias, DO, Lse, Delta, DK, DV, DKey,
                    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                    sbb, sbh, sbm, sbn, sdob, sdoh, sdom, sdod,
                    H, HKV, GROUP, Nq, Nk, qk_scale, scale, HEAD_DIM: tl.constexpr,
                    HAS_BIAS: tl.constexpr, KEY_BIAS_GRAD: tl.constexpr, CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bhk = tl.program_id(0)
    n_block = tl.program_id(1)  # ascending is heaviest first here: early keys are seen by the most queries
    b = bhk // HKV
    hk = bhk % HKV
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = offs_n < Nk
    dims = offs_d < HEAD_DIM
    k = rows_tile(K + b * skb + hk * skh, offs_n, cols, skn, offs_d, dims, skd)
    v = rows_tile(V + b * svb + hk * svh, offs_n, cols, svn, offs_d, dims, svd)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    offset = Nk - Nq
    lo = 0
    if CAUSAL:  # the block of the first query that sees this block's first key
        lo = first_query_block(n_block * BLOCK_N - offset, Nq, BLOCK_M) * BLOCK_M
    unmasked_start = tl.maximum(unmasked_query_start(n_block, Nq, Nk, BLOCK_M, BLOCK_N, CAUSAL), lo)
    for g in range(GROUP):  # the query heads that read this kv head: GQA sums here, nothing copied
        h = hk * GROUP + g
        Qh, DOh, Bias_h = Q + b * sqb + h * sqh, DO + b * sdob + h * sdoh, Bias + b * sbb + h * sbh
        Lse_h, Delta_h = Lse + (b * H + h) * Nq, Delta + (b * H + h) * Nq
        dkey = tl.zeros([BLOCK_N], tl.float32)  # this query head's per-key bias gradient (KEY_BIAS_GRAD)
        for start_m in range(lo, unmasked_start, BLOCK_M):  # blocks crossing the diagonal
            dk, dv, dkey = _dk_dv_tile(dk, dv, dkey, k, v, Qh, DOh, Lse_h, Delta_h, Bias_h, start_m, offs_n, offs_d,
                                       cols, dims, Nq, offset, qk_scale, sqm, sqd, sdom, sdod, sbm, sbn, HAS_BIAS,
                                       KEY_BIAS_GRAD, CAUSAL, FP32_DOT, True, BLOCK_M)
        for start_m in range(unmasked_start, Nq, BLOCK_M):  # blocks that see every key of this one
            dk, dv, dkey = _dk_dv_tile(dk, dv, dkey, k, v, Qh, DOh, Lse_h, Delta_h, Bias_h, start_m, offs_n, offs_d,
                                       cols, dims, Nq, offset, qk_scale, sqm, sqd, sdom, sdod, sbm, sbn, HAS_BIAS,
                                       KEY_BIAS_GRAD, CAUSAL, FP32_DOT, False, BLOCK_M)
        if KEY_BIAS_GRAD:  # DKey: a contiguous float32 (B, H, Nk); each (b, h, key block) is this program's alone
            tl.store(DKey + (b * H + h) * Nk + offs_n, dkey, mask=cols)
    out_offsets = bhk * Nk * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]  # DK, DV contiguous
    tl.store(DK + out_offsets, (dk * scale).to(DK.dtype.element_ty), mask=cols[:, None] & dims[None, :])
    tl.store(DV + out_offsets, dv.to(DV.dtype.element_ty), mask=cols[:, None] & dims[None, :])


@triton.jit
def _dq_tile(dq, q, do, lse, delta, K, V, Bias, DBias, start_n, offs_m, offs_d, rows, dims, Nk, offset, qk_scale,
             skn, skd, svn, svd, sbm, sbn, sgm, sgn, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
             CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block's share of a query block's dq (one head); a per-head bias gets this head's dS."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    cols = offs_n < Nk
    bias, visible = _bias_and_mask(Bias, offs_m, offs_n, rows, cols, offset, sbm, sbn, HAS_BIAS, CAUSAL)
    kt = cols_tile(K, offs_n, cols, skn, offs_d, dims, skd)
    vt = cols_tile(V, offs_n, cols, svn, offs_d, dims, svd)
    p = _probs(q, kt, bias, lse, visible, qk_scale, FP32_DOT, MASKED)
    ds = p * (dot(do, vt, FP32_DOT) - delta[:, None])
    dq += dot(ds, tl.trans(kt), FP32_DOT)
    if BIAS_GRAD:
        tl.store(DBias + offs_m[:, None] * sgm + offs_n[None, :] * sgn, ds, mask=rows[:, None] & cols[None, :])
    return dq


@tuned(DQ_CONFIGS)
@triton.jit
def _backward_dq(Q, K, V, Bias, DO, Lse, Delta, DQ, DBias,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 sbb, sbh, sbm, sbn, sdob, sdoh, sdom, sdod, sgb, sgh, sgm, sgn,
                 H, GROUP, Nq, Nk, qk_scale, scale, HEAD_DIM: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, CAUSAL: tl.constexpr,
                 FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, b, h, hk, m_block, offs_m, offs_d, rows, dims = _query_program(H, GROUP, Nq, HEAD_DIM, BLOCK_M, BLOCK_D)
    q = rows_tile(Q + b * sqb + h * sqh, offs_m, rows, sqm, offs_d, dims, sqd)
    do = rows_tile(DO + b * sdob + h * sdoh, offs_m, rows, sdom, offs_d, dims, sdod)
    lse = tl.load(Lse + bh * Nq + offs_m, mask=rows, other=float("inf"))
    delta = tl.load(Delta + bh * Nq + offs_m, mask=rows, other=0.0)
    K, V, Bias, DBias = K + b * skb + hk * skh, V + b * svb + hk * svh, Bias + b * sbb + h * sbh, DBias + b * sgb + h * sgh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offset = Nk - Nq
    unmasked_end = unmasked_key_end(m_block, Nq, Nk, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, unmasked_end, BLOCK_N):  # keys every row sees: no mask
        dq = _dq_tile(dq, q, do, lse, delta, K, V, Bias, DBias, start_n, offs_m, offs_d, rows, dims, Nk, offset, qk_scale,
                      skn, skd, svn, svd, sbm, sbn, sgm, sgn, HAS_BIAS, BIAS_GRAD, CAUSAL, FP32_DOT, False, BLOCK_N)
    for start_n in range(unmasked_end, key_end(m_block, Nq, Nk, BLOCK_M, CAUSAL), BLOCK_N):  # the diagonal, the end
        dq = _dq_tile(dq, q, do, lse, delta, K, V, Bias, DBias, start_n, offs_m, offs_d, rows, dims, Nk, offset, qk_scale,
                      skn, skd, svn, svd, sbm, sbn, sgm, sgn, HAS_BIAS, BIAS_GRAD, CAUSAL, FP32_DOT, True, BLOCK_N)
    tl.store(DQ + (bh * Nq + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=rows[:, None] & dims[None, :])


@triton.jit
def _shared_bias_tile(Q, K, V, Bias, DO, Lse, Delta, DQ, DBias, b, start_n, offs_m, offs_d, rows, dims, Nq, Nk, offset,
                      qk_scale, scale, sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sbm, sbn,
                      sdob, sdoh, sdom, sdod, sgm, sgn, H, GROUP, HEAD_DIM: tl.constexpr, WITH_DQ: tl.constexpr,
                      CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (query block, key block) tile of a head-shared bias: its gradient summed over every head, each
    head's dq tile added atomically (WITH_DQ). The bias tile is read once here for all heads."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    cols = offs_n < Nk
    bias, visible = _bias_and_mask(Bias, offs_m, offs_n, rows, cols, offset, sbm, sbn, True, CAUSAL)
    dbias = tl.zeros_like(bias)
    for h in range(H):
        hk = h // GROUP
        q = rows_tile(Q + b * sqb + h * sqh, offs_m, rows, sqm, offs_d, dims, sqd)
        do = rows_tile(DO + b * sdob + h * sdoh, offs_m, rows, sdom, offs_d, dims, sdod)
        lse = tl.load(Lse + (b * H + h) * Nq + offs_m, mask=rows, other=float("inf"))
        delta = tl.load(Delta + (b * H + h) * Nq + offs_m, mask=rows, other=0.0)
        kt = cols_tile(K + b * skb + hk * skh, offs_n, cols, skn, offs_d, dims, skd)
        vt = cols_tile(V + b * svb + hk * svh, offs_n, cols, svn, offs_d, dims, svd)
        p = _probs(q, kt, bias, lse, visible, qk_scale, FP32_DOT, MASKED)
        ds = p * (dot(do, vt, FP32_DOT) - delta[:, None])
        if WITH_DQ:  # the "atomic" strategy (triton_tuning.SHARED_DQ_STRATEGIES)
            # DQ is a contiguous float32 (B, H, Nq, D) buffer; programs of other key spans add into
            # the same rows, so the adds are atomic. Relaxed: a sum needs no ordering (Triton's default,
            # acq_rel, fences every add).
            tl.atomic_add(DQ + ((b * H + h) * Nq + offs_m[:, None]) * HEAD_DIM + offs_d[None, :],
                          dot(ds, tl.trans(kt), FP32_DOT) * scale, mask=rows[:, None] & dims[None, :], sem="relaxed")
        dbias += ds
    tl.store(DBias + offs_m[:, None] * sgm + offs_n[None, :] * sgn, dbias, mask=rows[:, None] & cols[None, :])


@tuned(SHARED_DQ_CONFIGS, reset_to_zero=["DQ"], also_key=("WITH_DQ",))  # dq is added into atomically
@triton.jit
def _backward_dq_dbias_shared(Q, K, V, Bias, DO, Lse, Delta, DQ, DBias,
                              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                              sbb, sbm, sbn, sdob, sdoh, sdom, sdod, sgb, sgm, sgn,
                              H, GROUP, Nq, Nk, KEY_SPAN, qk_scale, scale, HEAD_DIM: tl.constexpr,
                              WITH_DQ: tl.constexpr, CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    span_start = tl.program_id(0) * KEY_SPAN  # this program's keys: [span_start, span_start + KEY_SPAN)
    m_block = heavy_first(tl.program_id(1), tl.num_programs(1))
    b = tl.program_id(2)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m < Nq
    dims = offs_d < HEAD_DIM
    offset = Nk - Nq
    Bias, DBias = Bias + b * sbb, DBias + b * sgb
    span_end = tl.minimum(span_start + KEY_SPAN, key_end(m_block, Nq, Nk, BLOCK_M, CAUSAL))
    # nothing for a span in the causal future; spans and the unmasked end are whole key blocks
    unmasked_end = tl.minimum(tl.maximum(unmasked_key_end(m_block, Nq, Nk, BLOCK_M, BLOCK_N, CAUSAL), span_start),
                              span_end)
    for start_n in range(span_start, unmasked_end, BLOCK_N):  # keys every row sees: no mask
        _shared_bias_tile(Q, K, V, Bias, DO, Lse, Delta, DQ, DBias, b, start_n, offs_m, offs_d, rows, dims, Nq, Nk,
                          offset, qk_scale, scale, sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sbm, sbn,
                          sdob, sdoh, sdom, sdod, sgm, sgn, H, GROUP, HEAD_DIM, WITH_DQ, CAUSAL, FP32_DOT, False, BLOCK_N)
    for start_n in range(unmasked_end, span_end, BLOCK_N):  # the diagonal, the end
        _shared_bias_tile(Q, K, V, Bias, DO, Lse, Delta, DQ, DBias, b, start_n, offs_m, offs_d, rows, dims, Nq, Nk,
                          offset, qk_scale, scale, sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sbm, sbn,
                          sdob, sdoh, sdom, sdod, sgm, sgn, H, GROUP, HEAD_DIM, WITH_DQ, CAUSAL, FP32_DOT, True, BLOCK_N)


def _strides4(t: Tensor | None) -> tuple[int, int, int, int]:
    """Strides of a 4-D tensor, 0 on broadcast (size-1) dims so one formula indexes every case."""
    if t is None:
        return (0, 0, 0, 0)
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))  # type: ignore[return-value]


def attention_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, *, causal: bool, scale: float
                      ) -> tuple[Tensor, Tensor]:
    """out (B, H, Nq, D) in q's dtype and lse (B, H, Nq) float32 (base 2), no autograd.

    q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D), any strides; bias (Bb, Hb, Nq, Nk) with Bb in {1, B},
    Hb in {1, H} (size 1 or stride 0 is read as a broadcast), any float dtype, or None."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    out = torch.empty(B, H, Nq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    grid = lambda meta: (B * H, triton.cdiv(Nq, meta["BLOCK_M"]))  # noqa: E731
    _forward[grid](q, k, v, bias if bias is not None else q, out, lse,
                   *q.stride(), *k.stride(), *v.stride(), *_strides4(bias), *out.stride(),
                   H, H // Hkv, Nq, Nk, scale * LOG2E, HEAD_DIM=D,
                   HAS_BIAS=bias is not None, CAUSAL=causal, FP32_DOT=q.dtype == torch.float32, BLOCK_D=head_block(D))
    return out, lse


def attention_backward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, out: Tensor, lse: Tensor, dout: Tensor, *,
                       causal: bool, scale: float, bias_grad: bool, key_bias_grad: bool = False
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """dq, dk, dv in the inputs' dtypes, and d(bias) float32 in the bias's compact shape (summed over the
    heads that share it) when `bias_grad`. A batch-broadcast bias (Bb = 1 < B) gets no gradient here:
    the backend refuses that call when its bias needs one.

    With `key_bias_grad` the bias is a per-key one, (B, 1|H, 1, Nk) (a SeparableBias's column term), and its
    gradient comes back per query head as a float32 (B, H, Nk), the column sums of dS, accumulated by the dk/dv
    kernel as it walks the query blocks (nothing (Nq, Nk)-sized is made)."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    delta = torch.linalg.vecdot(dout.float(), out.float()).contiguous()  # (B, H, Nq): rowsum(dO * O)
    dk = torch.empty(B, Hkv, Nk, D, dtype=k.dtype, device=k.device)
    dv = torch.empty(B, Hkv, Nk, D, dtype=v.dtype, device=v.device)
    shared_heads = bias is not None and _strides4(bias)[1] == 0
    dbias = None
    if key_bias_grad:
        if bias is None or bias_grad or bias.shape[2] != 1:
            raise ValueError("a per-key bias gradient needs a (B, 1|H, 1, Nk) bias and no dense bias gradient")
        dbias = torch.zeros(B, H, Nk, dtype=torch.float32, device=q.device)  # keys no query sees keep 0
    if bias_grad:
        if bias is None or bias.shape[0] != B:
            raise ValueError("a bias gradient needs a (B, 1|H, Nq, Nk) bias")
        # Tiles no query block reaches (the causal future) are never written: they start at zero.
        dbias = torch.zeros(B, 1 if shared_heads else H, Nq, Nk, dtype=torch.float32, device=q.device)
    _backward_dk_dv[lambda meta: (B * Hkv, triton.cdiv(Nk, meta["BLOCK_N"]))](
        q, k, v, bias if bias is not None else q, dout, lse, delta, dk, dv, dbias if key_bias_grad else dk,
        *q.stride(), *k.stride(), *v.stride(), *_strides4(bias), *dout.stride(), H, Hkv, H // Hkv, Nq, Nk,
        scale * LOG2E, scale, HAS_BIAS=bias is not None, KEY_BIAS_GRAD=key_bias_grad, **_fixed(q, causal))
    if key_bias_grad:
        return _per_head_dq(q, k, v, bias, dout, lse, delta, None, causal=causal, scale=scale), dk, dv, dbias
    if dbias is not None and shared_heads:  # selective's -F: one bias gradient summed over the heads
        def run(strategy: str) -> Tensor:
            return _shared_bias_dq(strategy, q, k, v, bias, dout, lse, delta, dbias, causal=causal, scale=scale)

        strategy = shared_dq_strategy((B, H, Hkv, Nq, Nk, D, q.dtype, causal), run)
        return run(strategy), dk, dv, dbias
    return _per_head_dq(q, k, v, bias, dout, lse, delta, dbias, causal=causal, scale=scale), dk, dv, dbias


def _fixed(q: Tensor, causal: bool) -> dict:
    D = q.shape[-1]
    return dict(CAUSAL=causal, FP32_DOT=q.dtype == torch.float32, BLOCK_D=head_block(D), HEAD_DIM=D)


def _per_head_dq(q, k, v, bias, dout, lse, delta, dbias, *, causal: bool, scale: float) -> Tensor:
    """dq by the per-head kernel (in registers, written once); a per-head `dbias` gets each head's dS."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dq = torch.empty(B, H, Nq, D, dtype=q.dtype, device=q.device)
    _backward_dq[lambda meta: (B * H, triton.cdiv(Nq, meta["BLOCK_M"]))](
        q, k, v, bias if bias is not None else q, dout, lse, delta, dq, dbias if dbias is not None else dq,
        *q.stride(), *k.stride(), *v.stride(), *_strides4(bias), *dout.stride(),
        *(dbias.stride() if dbias is not None else (0, 0, 0, 0)),
        H, H // Hkv, Nq, Nk, scale * LOG2E, scale, HAS_BIAS=bias is not None, BIAS_GRAD=dbias is not None,
        **_fixed(q, causal))
    return dq


def _shared_bias_dq(strategy: str, q, k, v, bias, dout, lse, delta, dbias, *, causal: bool, scale: float) -> Tensor:
    """dq for a head-shared bias, writing its gradient (summed over heads) into `dbias` (B, 1, Nq, Nk) on
    the way, by either strategy of triton_tuning.SHARED_DQ_STRATEGIES."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    atomic = strategy == "atomic"
    # atomically added into; the "recompute" strategy's kernel adds nothing (a 1-element stand-in)
    dq32 = torch.zeros(B, H, Nq, D, dtype=torch.float32, device=q.device) if atomic else dbias.new_zeros(1)
    sbb, _, sbm, sbn = _strides4(bias)
    sgb, _, sgm, sgn = dbias.stride()
    _backward_dq_dbias_shared[lambda meta: (triton.cdiv(Nk, KEY_SPAN), triton.cdiv(Nq, meta["BLOCK_M"]), B)](
        q, k, v, bias, dout, lse, delta, dq32, dbias, *q.stride(), *k.stride(), *v.stride(), sbb, sbm, sbn,
        *dout.stride(), sgb, sgm, sgn, H, H // Hkv, Nq, Nk, KEY_SPAN, scale * LOG2E, scale, WITH_DQ=atomic,
        **_fixed(q, causal))
    if atomic:
        return dq32.to(q.dtype)
    return _per_head_dq(q, k, v, bias, dout, lse, delta, None, causal=causal, scale=scale)


__all__ = ["attention_forward", "attention_backward", "INTERPRETED", "INTERPRETER_MIN_VERSION", "VERSION"]
