"""torch.nn.functional.scaled_dot_product_attention on any device.

- GQA is passed grouped (`enable_gqa=True`, torch >= 2.5) rather than copying k/v to H heads.
- A bias is passed as a float attn_mask with the causal mask folded in (SDPA must not get both
  attn_mask and is_causal). A head-broadcast bias stays (B, 1, Nq, Nk): the kernels read it in place.
- With a bias, causal attention runs one query block at a time against only the keys that block can
  see, so the fused kernel skips most of the masked upper triangle as it does with is_causal.
- A structured selection (selective attention's -F) runs over query blocks, F never dense
  (`selective_attention`): on CPU in the fused C++ kernel (ops/selection/cpu_fused.py) where it builds, else
  (and on other devices) in PyTorch (ops/selection/blocked.py).
- A plain call whose v is narrower or wider than q/k (residual attention's concatenated q and k, differential
  attention) runs in that kernel on CPU too: SDPA's CPU flash kernel wants them equal, and its fallback is the
  math path with (B, H, Nq, Nk) scores.
- A bias that requires grad (selective's -F, residual scores) goes through `BiasGradAttention`: SDPA
  forward on the detached bias, blockwise recomputed backward. Left to itself SDPA would silently
  fall back to its math path (several (B, H, N, N) buffers) whenever the mask requires grad.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import AttentionCall, Backend
from .fused import BlockKernel, bias_grad_attention, is_head_broadcast, plan_blocks, visible_keys

# `enable_gqa` arrived in torch 2.5; the builtin has no inspectable signature, so read its docstring.
_HAS_ENABLE_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")

# Query rows per SDPA call when a mask is needed: on CPU, blocks of 128 beat one call and is_causal
# (docs/benchmarks.md, "Measurements behind the code's constants").
FORWARD_BLOCK = {"cpu": 128}
DEFAULT_FORWARD_BLOCK = 512


def half_backward_probe() -> str | None:
    """Why this torch cannot differentiate fp16 SDPA on CPU (older builds had no CPU half kernels), or None:
    a tiny problem, causal and with a float mask, as the backend calls it (its own backward of a trainable bias
    and the fused CPU kernel compute in float32). Under inference mode too (`describe`, generation)."""
    try:
        with torch.inference_mode(False), torch.enable_grad():  # asked from anywhere: `describe`, inference
            q = torch.ones(1, 1, 2, 8, dtype=torch.float16, requires_grad=True)
            mask = torch.zeros(2, 2, dtype=torch.float16)
            (F.scaled_dot_product_attention(q, q, q, is_causal=True).sum()
             + F.scaled_dot_product_attention(q, q, q, attn_mask=mask).sum()).backward()
    except Exception as exc:  # noqa: BLE001 -- any failure is the reason
        return f"{type(exc).__name__}: {str(exc).strip()[:200]}"
    return None


# The probe once per process, run eagerly: never traced into a compiled model's graph.
cpu_half_backward_error = torch.compiler.disable(functools.lru_cache(maxsize=None)(half_backward_probe))


class SDPABackend(Backend):
    name = "sdpa"
    description = "torch scaled_dot_product_attention (flash / memory-efficient kernels where torch has them)"

    def refuse(self, call: AttentionCall) -> str | None:
        if call.device == "cpu" and call.dtype == torch.float16 and call.grad_enabled and (why := cpu_half_backward_error()):
            return f"fp16 backward on CPU is not supported by this torch's SDPA ({why})"
        if call.bias_requires_grad and call.grad_enabled and call.value_dim is not None:
            if not (call.has_selection and self.fuses_unequal_value_dim(call.device)):  # the fused kernel takes any
                return f"the blockwise backward of a trainable bias needs v as wide as q and k ({call.unequal_value_dim()})"
        return None

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None, causal: bool, scale: float) -> Tensor:
        if bias is None and v.shape[-1] != q.shape[-1] and self.fuses_unequal_value_dim(q.device.type):
            from ..ops.selection import cpu_fused  # SDPA's CPU flash kernel wants v as wide as q/k

            return cpu_fused.attention(q, k, v, causal=causal, scale=scale)
        if bias is not None and bias.requires_grad and torch.is_grad_enabled():
            return bias_grad_attention(q, k, v, bias, causal=causal, scale=scale, kernel=SDPA_ON_BLOCKS)
        return sdpa_forward(q, k, v, bias, causal, scale)

    def fuses_unequal_value_dim(self, device: str) -> bool:
        """On CPU where the fused kernel builds (ops/selection/cpu_fused.py)."""
        if device != "cpu":
            return False
        from ..ops.selection import cpu_fused

        return cpu_fused.available()

    def head_dim_limit(self, device: str) -> int | None:
        return None if device == "cpu" else 256  # flash kernels on CUDA take head dims up to 256

    def selective_attention(self, q: Tensor, k: Tensor, v: Tensor, selection, *, causal: bool, scale: float) -> Tensor:
        """F kept at query-block boundaries: the fused CPU kernel (ops/selection/cpu_fused.py) on CPU where it
        builds (its `refusal()` says why not, logged once), else SDPA per query block with that block's -F
        (ops/selection/blocked.py)."""
        if q.device.type == "cpu":
            from ..ops.selection import cpu_fused

            if cpu_fused.available():
                return cpu_fused.selective_attention(q, k, v, selection, causal=causal, scale=scale)
        from ..ops.selection.blocked import selective_attention

        return selective_attention(q, k, v, selection, causal=causal, scale=scale)


def _grouped(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, dict]:
    """k, v and the SDPA keyword arguments for GQA: grouped where torch can, copied where it cannot."""
    kwargs = {"scale": scale}
    if k.shape[1] != q.shape[1]:
        if _HAS_ENABLE_GQA:
            kwargs["enable_gqa"] = True
        else:  # old torch: the copy SDPA insists on
            g = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return k, v, kwargs


class SDPAOnBlocks(BlockKernel):
    """SDPA one query block at a time on already masked bias blocks (the fused path's forward)."""

    def rows(self, device: torch.device) -> int:
        return FORWARD_BLOCK.get(device.type, DEFAULT_FORWARD_BLOCK)

    def __call__(self, q, k, v, masks, blocks, scale):
        k, v, kwargs = _grouped(q, k, v, scale)
        outs = [F.scaled_dot_product_attention(q[:, :, b.start:b.stop], k[:, :, :b.keys], v[:, :, :b.keys],
                                               attn_mask=m.to(q.dtype), **kwargs)
                for b, m in zip(blocks, masks)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


SDPA_ON_BLOCKS = SDPAOnBlocks()


def sdpa_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool, scale: float) -> Tensor:
    """softmax(scale q k^T + bias + causal) v with SDPA; differentiable in q, k, v (and a bias that needs
    no grad). q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D); bias broadcastable to (B, H, Nq, Nk)."""
    Nq, Nk = q.shape[2], k.shape[2]
    k, v, kwargs = _grouped(q, k, v, scale)
    if bias is None:
        if not causal or Nq == 1:  # one new query after a cache sees every key
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
        if Nq == Nk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
    else:
        bias = bias[:, :1] if is_head_broadcast(bias) and bias.shape[1] > 1 else bias  # read in place, never copied per head
        if bias.shape[2:] != (Nq, Nk):
            bias = bias.expand(*bias.shape[:2], Nq, Nk)
    rows = min(Nq, FORWARD_BLOCK.get(q.device.type, DEFAULT_FORWARD_BLOCK) if causal else Nq)
    # Without autograd one mask buffer serves every block (blocks of varying size would fragment the CPU
    # heap); with it, SDPA keeps each block's mask for its backward, so each block gets its own.
    recorded = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    buffer = None if bias is None or recorded else torch.empty(*bias.shape[:2], rows, Nk, dtype=q.dtype, device=q.device)
    outs = []
    for blk in plan_blocks(Nq, Nk, causal, rows, q.device):
        i0, i1, kv = blk.start, blk.stop, blk.keys
        if bias is not None:
            if buffer is None:
                mask = bias[:, :, i0:i1, :kv].to(q.dtype, copy=True)
            else:
                mask = buffer[:, :, : i1 - i0, :kv]
                mask.copy_(bias[:, :, i0:i1, :kv])
            if blk.hidden is not None:
                mask[..., blk.first_hidden:].masked_fill_(blk.hidden, float("-inf"))
        else:
            mask = None if blk.hidden is None else visible_keys(i0, i1, Nq, Nk, kv, q.device)
        outs.append(F.scaled_dot_product_attention(q[:, :, i0:i1], k[:, :, :kv], v[:, :, :kv], attn_mask=mask, **kwargs))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


__all__ = ["SDPABackend", "sdpa_forward"]
