"""Exact attention with a trainable bias that never materialises (B, H, Nq, Nk).

Selective attention's bias -F is one (B, 1, Nq, Nk) tensor shared by every head, and it requires grad
(F depends on the selection head's q and k). Fused kernels (SDPA, xformers) read such a bias in place,
but none returns its gradient summed over heads: torch's SDPA silently falls back to its math path
(several (B, H, N, N) buffers) and xformers refuses a broadcast bias with grad. `BiasGradAttention`
runs any fused forward kernel on the detached bias, and recomputes attention in its backward one query
block at a time, producing dq, dk, dv and d(bias) summed over the heads that share it:

    P = softmax(scale q k^T + bias + causal)      per block of rows, all heads at once
    dV += P^T dO;  dP = dO V^T;  dS = P * (dP - rowsum(dO * O));  d(bias) = sum over heads of dS
    dQ = scale dS K;  dK += scale dS^T Q

Causal blocks only read the keys they can see, so the backward skips the masked upper triangle as a
flash kernel does, and keeps only that visible part of the bias (with the -inf written in), not the
bias itself. GQA folds the G query heads of a kv head into the rows of one matmul: k and v are never
copied per head. A per-head bias (RealFormer's residual scores) takes the same path; its gradient is
then per head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..ops.batch_threads import batch_workers, over_batch

# (q, k, v, bias | None, causal, scale) -> out (B, H, Nq, D), run without autograd. `bias` is detached
# and broadcastable to (B, H, Nq, Nk), with at most one row per head group (see `trainable_bias`).
ForwardKernel = Callable[[Tensor, Tensor, Tensor, "Tensor | None", bool, float], Tensor]


class BlockKernel:
    """A forward kernel that runs on the masked bias blocks the backward keeps (`masked_bias_blocks`),
    so the forward builds no masks of its own: call(q, k, v, masks, blocks, scale) -> out."""

    def rows(self, device: torch.device) -> int:
        """Query rows per block on this device."""
        raise NotImplementedError

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, masks: list[Tensor], blocks: list["Block"], scale: float) -> Tensor:
        raise NotImplementedError


# Query rows recomputed at once in the backward (all heads of one batch element). Small blocks skip
# more of the causal triangle; large ones amortise per-call overhead (GPUs want large). On 2 CPU cores
# (H 8, N 1024, D 64) 64 rows beat 32 and 128.
BACKWARD_BLOCK = {"cpu": 64}
DEFAULT_BACKWARD_BLOCK = 512
# ...but never more than this many score elements in flight (two such buffers live at once).
MAX_BLOCK_ELEMENTS = 1 << 23


def is_head_broadcast(bias: Tensor) -> bool:
    """True when every head reads the same (Nq, Nk) slice: size 1 or stride 0 on the head dim."""
    return bias.dim() == 4 and (bias.shape[1] == 1 or bias.stride(1) == 0)




def visible_keys(row_start: int, row_stop: int, q_len: int, k_len: int, key_stop: int, device) -> Tensor:
    """Bool (rows, keys): True where query row may see key column (bottom-right aligned causal)."""
    offset = k_len - q_len
    i = torch.arange(row_start, row_stop, device=device)[:, None]
    j = torch.arange(key_stop, device=device)[None, :]
    return j <= i + offset


def causal_key_stop(row_stop: int, q_len: int, k_len: int, causal: bool) -> int:
    """How many leading keys rows < row_stop can see: the rest of the row block is masked anyway."""
    return min(k_len, max(row_stop + k_len - q_len, 0)) if causal else k_len


def backward_block(device: torch.device, heads: int, k_len: int) -> int:
    rows = BACKWARD_BLOCK.get(device.type, DEFAULT_BACKWARD_BLOCK)
    return max(1, min(rows, MAX_BLOCK_ELEMENTS // max(1, heads * k_len)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and softmax are recomputed in float32 for half types, as the fused kernels accumulate."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass(frozen=True)
class Block:
    """Query rows [start, stop) and the keys [0, keys) they can see; keys from `first_hidden` on are
    in some row's future (`hidden`: bool (rows, keys - first_hidden), True where masked)."""

    start: int
    stop: int
    keys: int
    first_hidden: int
    hidden: Tensor | None


def plan_blocks(q_len: int, k_len: int, causal: bool, rows: int, device, start: int = 0,
                stop: int | None = None) -> list[Block]:
    """Blocks of `rows` query rows (of q_len queries against k_len keys, bottom-right aligned), over the
    query rows [start, stop): all of them by default."""
    blocks = []
    stop = q_len if stop is None else stop
    for i0 in range(start, stop, rows):
        i1 = min(stop, i0 + rows)
        kv = causal_key_stop(i1, q_len, k_len, causal)
        first_hidden = max(0, i0 + k_len - q_len + 1) if causal else kv  # keys before it are seen by every row
        hidden = ~visible_keys(i0, i1, q_len, k_len, kv, device)[:, first_hidden:] if first_hidden < kv else None
        blocks.append(Block(i0, i1, kv, first_hidden, hidden))
    return blocks


def masked_bias_blocks(bias: Tensor, blocks: list[Block]) -> list[Tensor]:
    """bias[..., start:stop, :keys] of each block as its own tensor, the causal -inf written in.

    What the backward keeps instead of the bias: only the part causal attention reads (about half of
    it), so the bias itself can be freed after the forward."""
    out = []
    for blk in blocks:
        part = bias[:, :, blk.start:blk.stop, :blk.keys].clone()
        if blk.hidden is not None:
            part[..., blk.first_hidden:].masked_fill_(blk.hidden, float("-inf"))
        out.append(part)
    return out


def attention_backward(q: Tensor, k: Tensor, v: Tensor, bias_blocks: list[Tensor] | None, out: Tensor, dout: Tensor, *,
                       blocks: list[Block], causal: bool, scale: float, bias_shape: tuple | None = None
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """dq, dk, dv and d(bias) of out = softmax(scale q k^T + bias + causal) v, one query block at a time.

    q, out, dout: (B, H, Nq, D); k, v: (B, Hkv, Nk, D). `blocks` from `plan_blocks`; `bias_blocks` from
    `masked_bias_blocks` of a (Bb, Hb, Nq, Nk) bias over those blocks, Bb in {1, B}, Hb in {1, H}, or
    None (then the causal mask is applied here). Blocks larger than the backward's own are recomputed
    in parts. With `bias_shape`, d(bias) is returned in that shape, summed over the heads (and batch)
    that share a slice.

    One batch element at a time: its heads are a plain bmm batch whatever the strides of the projected
    q, k, v (no copies). On CPU the batch elements are shared out among the intra-op threads, each
    running its ops single-threaded: the blocks' ops are too small for torch's own threading to pay
    (docs/benchmarks.md, "Measurements behind the code's constants").
    """
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    ct = compute_dtype(q.dtype)
    grads = _Grads(
        dq=torch.empty(B, H, Nq, D, dtype=ct, device=q.device),
        dk=torch.zeros(B, Hkv, Nk, D, dtype=ct, device=q.device),
        dv=torch.zeros(B, Hkv, Nk, D, dtype=ct, device=q.device),
        dbias=None if bias_shape is None else torch.zeros(bias_shape, dtype=ct, device=q.device))
    part_rows = backward_block(q.device, H, Nk)
    work = []  # (part of a block, the saved bias rows it reads or None)
    for blk, mask in zip(blocks, bias_blocks if bias_blocks is not None else [None] * len(blocks)):
        for part in plan_blocks(Nq, Nk, causal, part_rows, q.device, start=blk.start, stop=blk.stop):
            work.append((part, None if mask is None else mask[:, :, part.start - blk.start:part.stop - blk.start, :part.keys]))
    rows = max(part.stop - part.start for part, _ in work)
    delta = torch.linalg.vecdot(dout.to(ct), out.to(ct))  # (B, H, Nq) = rowsum(P * dP)

    workers = batch_workers(B, q.device)  # on CPU the batch elements are shared out among the threads
    if grads.dbias is not None and grads.dbias.shape[0] == 1:
        workers = 1  # batch elements add into one shared slice of d(bias)
    # Buffers come from this thread: allocations made in the workers inflate the resident size through
    # glibc's per-thread heaps (docs/benchmarks.md).
    buffers = [_Buffers(H, Hkv, rows, Nq, Nk, D, ct, q.device) for _ in range(workers)]

    def run(batch_elements: range, worker: int) -> None:
        for b in batch_elements:
            _backward_one(q, k, v, work, delta, dout, b, scale, buffers[worker], grads)

    over_batch(B, workers, run)
    return grads.dq.to(q.dtype), grads.dk.to(k.dtype), grads.dv.to(v.dtype), grads.dbias


@dataclass
class _Grads:
    dq: Tensor
    dk: Tensor
    dv: Tensor
    dbias: Tensor | None


class _Buffers:
    """Everything one worker writes, allocated once and reused by every batch element and block: no
    allocation happens inside the loop (blocks of varying size would also fragment the CPU heap)."""

    def __init__(self, H, Hkv, rows, Nq, Nk, D, dtype, device):
        def empty(*shape):
            return torch.empty(*shape, dtype=dtype, device=device)

        self.scores, self.probs = empty(H * rows * Nk), empty(H * rows * Nk)
        self.kv_grad = empty(Hkv * Nk * D)  # one block's dk or dv before it is added
        self.dq = empty(H * rows * D)  # one block's dq before it is scaled into place
        self.qs, self.do = empty(H, Nq, D), empty(H, Nq, D)  # one batch element's scaled q and dout


def _backward_one(q, k, v, work: list[tuple[Block, Tensor | None]], delta, dout, b: int, scale: float, buf: _Buffers,
                  g: _Grads) -> None:
    """Batch element b's share of every gradient, block by block."""
    H, Nq, D = q.shape[1:]
    Hkv = k.shape[1]
    G = H // Hkv
    ct = g.dq.dtype
    kb_all, vb_all = k[b].to(ct), v[b].to(ct)  # (Hkv, Nk, D)
    qs = buf.qs.copy_(q[b]).mul_(scale)  # (H, Nq, D) in the compute dtype, pre-scaled: S needs no extra pass
    do = buf.do.copy_(dout[b])
    for blk, mask in work:
        i0, i1, kv = blk.start, blk.stop, blk.keys
        n = i1 - i0
        if kv == 0:  # rows that see no key at all (more queries than keys): no gradient
            g.dq[b, :, i0:i1] = 0
            continue
        # The G query heads of each kv head become G * n rows of one matmul against that kv head.
        qb = qs[:, i0:i1].reshape(Hkv, G * n, D)
        dob = do[:, i0:i1].reshape(Hkv, G * n, D)
        kb, vb = kb_all[:, :kv], vb_all[:, :kv]  # (Hkv, kv, D) views
        size = H * n * kv
        scores = torch.bmm(qb, kb.transpose(1, 2), out=buf.scores[:size].view(Hkv, G * n, kv))
        grouped = scores.view(Hkv, G, n, kv)
        if mask is not None:  # the causal -inf is already in it
            grouped.add_(_grouped_bias(mask[b if mask.shape[0] > 1 else 0], Hkv, G))
        elif blk.hidden is not None:  # mask only the diagonal band, not the whole block
            grouped[..., blk.first_hidden:].masked_fill_(blk.hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1, out=buf.probs[:size].view(Hkv, G * n, kv))
        # A row that sees no key (more queries than keys, or a bias that masks it whole) has an all -inf
        # score row, whose softmax is NaN: its P is 0 instead (selected, as NaN * 0 would stay NaN).
        probs.masked_fill_(scores.amax(dim=-1, keepdim=True) == float("-inf"), 0.0)
        kv_grad = buf.kv_grad[: Hkv * kv * D].view(Hkv, kv, D)
        g.dv[b, :, :kv] += torch.bmm(probs.transpose(1, 2), dob, out=kv_grad)  # sums the G heads and n rows
        dS = torch.bmm(dob, vb.transpose(1, 2), out=scores)  # dP, turned into dS in place
        dS.sub_(delta[b, :, i0:i1].reshape(Hkv, G * n, 1)).mul_(probs)
        if g.dbias is not None:
            _add_bias_grad(dS.view(H, n, kv), g.dbias, b, i0, i1, kv)
        dq = torch.bmm(dS, kb, out=buf.dq[: H * n * D].view(Hkv, G * n, D))
        torch.mul(dq.view(H, n, D), scale, out=g.dq[b, :, i0:i1])
        g.dk[b, :, :kv] += torch.bmm(dS.transpose(1, 2), qb, out=kv_grad)  # qb carries the scale already


def _grouped_bias(block: Tensor, kv_heads: int, group: int) -> Tensor:
    """(1|H, n, kv) -> broadcastable to (Hkv, G, n, kv) as a view."""
    return block.unsqueeze(0) if block.shape[0] == 1 else block.unflatten(0, (kv_heads, group))


def _add_bias_grad(dS: Tensor, dbias: Tensor, b: int, i0: int, i1: int, kv: int) -> None:
    """Add batch element b's (H, n, kv) score gradient into dbias (Bb, Hb, Nq, Nk), summing the heads
    (and batch elements) that share one bias slice."""
    target = dbias[b if dbias.shape[0] > 1 else 0, :, i0:i1, :kv]  # (Hb, n, kv)
    shared_batch = dbias.shape[0] == 1 and b > 0
    if dbias.shape[1] == 1:
        if shared_batch:
            target += dS.sum(dim=0, keepdim=True)
        else:
            torch.sum(dS, dim=0, keepdim=True, out=target)
    elif shared_batch:
        target += dS
    else:
        target.copy_(dS)


class BiasGradAttention(torch.autograd.Function):
    """softmax(scale q k^T + bias + causal) v: fused forward, blockwise recomputed backward.

    `bias` is (Bb, Hb, Nq, Nk), Bb in {1, B}, Hb in {1, H}: pass a head-broadcast bias compact
    (see `trainable_bias`). The backward keeps only the causally visible blocks of the bias, with the
    -inf written in. With `spread_heads`, the caller passed a stride-0 expansion whose source was not
    found: the head-summed gradient is handed back spread evenly over the H views (their sum, which
    the expand's backward takes, is then the exact gradient up to rounding).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, causal: bool, scale: float,
                kernel: ForwardKernel | BlockKernel, spread_heads: int = 0) -> Tensor:
        compact = (bias[:, :1] if spread_heads else bias).detach()
        q_, k_, v_ = q.detach(), k.detach(), v.detach()
        with torch.no_grad():
            if isinstance(kernel, BlockKernel):  # the forward reads the very blocks the backward keeps
                blocks = plan_blocks(q.shape[2], k.shape[2], causal, kernel.rows(q.device), q.device)
                masks = masked_bias_blocks(compact, blocks)
                out = kernel(q_, k_, v_, masks, blocks, scale)
            else:
                out = kernel(q_, k_, v_, compact, causal, scale)
                blocks = plan_blocks(q.shape[2], k.shape[2], causal, backward_block(q.device, q.shape[1], k.shape[2]),
                                     q.device)
                masks = masked_bias_blocks(compact, blocks)
        ctx.save_for_backward(q, k, v, out, *masks)
        ctx.blocks, ctx.causal, ctx.scale, ctx.spread_heads = blocks, causal, scale, spread_heads
        ctx.compact_shape, ctx.bias_shape, ctx.bias_dtype = compact.shape, bias.shape, bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        q, k, v, out, *masks = ctx.saved_tensors
        dq, dk, dv, dbias = attention_backward(q, k, v, masks, out, dout, blocks=ctx.blocks, causal=ctx.causal,
                                               scale=ctx.scale,
                                               bias_shape=ctx.compact_shape if ctx.needs_input_grad[3] else None)
        if dbias is not None:
            dbias = dbias.to(ctx.bias_dtype)
            if ctx.spread_heads:
                dbias = spread_over_heads(dbias, ctx.spread_heads, ctx.bias_shape)
        return dq, dk, dv, dbias, None, None, None, None


def trainable_bias(bias: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, int]:
    """The tensor to differentiate for a trainable bias, and `spread_heads`.

    Pass a head-shared bias compact, (B, 1, Nq, Nk): its gradient is then summed over heads in place. A
    stride-0 head expansion is returned as it is with spread_heads = H: the caller reads its head 0 and
    hands the head-summed gradient back spread over the H views (`spread_over_heads`), which the expand's
    backward sums again (exact up to rounding, at the cost of an (B, H, Nq, Nk) gradient view)."""
    if bias.dim() != 4:
        raise ValueError(f"bias must be 4-D (B, H, Nq, Nk), got shape {tuple(bias.shape)}")
    if bias.shape[2:] != (q.shape[2], k.shape[2]):
        bias = bias.expand(bias.shape[0], bias.shape[1], q.shape[2], k.shape[2])
    if is_head_broadcast(bias) and bias.shape[1] > 1:  # a stride-0 expansion: read head 0, spread the gradient
        return bias, bias.shape[1]
    return bias, 0


def spread_over_heads(dbias: Tensor, spread_heads: int, shape: torch.Size) -> Tensor:
    """A head-summed gradient as the gradient of a stride-0 head expansion: each view gets 1/H of it,
    and the expand's backward sums them back (exact up to rounding)."""
    return (dbias / spread_heads).expand(shape)


def bias_grad_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, *, causal: bool, scale: float,
                        kernel: ForwardKernel | BlockKernel) -> Tensor:
    """Run `kernel` forward with an exact, memory-lean backward for a bias that requires grad."""
    bias, spread_heads = trainable_bias(bias, q, k)
    return BiasGradAttention.apply(q, k, v, bias, causal, scale, kernel, spread_heads)


__all__ = [
    "BiasGradAttention", "Block", "BlockKernel", "attention_backward", "bias_grad_attention",
    "is_head_broadcast", "masked_bias_blocks", "plan_blocks", "spread_over_heads", "trainable_bias", "visible_keys",
    "causal_key_stop", "ForwardKernel"
]
