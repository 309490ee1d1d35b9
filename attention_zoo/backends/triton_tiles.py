"""Tile helpers shared by the Triton kernels (`triton_kernels.py`, `ops/selection/triton.py`).

Every kernel loads (rows, head dim) tiles with the same masks, multiplies them with the same precision
rule and finds where the causal triangle starts; these small `@triton.jit` functions are inlined where
they are called, so they cost nothing at run time.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rows_tile(base, offs, valid, stride, offs_d, dims, stride_d):
    """A (rows, BLOCK_D) tile of a (rows, head dim) matrix; rows past the end and head-dim padding read 0."""
    return tl.load(base + offs[:, None] * stride + offs_d[None, :] * stride_d, mask=valid[:, None] & dims[None, :],
                   other=0.0)


@triton.jit
def cols_tile(base, offs, valid, stride, offs_d, dims, stride_d):
    """The same rows loaded transposed, (BLOCK_D, rows): k^T and v^T as the right operand of q k^T, dO v^T."""
    return tl.load(base + offs[None, :] * stride + offs_d[:, None] * stride_d, mask=valid[None, :] & dims[:, None],
                   other=0.0)


@triton.jit
def dot(a, b, FP32_DOT: tl.constexpr):
    """a @ b accumulated in float32. fp32 inputs use IEEE fp32 products (no TF32: exact to 1e-5); fp16/bf16
    round the left operand to b's dtype first (P and dS are float32 in registers), as flash kernels do."""
    if FP32_DOT:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a.to(b.dtype), b)
    return c


@triton.jit
def exclusive_rows(x):
    """out[i, :] = sum of x[i', :] over the tile's rows i' < i, float32 (M, N), exact where x holds infinities.

    `tl.cumsum(x) - x` would give inf - inf = NaN on the row holding a +inf (whose own sum is finite): the
    finite part is summed apart, and a row with an infinity above it gets that infinity (NaN for both
    signs, as the sum itself is)."""
    pos = x == float("inf")
    neg = x == float("-inf")
    finite = tl.where(pos | neg, 0.0, x)
    out = tl.cumsum(finite, axis=0) - finite
    pos_count = pos.to(tl.int32)
    neg_count = neg.to(tl.int32)
    pos_above = (tl.cumsum(pos_count, axis=0) - pos_count) > 0
    neg_above = (tl.cumsum(neg_count, axis=0) - neg_count) > 0
    out = tl.where(pos_above, float("inf"), out)
    return tl.where(neg_above, tl.where(pos_above, float("nan"), float("-inf")), out)


@triton.jit
def reverse_exclusive_rows(x):
    """out[i, :] = sum of x[i', :] over the tile's rows i' > i (gradients: finite)."""
    return tl.sum(x, axis=0)[None, :] - tl.cumsum(x, axis=0)


@triton.jit
def first_query_block(first_query, Nq, BLOCK_M: tl.constexpr):
    """The query block that holds query `first_query`, clamped to [0, number of query blocks]: where a key
    block's walk down the queries starts under a causal mask (earlier blocks see none of its keys)."""
    return tl.minimum(tl.maximum(first_query, 0) // BLOCK_M, tl.cdiv(Nq, BLOCK_M))


@triton.jit
def key_end(m_block, Nq, Nk, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """One past the last key that query block `m_block` sees (bottom-right aligned causal mask: query i
    sees keys j <= i + Nk - Nq); all Nk keys without the mask."""
    end = Nk
    if CAUSAL:
        end = tl.minimum(Nk, (m_block + 1) * BLOCK_M + Nk - Nq)
    return end


@triton.jit
def unmasked_key_end(m_block, Nq, Nk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """The keys before this (a whole number of key blocks) are in bounds and seen by every row of query block
    `m_block`: their tiles need no mask. Its first row sees the fewest keys, j <= first row + Nk - Nq."""
    end = Nk
    if CAUSAL:
        end = tl.minimum(Nk, tl.maximum(m_block * BLOCK_M + Nk - Nq + 1, 0))
    return end // BLOCK_N * BLOCK_N


@triton.jit
def unmasked_query_start(n_block, Nq, Nk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """The query blocks from this row on see every key of key block `n_block` (its last key included):
    their tiles need no causal mask. Rows and keys past the ends need none either in the dk/dv walk, since
    P is 0 on rows past the end (their log-sum-exp reads as inf) and keys past the end are never stored."""
    start = 0
    if CAUSAL:
        last_key = n_block * BLOCK_N + BLOCK_N - 1
        start = tl.minimum(tl.cdiv(tl.maximum(last_key - (Nk - Nq), 0), BLOCK_M) * BLOCK_M, tl.cdiv(Nq, BLOCK_M) * BLOCK_M)
    return start


@triton.jit
def heavy_first(pid, count):
    """Program `pid` of `count` takes block count - 1 - pid: under a causal mask the last query blocks see
    the most keys, and launching them first keeps the last wave of the grid from being its longest."""
    return count - 1 - pid


__all__ = [
    "rows_tile", "cols_tile", "dot", "exclusive_rows", "reverse_exclusive_rows", "first_query_block", "key_end",
    "unmasked_key_end", "unmasked_query_start",
    "heavy_first"
]
