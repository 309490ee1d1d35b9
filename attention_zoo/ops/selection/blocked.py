"""Selective attention over query blocks in PyTorch: F is kept at block boundaries only, never (B, Nq, Nk).

With query blocks of BM rows, block b covering rows [b*BM, (b+1)*BM) (Leviathan, Kalman, Matias,
"Selective Attention Improves Transformer", ICLR 2025, section 3, rearranged):

- G[b, j] = F[b*BM, j] = accumulated[j] + sum of S[i, j] over the rows i of earlier blocks: (B, Nblocks, Nk),
  at least float32, made in the forward as a running column sum and kept for the backward.
- Inside block b: F[i, j] = G[b, j] + exclusive cumulative sum of the block's recomputed S rows before i.
- The forward runs SDPA per block with that block's bias -F (B, 1, BM, keys) and the causal -inf.
- The backward walks the blocks from last to first, recomputing S, F and the softmax per block. With
  dF[i, j] = -sum over heads of d(logits)[h, i, j] (-F enters every head's logits),
  dS[i', j] = sum over i > i' of dF[i, j]: the reverse exclusive cumsum inside the block plus `carry`, the
  column sum of dF over all later blocks. dL_s = weight * dS where S was kept and L_s > 0, else 0.

Per block the work holds (B, H, BM, keys) scores: memory is about vanilla attention's. On CPU the batch
elements are shared out among torch's threads, each running the block loop single-threaded (see
ops/batch_threads.py). Deterministic: every sum runs in a fixed order (for a given number of threads).
A query row that sees no key (more queries than keys) gives output 0 and zero gradients.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as tF
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..batch_threads import batch_workers, over_batch
from .structure import Selection, SelectionTerm

# Query rows per block. On 2 CPU cores (B 4, H 8, N 1024, D 64) blocks of 64 balance the per-block overhead
# against the causal triangle each block skips (docs/benchmarks.md, "Measurements behind the code's constants").
DEFAULT_BLOCK = {"cpu": 64}
FALLBACK_BLOCK = 128


def block_rows(device: torch.device) -> int:
    return DEFAULT_BLOCK.get(device.type, FALLBACK_BLOCK)


def _sdpa_kwargs(q: Tensor, k: Tensor, scale: float) -> dict:
    return {"scale": scale, "enable_gqa": True} if k.shape[1] != q.shape[1] else {"scale": scale}


@dataclass(frozen=True)
class _PreparedTerm:
    """A term's operands, once per call: q_s (B, Nq, Ds) with its scale folded in and k_s (B, Nk, Ds),
    contiguous in F's dtype."""

    q: Tensor
    k: Tensor
    weight: float
    protect_bos: bool

    @classmethod
    def of(cls, term: SelectionTerm, dtype: torch.dtype) -> "_PreparedTerm":
        return cls((term.q.to(dtype) * term.scale).contiguous(), term.k.to(dtype).contiguous(), term.weight,
                   term.protect_bos)

    def batch(self, elements: slice) -> "_PreparedTerm":
        """The same term for some batch elements only (views, no copies)."""
        return replace(self, q=self.q[elements], k=self.k[elements])


def _key_offsets(i0: int, i1: int, keys: int, offset: int, device) -> tuple[int, Tensor]:
    """(col0, diff) for rows [i0, i1) against keys [0, keys): every row's key index is at least col0 (the
    block's first row's, clipped to [0, keys]), so every row sees every key before col0 and both causal masks
    touch only the tile of keys [col0, keys); diff (n, keys - col0) int = key index - the row's key index.
    Attention hides diff > 0; the selection keeps only strictly earlier keys, diff < 0."""
    col0 = min(max(i0 + offset, 0), keys)
    i = torch.arange(i0, i1, device=device)[:, None] + offset  # row i sits at key index i + offset
    j = torch.arange(col0, keys, device=device)[None, :]
    return col0, j - i


def _blind_rows(col0: int, diff: Tensor) -> Tensor | None:
    """Bool (n,) of rows that see no key at all (more queries than keys), or None when there are none."""
    if col0 > 0:
        return None
    blind = (diff > 0).all(dim=1)
    return blind if bool(blind.any()) else None


def _block_scores(term: _PreparedTerm, i0: int, i1: int, keys: int, offset: int) -> Tensor:
    """S = ReLU(L) of rows [i0, i1) against keys [0, keys) on strictly earlier keys (never BOS if protected),
    else 0: (B, n, keys) in the prepared term's dtype."""
    S = torch.bmm(term.q[:, i0:i1], term.k[:, :keys].transpose(1, 2)).clamp_min_(0)
    col0, diff = _key_offsets(i0, i1, keys, offset, S.device)
    S[:, :, col0:].masked_fill_(diff >= 0, 0)  # strictly earlier keys only
    if term.protect_bos and keys > 0:
        S[:, :, 0] = 0
    return S


def _block_bias(terms: list[_PreparedTerm], i0: int, i1: int, keys: int, offset: int, start: Tensor,
                want_inactive: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """-F of rows [i0, i1) against keys [0, keys), given F's first row `start` (B, keys): (B, n, keys) in
    start's dtype. Also the weighted sum of S (for the running column sum) and, on request, each term's
    mask (B, n, keys) of where dL = 0: S = ReLU(L) on strictly earlier keys is > 0 exactly where dL = dS.

    Few, whole-block operations on purpose: each is one pass over (B, n, keys), whose fixed cost (with
    torch's threading, a parallel region) is paid per block."""
    total = None
    inactive = []
    for term in terms:
        S = _block_scores(term, i0, i1, keys, offset)
        if want_inactive:
            inactive.append(S <= 0)
        if term.weight != 1.0:
            S = S.mul_(term.weight)
        total = S if total is None else total.add_(S)
    # -F[i] = -start - sum of the block's rows before i: the rows shifted down by one, negated, summed.
    neg_F = torch.empty_like(total)
    torch.neg(start, out=neg_F[:, 0])
    torch.neg(total[:, :-1], out=neg_F[:, 1:])
    return neg_F.cumsum_(dim=1), total, inactive


def _mask_causal(bias: Tensor, i0: int, i1: int, keys: int, offset: int) -> Tensor | None:
    """Put the causal -inf into a block's bias (B, n, keys) in place; rows that see no key get bias 0 (their
    output and gradients are zeroed by the caller). Returns those rows (bool (n,)) or None."""
    col0, diff = _key_offsets(i0, i1, keys, offset, bias.device)
    bias[:, :, col0:].masked_fill_(diff > 0, float("-inf"))
    blind = _blind_rows(col0, diff)
    if blind is not None:
        bias[:, blind] = 0
    return blind


class BlockedSelectiveAttention(torch.autograd.Function):
    """q (B, H, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), then each term's q_s, k_s and accumulated
    (flattened, so autograd routes their gradients) -> out (B, H, Nq, Dv)."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, rows: int, meta: tuple, *term_tensors):
        terms = _terms(meta, term_tensors)
        B, H, Nq, _ = q.shape
        Nk = k.shape[2]
        offset = Nk - Nq
        fdtype = torch.promote_types(terms[0].q.dtype, torch.float32)
        prepared = [_PreparedTerm.of(t, fdtype) for t in terms]
        running = _start_row(terms, B, Nk, fdtype, q.device)
        n_blocks = -(-Nq // rows)
        G = torch.empty(B, n_blocks, Nk, dtype=fdtype, device=q.device)
        out = q.new_zeros(B, H, Nq, v.shape[-1])
        kwargs = _sdpa_kwargs(q, k, scale)

        def run(batch: range, worker: int) -> None:
            """The blocks, first to last, for the batch elements `batch`."""
            e = slice(batch.start, batch.stop)
            terms_ = [p.batch(e) for p in prepared]
            for b in range(n_blocks):
                i0, i1 = b * rows, min(Nq, (b + 1) * rows)
                keys = min(Nk, i1 + offset) if causal else Nk
                G[e, b] = running[e]
                if keys <= 0:
                    continue  # no row of this block sees a key: output 0
                bias, S_sum, _ = _block_bias(terms_, i0, i1, keys, offset, running[e, :keys], False)
                running[e, :keys] += S_sum.sum(dim=1)
                bias = bias.to(q.dtype)
                blind = _mask_causal(bias, i0, i1, keys, offset) if causal else None
                o = tF.scaled_dot_product_attention(q[e, :, i0:i1], k[e, :, :keys], v[e, :, :keys],
                                                    attn_mask=bias[:, None], **kwargs)
                if blind is not None:
                    o[:, :, blind] = 0
                out[e, :, i0:i1] = o

        over_batch(B, batch_workers(B, q.device), run)
        ctx.save_for_backward(q, k, v, out, G, *term_tensors)
        ctx.causal, ctx.scale, ctx.rows, ctx.meta = causal, scale, rows, meta
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        q, k, v, out, G, *term_tensors = ctx.saved_tensors
        terms = _terms(ctx.meta, term_tensors)
        grads = selective_backward(q, k, v, out, dout, G, terms, causal=ctx.causal, scale=ctx.scale, rows=ctx.rows)
        dq, dk, dv, dterms = grads
        flat = []
        for term, (dqs, dks, dacc) in zip(terms, dterms):
            flat += [dqs.to(term.q.dtype), dks.to(term.k.dtype)]
            if term.accumulated is not None:
                flat.append(dacc.to(term.accumulated.dtype))
        return (dq, dk, dv, None, None, None, None, *flat)


def selective_backward(q, k, v, out, dout, G, terms, *, causal: bool, scale: float, rows: int):
    """Gradients of `BlockedSelectiveAttention`: dq, dk, dv and per term (dq_s, dk_s, d accumulated).

    On CPU the batch elements are shared out among torch's threads, each running its blocks single-threaded
    (ops/batch_threads.py): a block's ops are too small for torch's own threading to pay."""
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    group = H // Hkv
    offset = Nk - Nq
    ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    fdtype = G.dtype
    # Every operand once in the compute dtype and contiguous: the model hands q, k, v transposed from its
    # projection layout, and a block's slice of a transposed k or v would be copied again by every block's
    # matmul (O(N^2) copying). The softmax scale is folded into q and k here instead of into every block.
    qs = torch.mul(q, scale, out=torch.empty(q.shape, dtype=ct, device=q.device))  # logits = (scale q) k^T; dk = dS^T (scale q)
    kc = k.to(ct).contiguous()
    ks = kc * scale  # dq = dS (scale k)
    vc = v.to(ct).contiguous()
    do = dout.to(ct).contiguous()
    neg_delta = torch.linalg.vecdot(do, out.to(ct)).neg_()  # (B, H, Nq): -rowsum(P * dP)
    dq = torch.empty(B, H, Nq, D, dtype=ct, device=q.device)
    dk = torch.zeros(B, Hkv, Nk, D, dtype=ct, device=q.device)
    dv = torch.zeros(B, Hkv, Nk, Dv, dtype=ct, device=q.device)
    prepared = [_PreparedTerm.of(t, fdtype) for t in terms]
    # dL scaled by the term's weight and the selection scale, folded into the operands it multiplies
    scaled = [(p.k * (t.weight * t.scale), p.q * t.weight) for p, t in zip(prepared, terms)]
    dterms = [(torch.zeros(t.q.shape, dtype=fdtype, device=q.device), torch.zeros(t.k.shape, dtype=fdtype, device=q.device))
              for t in terms]
    # sum over heads of d(logits) = -dF, summed over the rows of the blocks already done (the later ones)
    carry = torch.zeros(B, Nk, dtype=fdtype, device=q.device)
    workers = batch_workers(B, q.device)
    # Each worker's (batch, heads, rows, keys) scratch, allocated here and reused by every block: tensors
    # allocated inside worker threads come from glibc's per-thread heaps, which keep their peak (the model at
    # 4096 tokens: 1.13x vanilla's peak memory with the scratch made in the workers, 1.06x with it made here;
    # docs/benchmarks.md).
    most = -(-B // workers) * H * min(rows, Nq) * Nk
    scratch = [[torch.empty(most, dtype=ct, device=q.device) for _ in range(3)] for _ in range(workers)]

    def run(batch: range, worker: int) -> None:
        """The blocks, last to first, for the batch elements `batch` (each output slice written by one worker)."""
        e = slice(batch.start, batch.stop)
        nb = len(batch)
        logits_buf, probs_buf, dlogits_buf = scratch[worker]
        kc_, ks_, vc_, dk_, dv_ = (t[e].view(nb * Hkv, Nk, -1) for t in (kc, ks, vc, dk, dv))
        terms_ = [p.batch(e) for p in prepared]
        for b in range(G.shape[1] - 1, -1, -1):
            i0, i1 = b * rows, min(Nq, (b + 1) * rows)
            n = i1 - i0
            keys = min(Nk, i1 + offset) if causal else Nk
            if keys <= 0:
                dq[e, :, i0:i1] = 0
                continue
            bias, _, inactive = _block_bias(terms_, i0, i1, keys, offset, G[e, b, :keys], True)
            bias = bias.to(ct)
            blind = _mask_causal(bias, i0, i1, keys, offset) if causal else None
            qb = qs[e, :, i0:i1].reshape(nb * Hkv, group * n, D)  # a group's query heads side by side per kv head
            shape, size = (nb * Hkv, group * n, keys), nb * H * n * keys
            logits = torch.bmm(qb, kc_[:, :keys].transpose(1, 2), out=logits_buf[:size].view(shape))
            logits.view(nb, Hkv, group, n, keys).add_(bias[:, None, None])
            probs = torch.softmax(logits, dim=-1, out=probs_buf[:size].view(shape))
            if blind is not None:
                probs.view(nb, Hkv, group, n, keys)[..., blind, :] = 0  # a row that sees no key contributes nothing
            dob = do[e, :, i0:i1].reshape(nb * Hkv, group * n, Dv)
            dv_[:, :keys].baddbmm_(probs.transpose(1, 2), dob)
            dlogits = torch.baddbmm(neg_delta[e, :, i0:i1].reshape(nb * Hkv, group * n, 1), dob, vc_[:, :keys].transpose(1, 2),
                                    out=dlogits_buf[:size].view(shape)).mul_(probs)  # P * (dP - delta)
            dq[e, :, i0:i1] = torch.bmm(dlogits, ks_[:, :keys]).view(nb, H, n, D)
            dk_[:, :keys].baddbmm_(dlogits.transpose(1, 2), qb)
            # dS_sel[i'] = sum over i > i' of dF[i] + the later blocks' = inclusive[i'] - block sum - carry (dF = -sum)
            inclusive = dlogits.view(nb, H, n, keys).sum(dim=1).to(fdtype).cumsum_(dim=1)
            block_sum = inclusive[:, -1].clone()
            dsel = inclusive.sub_((block_sum + carry[e, :keys])[:, None])
            carry[e, :keys] += block_sum
            for index, ((k_scaled, q_scaled), zero, (dqs, dks)) in enumerate(zip(scaled, inactive, dterms)):
                dL = dsel if index == len(scaled) - 1 else dsel.clone()  # the last term may consume dsel
                dL.masked_fill_(zero, 0)
                dqs[e, i0:i1].baddbmm_(dL, k_scaled[e, :keys])
                dks[e, :keys].baddbmm_(dL.transpose(1, 2), q_scaled[e, i0:i1])

    over_batch(B, workers, run)
    dacc = [carry * -t.weight for t in terms]  # accumulated[j] enters every row's F
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), [(dqs, dks, da) for (dqs, dks), da in zip(dterms, dacc)])


def _start_row(terms, B: int, Nk: int, dtype, device) -> Tensor:
    """F of the first query row: the weighted accumulators (zeros without a cache)."""
    running = torch.zeros(B, Nk, dtype=dtype, device=device)
    for t in terms:
        if t.accumulated is not None:
            running.add_(t.accumulated.to(dtype), alpha=t.weight)
    return running


def _flatten(selection: Selection) -> tuple[tuple, list[Tensor]]:
    """(meta, tensors): what autograd.Function takes for the terms (tensors flat, the rest hashable)."""
    meta, tensors = [], []
    for t in selection.terms:
        meta.append((t.scale, t.protect_bos, t.weight, t.accumulated is not None))
        tensors += [t.q, t.k] + ([t.accumulated] if t.accumulated is not None else [])
    return tuple(meta), tensors


def _terms(meta: tuple, tensors) -> list[SelectionTerm]:
    terms, pos = [], 0
    for scale, protect_bos, weight, has_acc in meta:
        q, k = tensors[pos], tensors[pos + 1]
        acc = tensors[pos + 2] if has_acc else None
        pos += 3 if has_acc else 2
        terms.append(SelectionTerm(q, k, scale, protect_bos, weight, acc))
    return terms


def selective_attention(q: Tensor, k: Tensor, v: Tensor, selection: Selection, *, causal: bool, scale: float,
                        rows: int | None = None) -> Tensor:
    """softmax(scale q k^T - F + causal) v over query blocks of `rows` (default per device), F never stored.

    q: (B, H, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv), H % Hkv == 0; `selection` of shape
    (B, Nq, Nk). Returns (B, H, Nq, Dv) in q's dtype. Raises ValueError on mismatched shapes."""
    Bs, Nqs, Nks = selection.shape
    if (Bs, Nqs, Nks) != (q.shape[0], q.shape[2], k.shape[2]):
        raise ValueError(f"selection (B, Nq, Nk) = {(Bs, Nqs, Nks)} does not match q{tuple(q.shape)} k{tuple(k.shape)}")
    rows = rows or block_rows(q.device)
    meta, tensors = _flatten(selection)
    return BlockedSelectiveAttention.apply(q, k, v, causal, scale, rows, meta, *tensors)


__all__ = ["BlockedSelectiveAttention", "selective_attention", "selective_backward", "column_sums", "block_rows", "DEFAULT_BLOCK"]


def column_sums(term: SelectionTerm, rows: int | None = None) -> Tensor:
    """sum over the term's queries of S[i, j]: (B, Nk) in at least float32, made block by block (no (B, Nq, Nk)).
    What a selective KV cache adds to its accumulator after a chunk. Not differentiable (the cache's statistic)."""
    dtype = torch.promote_types(term.q.dtype, torch.float32)
    B, Nq, Nk = term.q.shape[0], term.q.shape[1], term.k.shape[1]
    rows = rows or block_rows(term.q.device)
    offset = Nk - Nq
    total = torch.zeros(B, Nk, dtype=dtype, device=term.q.device)
    with torch.no_grad():
        prepared = _PreparedTerm.of(term, dtype)
        for i0 in range(0, Nq, rows):
            i1 = min(Nq, i0 + rows)
            keys = min(Nk, i1 + offset)
            if keys > 0:
                S = _block_scores(prepared, i0, i1, keys, offset)
                total[:, :keys] += S.sum(dim=1)
    return total
