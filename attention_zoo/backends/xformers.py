"""xformers.ops.memory_efficient_attention (CUDA only), imported lazily.

Facts this module is built on (xformers 0.0.35, measured; see docs/backends.md):
- Layout is (B, M, H, K): ours (B, H, N, D) is transposed as a view.
- Only the cutlass ops take a tensor bias: shape (B, H, Mq, Mk), a stride-0 head (or batch) broadcast
  allowed, every stride but the last a multiple of 8 (fp16/bf16) or 4 (fp32), dtype equal to q's. The
  bias is built in a (..., Mq, ceil8(Mk)) buffer and sliced, with the causal -inf written into it
  (LowerTriangularMaskWithTensorBias has no backward op).
- GQA without copies uses the 5-D BMGHK layout, which has no backward op: it serves inference and the
  forward of `BiasGradAttention`. Training through xformers' own backward expands k/v to H heads: a
  stride-0 view for one kv head, a copy otherwise (per-head strides cannot express h -> h // G).
- xformers' backward returns no gradient for a broadcast bias, so selective's head-broadcast -F takes
  `BiasGradAttention` (xformers forward, blockwise recomputed backward). A full per-head bias (residual
  scores) uses xformers' own bias gradient.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .base import AttentionCall, Backend
from .fused import bias_grad_attention, is_head_broadcast, visible_keys

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BIAS_ROW_ALIGNMENT = 8  # elements: satisfies fp16/bf16 (8) and fp32 (4)


@functools.lru_cache(maxsize=None)
def load_xformers() -> tuple[Any | None, str | None]:
    """(xformers.ops.fmha, None) or (None, why it cannot be imported). Imported once, on first use."""
    try:
        import warnings

        with warnings.catch_warnings():  # a CPU-only install warns that its kernels are unavailable
            warnings.simplefilter("ignore")
            from xformers.ops import fmha
    except Exception as exc:  # ImportError, or a broken build raising anything at import
        return None, f"{type(exc).__name__}: {exc}".strip()
    return fmha, None


def missing_cuda_kernels() -> str | None:
    """Why an importable xformers still cannot run on CUDA, or None.

    A wheel built for another torch or CUDA imports fine but loads no kernels (not even the ones it takes
    from PyTorch): every call would raise NotImplementedError, so the backend refuses and `auto` moves on.
    """
    from xformers import _cpp_lib

    if getattr(_cpp_lib, "_built_with_cuda", True) or torch.version.hip is not None:
        return None
    error = getattr(_cpp_lib, "_cpp_library_load_exception", None)
    detail = " ".join(str(error).split()).split(" Please")[0] if error is not None else "no CUDA build found"
    return f"this xformers install has no CUDA kernels ({detail}); install the xformers build matching torch {torch.__version__}"


def head_dim_alignment(dtype: torch.dtype) -> int:
    """xformers' cutlass kernels want the head dim a multiple of 128 bits on tensor-core GPUs."""
    return 8 if dtype in (torch.float16, torch.bfloat16) else 4


class XFormersBackend(Backend):
    name = "xformers"
    description = "xformers memory_efficient_attention (CUDA; cutlass kernels for tensor biases)"

    def refuse(self, call: AttentionCall) -> str | None:
        if call.device != "cuda":  # checked first: no import on CPU, so `auto` stays cheap there
            return f"xformers kernels run on CUDA only (tensors are on {call.device})"
        if unequal := call.unequal_value_dim():
            return unequal
        fmha, error = load_xformers()
        if fmha is None:
            return f"xformers is not installed or does not import ({error}); pip install xformers"
        missing = missing_cuda_kernels()
        if missing:
            return missing
        if call.dtype not in SUPPORTED_DTYPES:
            return f"dtype {call.dtype} not supported (supported: float16, bfloat16, float32)"
        alignment = head_dim_alignment(call.dtype)
        if call.head_dim % alignment:
            return f"head dim {call.head_dim} is not a multiple of {alignment} for {call.dtype}"
        if torch.cuda.is_available():
            capability = torch.cuda.get_device_capability()
            if call.dtype == torch.bfloat16 and capability < (8, 0):
                return f"bfloat16 needs compute capability >= 8.0 (this GPU has {capability})"
            top = fmha.cutlass.FwOp.CUDA_MAXIMUM_COMPUTE_CAPABILITY
            if call.has_bias and top is not None and capability > top:
                return (f"a tensor bias needs xformers' cutlass kernels, built for compute capability <= {top} "
                        f"(this GPU has {capability})")
        return None

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None, causal: bool, scale: float) -> Tensor:
        grad = torch.is_grad_enabled()
        if bias is not None and bias.requires_grad and grad and not _per_head(bias, q, k):
            return bias_grad_attention(q, k, v, bias, causal=causal, scale=scale, kernel=xformers_forward)
        training = grad and any(t.requires_grad for t in (q, k, v, bias) if t is not None)
        return run(build_inputs(q, k, v, bias, causal=causal, scale=scale, training=training))


def _per_head(bias: Tensor, q: Tensor, k: Tensor) -> bool:
    """A full (B, H, Nq, Nk) bias, no dim broadcast: xformers' backward can return its gradient itself."""
    want = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return tuple(bias.shape) == want and all(s != 0 for s in bias.stride()[:3])


def xformers_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool, scale: float) -> Tensor:
    """The forward kernel `BiasGradAttention` runs (no autograd: grouped k/v stay 5-D, uncopied)."""
    return run(build_inputs(q, k, v, bias, causal=causal, scale=scale, training=False))


def build_inputs(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, *, causal: bool, scale: float,
                 training: bool):
    """The `fmha.Inputs` this backend hands xformers for softmax(scale q k^T + bias + causal) v.

    q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D); bias broadcastable to (B, H, Nq, Nk) or None. `training`:
    xformers' own backward will run, so no 5-D layout. Works on CPU tensors too (for tests).
    """
    fmha, error = load_xformers()
    if fmha is None:
        raise RuntimeError(f"xformers is not available: {error}")
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = H // Hkv
    qx, kx, vx = (rearrange(t, "b h n d -> b n h d") for t in (q, k, v))  # xformers' BMHK layout, as views
    grouped = G > 1 and not training
    if grouped:  # BMGHK: xformers' G = our kv heads, its H = query heads per kv head
        qx = qx.unflatten(2, (Hkv, G))
        kx = kx.unsqueeze(3).expand(B, Nk, Hkv, G, D)
        vx = vx.unsqueeze(3).expand(B, Nk, Hkv, G, D)
    elif G > 1 and Hkv == 1:  # one kv head: a stride-0 view serves every query head
        kx, vx = kx.expand(B, Nk, H, D), vx.expand(B, Nk, H, D)
    elif G > 1:  # h -> h // G is no stride: copy per head (xformers' 5-D layout has no backward)
        kx, vx = kx.repeat_interleave(G, dim=2), vx.repeat_interleave(G, dim=2)
    if bias is None:
        attn_bias = fmha.attn_bias.LowerTriangularFromBottomRightMask() if causal else None
    else:
        attn_bias = tensor_bias(bias, q, k, causal=causal, grouped=grouped)
    return fmha.Inputs(query=qx, key=kx, value=vx, attn_bias=attn_bias, scale=scale)


def tensor_bias(bias: Tensor, q: Tensor, k: Tensor, *, causal: bool, grouped: bool) -> Tensor:
    """The bias as xformers' cutlass kernels take it: q's dtype, rows padded to a multiple of 8 elements,
    causal -inf written in, broadcast dims kept stride 0. (B, H, Nq, Nk), or (B, Hkv, G, Nq, Nk) grouped."""
    B, H, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if is_head_broadcast(bias) and bias.shape[1] > 1:
        bias = bias[:, :1]  # read once, expanded again below
    bias = bias.expand(bias.shape[0], bias.shape[1], Nq, Nk)
    pad = -Nk % BIAS_ROW_ALIGNMENT
    aligned = F.pad(bias.to(q.dtype), (0, pad))[..., :Nk]  # a fresh (Bb, Hb, Nq, ceil8(Nk)) buffer, sliced
    if causal:
        aligned.masked_fill_(~visible_keys(0, Nq, Nq, Nk, Nk, q.device), float("-inf"))
    aligned = aligned.expand(B, *aligned.shape[1:])
    if aligned.shape[1] == 1:
        return aligned.unsqueeze(1).expand(B, Hkv, H // Hkv, Nq, Nk) if grouped else aligned.expand(B, H, Nq, Nk)
    return aligned.unflatten(1, (Hkv, H // Hkv)) if grouped else aligned


def memory_efficient_attention(query: Tensor, key: Tensor, value: Tensor, attn_bias: Any, scale: float) -> Tensor:
    """The one call into xformers' kernels (tests on CPU swap it for xformers' reference)."""
    fmha, _ = load_xformers()
    return fmha.memory_efficient_attention(query, key, value, attn_bias=attn_bias, scale=scale)


def run(inputs) -> Tensor:
    """Call xformers on built inputs; back to (B, H, Nq, D) from (B, Nq, H, D) or, grouped, (B, Nq, Hkv, G, D)."""
    out = memory_efficient_attention(inputs.query, inputs.key, inputs.value, inputs.attn_bias, inputs.scale)
    return rearrange(out, "b n ... d -> b (...) n d")  # every head axis, kv head major, becomes H


__all__ = ["XFormersBackend", "build_inputs", "tensor_bias", "xformers_forward", "load_xformers"]
