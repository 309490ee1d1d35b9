"""torch.nn.functional.scaled_dot_product_attention on any device.

GQA is passed grouped (`enable_gqa=True`, torch >= 2.5) rather than copying k/v to H heads. A bias is
passed as a float attn_mask with the causal mask folded in, because SDPA must not get both attn_mask
and is_causal. On CPU a head-broadcast (B, 1, N, N) mask is read in place by the flash kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import AttentionCall, Backend, causal_mask

# `enable_gqa` arrived in torch 2.5; the builtin has no inspectable signature, so read its docstring.
_HAS_ENABLE_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class SDPABackend(Backend):
    name = "sdpa"
    description = "torch scaled_dot_product_attention (flash / memory-efficient kernels where torch has them)"

    def refuse(self, call: AttentionCall) -> str | None:
        if call.device == "cpu" and call.dtype == torch.float16 and call.grad_enabled:
            return "fp16 backward on CPU is not supported by SDPA's CPU kernels"
        return None

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None, causal: bool, scale: float) -> Tensor:
        Nq, Nk = q.shape[2], k.shape[2]
        kwargs = {}
        if k.shape[1] != q.shape[1]:
            if _HAS_ENABLE_GQA:
                kwargs["enable_gqa"] = True
            else:  # old torch: a stride-0 expansion, then the copy SDPA insists on
                g = q.shape[1] // k.shape[1]
                k = k.repeat_interleave(g, dim=1)
                v = v.repeat_interleave(g, dim=1)
        mask = None
        is_causal = False
        if bias is not None:
            mask = bias.to(q.dtype)
            if causal:
                mask = mask.masked_fill(~causal_mask(Nq, Nk, q.device), float("-inf"))
        elif causal and Nq == Nk:
            is_causal = True
        elif causal and Nq > 1:  # a chunk after a cache: bottom-right aligned, which is_causal is not
            mask = causal_mask(Nq, Nk, q.device)
        # Nq == 1 with a cache: the single query sees every key, no mask needed.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, **kwargs)
