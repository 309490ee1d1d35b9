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

Per block the work holds (B, H, BM, keys) scores: memory is about vanilla attention's. Deterministic:
every sum runs in a fixed order. A query row that sees no key (more queries than keys) gives output 0 and
zero gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as tF
from torch import Tensor
from torch.autograd.function import once_differentiable

from .structure import Selection, SelectionTerm

# Query rows per block. On 2 CPU cores (B 4, H 8, N 1024, D 64) blocks of 64 balance the per-call overhead
# against the causal triangle each block skips.
DEFAULT_BLOCK = {"cpu": 64}
FALLBACK_BLOCK = 128


def block_rows(device: torch.device) -> int:
    return DEFAULT_BLOCK.get(device.type, FALLBACK_BLOCK)


def _sdpa_kwargs(q: Tensor, k: Tensor, scale: float) -> dict:
    return {"scale": scale, "enable_gqa": True} if k.shape[1] != q.shape[1] else {"scale": scale}


def _block_scores(term: SelectionTerm, i0: int, i1: int, keys: int, offset: int, dtype: torch.dtype
                  ) -> tuple[Tensor, Tensor]:
    """(S, active) of rows [i0, i1) against keys [0, keys): S (B, n, keys) in `dtype`, active bool where
    S = L (kept and positive), so dL = dS there and 0 elsewhere."""
    logits = torch.matmul(term.q[:, i0:i1].to(dtype), term.k[:, :keys].to(dtype).transpose(1, 2)).mul_(term.scale)
    i = torch.arange(i0, i1, device=logits.device)[:, None] + offset  # rows sit at key index i + offset
    j = torch.arange(keys, device=logits.device)[None, :]
    keep = (j < i) & (j > 0) if term.protect_bos else j < i  # strictly earlier keys, never BOS if protected
    active = (logits > 0) & keep
    return torch.where(active, logits, torch.zeros((), dtype=dtype, device=logits.device)), active


def _exclusive_rows(x: Tensor) -> Tensor:
    """out[:, i] = sum of x[:, i'] over i' < i, for (B, n, M)."""
    return tF.pad(x.cumsum(dim=1)[:, :-1], (0, 0, 1, 0))


def _reverse_exclusive_rows(x: Tensor) -> Tensor:
    """out[:, i] = sum of x[:, i'] over i' > i, for (B, n, M)."""
    return tF.pad(x.flip(1).cumsum(dim=1).flip(1)[:, 1:], (0, 0, 0, 1))


def _block_penalty(terms, i0, i1, keys, offset, dtype, start: Tensor, want_active: bool):
    """F of rows [i0, i1) against keys [0, keys) given its first row `start` (B, keys); also the weighted
    sum of S (for the running column sum) and, on request, each term's active mask."""
    total = None
    actives = []
    for term in terms:
        S, active = _block_scores(term, i0, i1, keys, offset, dtype)
        if want_active:
            actives.append(active)
        if term.weight != 1.0:
            S = S.mul_(term.weight)
        total = S if total is None else total.add_(S)
    return start[:, None, :] + _exclusive_rows(total), total, actives


def _visible(i0: int, i1: int, keys: int, offset: int, device) -> Tensor:
    """Bool (n, keys): True where query row i (key index i + offset) may see key j (causal)."""
    i = torch.arange(i0, i1, device=device)[:, None] + offset
    j = torch.arange(keys, device=device)[None, :]
    return j <= i


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
        running = _start_row(terms, B, Nk, fdtype, q.device)
        n_blocks = -(-Nq // rows)
        G = torch.empty(B, n_blocks, Nk, dtype=fdtype, device=q.device)
        out = q.new_zeros(B, H, Nq, v.shape[-1])
        kwargs = _sdpa_kwargs(q, k, scale)
        with torch.no_grad():
            for b in range(n_blocks):
                i0, i1 = b * rows, min(Nq, (b + 1) * rows)
                keys = min(Nk, i1 + offset) if causal else Nk
                G[:, b] = running
                if keys <= 0:
                    continue  # no row of this block sees a key: output 0
                F_blk, S_sum, _ = _block_penalty(terms, i0, i1, keys, offset, fdtype, running[:, :keys], False)
                running[:, :keys] += S_sum.sum(dim=1)
                mask = F_blk.neg_().to(q.dtype)
                if causal:
                    visible = _visible(i0, i1, keys, offset, q.device)
                    mask.masked_fill_(~visible, float("-inf"))
                    blind = ~visible.any(dim=1)  # rows before the first key: softmax over nothing
                    if blind.any():
                        mask[:, blind] = 0
                else:
                    blind = None
                o = tF.scaled_dot_product_attention(q[:, :, i0:i1], k[:, :, :keys], v[:, :, :keys],
                                                    attn_mask=mask[:, None], **kwargs)
                if blind is not None and blind.any():
                    o[:, :, blind] = 0
                out[:, :, i0:i1] = o
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
    """Gradients of `BlockedSelectiveAttention`: dq, dk, dv and per term (dq_s, dk_s, d accumulated)."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = H // Hkv
    offset = Nk - Nq
    ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    fdtype = G.dtype
    dq = torch.zeros(B, H, Nq, D, dtype=ct, device=q.device)
    dk = torch.zeros(B, Hkv, Nk, D, dtype=ct, device=q.device)
    dv = torch.zeros(B, Hkv, Nk, v.shape[-1], dtype=ct, device=q.device)
    dterms = [(torch.zeros(t.q.shape, dtype=fdtype, device=q.device), torch.zeros(t.k.shape, dtype=fdtype, device=q.device))
              for t in terms]
    carry = torch.zeros(B, Nk, dtype=fdtype, device=q.device)  # column sums of dF over the rows of later blocks
    delta = torch.linalg.vecdot(dout.to(ct), out.to(ct))  # (B, H, Nq): rowsum(P * dP)
    kc, vc = k.to(ct), v.to(ct)
    n_blocks = G.shape[1]
    for b in range(n_blocks - 1, -1, -1):
        i0, i1 = b * rows, min(Nq, (b + 1) * rows)
        n = i1 - i0
        keys = min(Nk, i1 + offset) if causal else Nk
        if keys <= 0:
            continue
        F_blk, _, actives = _block_penalty(terms, i0, i1, keys, offset, fdtype, G[:, b, :keys], True)
        scores = torch.matmul(q[:, :, i0:i1].to(ct).reshape(B, Hkv, group * n, D), kc[:, :, :keys].transpose(2, 3))
        scores = scores.mul_(scale).view(B, Hkv, group, n, keys).sub_(F_blk[:, None, None].to(ct))
        blind = None
        if causal:
            visible = _visible(i0, i1, keys, offset, q.device)
            scores.masked_fill_(~visible, float("-inf"))
            blind = ~visible.any(dim=1)
            if blind.any():
                scores[..., blind, :] = 0
        probs = torch.softmax(scores, dim=-1)
        if blind is not None and blind.any():
            probs[..., blind, :] = 0  # a row that sees no key contributes nothing
        probs = probs.view(B, Hkv, group * n, keys)
        dob = dout[:, :, i0:i1].to(ct).reshape(B, Hkv, group * n, -1)
        dv[:, :, :keys] += torch.matmul(probs.transpose(2, 3), dob)
        dS = torch.matmul(dob, vc[:, :, :keys].transpose(2, 3))
        dS.sub_(delta[:, :, i0:i1].reshape(B, Hkv, group * n, 1)).mul_(probs)
        qb = q[:, :, i0:i1].to(ct).reshape(B, Hkv, group * n, D)
        dq[:, :, i0:i1] = torch.matmul(dS, kc[:, :, :keys]).mul_(scale).view(B, H, n, D)
        dk[:, :, :keys] += torch.matmul(dS.transpose(2, 3), qb).mul_(scale)
        dF = dS.view(B, H, n, keys).sum(dim=1).neg_().to(fdtype)  # (B, n, keys): -F enters every head
        dsel = _reverse_exclusive_rows(dF).add_(carry[:, None, :keys])  # dS_sel[i'] = sum over i > i' of dF[i]
        carry[:, :keys] += dF.sum(dim=1)
        for term, active, (dqs, dks) in zip(terms, actives, dterms):
            dL = torch.where(active, dsel, torch.zeros((), dtype=fdtype, device=q.device))
            dL = dL.mul_(term.weight * term.scale)
            dqs[:, i0:i1] += torch.matmul(dL, term.k[:, :keys].to(fdtype))
            dks[:, :keys] += torch.matmul(dL.transpose(1, 2), term.q[:, i0:i1].to(fdtype))
    dacc = [carry * t.weight for t in terms]  # accumulated[j] enters every row's F
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
            [(dqs, dks, da) for (dqs, dks), da in zip(dterms, dacc)])


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
        for i0 in range(0, Nq, rows):
            i1 = min(Nq, i0 + rows)
            keys = min(Nk, i1 + offset)
            if keys > 0:
                S, _ = _block_scores(term, i0, i1, keys, offset, dtype)
                total[:, :keys] += S.sum(dim=1)
    return total
