"""PyTorch's FlexAttention, compiled (CUDA): a second fused path for training with a trainable bias.

    out = flex_attention(q, k, v, score_mod: score + bias[b, h, i, j], block_mask: causal)

FlexAttention turns a score_mod into flash-attention kernels (Triton templates, through torch.compile)
and differentiates it, captured tensors included: the bias gradient comes out of its backward kernel.
A head-shared bias (selective's -F) is read as bias[b, 0, i, j] from its (B, 1, Nq, Nk) source, so its
gradient is summed over the heads that read it and nothing of size (B, H, N, N) is made. The causal
mask is a BlockMask (bottom-right aligned): key blocks wholly in a query block's future are skipped,
wholly visible ones run without a mask. GQA through enable_gqa, no copies.

It is measured beside `triton` (`attention-zoo bench --backends triton,flex`), and `auto` does not try
it until a benchmark on a GPU says it is the faster. Named (`backend: flex`), it runs every call on
CUDA after a self-check against math (`self_check.py`) per (GPU, dtype, head dim); the first call per
shape compiles (tens of seconds). torch has no FlexAttention backward on CPU, so on CPU it refuses
calls that need gradients and runs the others eagerly, unfused (what the CPU tests check).
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from .base import AttentionCall, Backend
from .fused import trainable_bias
from .self_check import attention_agreement, first_disagreement, on_this_gpu

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM = 16  # the smallest tile dimension of its kernels
CHECK_LENGTH = 200  # self-check tokens: more than one 128-token block, with a partial one


try:  # part of torch since 2.5, imported with it (no cost here)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch
    create_block_mask = flex_attention = None


def flex_api():
    """(flex_attention, create_block_mask), or None where this torch has no FlexAttention (before 2.5)."""
    return None if flex_attention is None else (flex_attention, create_block_mask)


class FlexBackend(Backend):
    name = "flex"
    description = "PyTorch FlexAttention, compiled (CUDA; a bias as score_mod, with its gradient)"

    def refuse(self, call: AttentionCall) -> str | None:
        if flex_api() is None:
            return f"torch {torch.__version__} has no FlexAttention (torch 2.5 or later)"
        if call.device not in ("cuda", "cpu"):
            return f"FlexAttention runs on CUDA (tensors are on {call.device})"
        if unequal := call.unequal_value_dim():
            return unequal
        if call.device == "cpu" and call.grad_enabled:
            return "torch has no FlexAttention backward on CPU (train there with sdpa or math)"
        if call.dtype not in SUPPORTED_DTYPES:
            return f"dtype {call.dtype} not supported (supported: float16, bfloat16, float32)"
        if call.head_dim < MIN_HEAD_DIM:
            return f"head dim {call.head_dim} is below {MIN_HEAD_DIM}"
        return on_this_gpu(self_check, call)

    def defer(self, call: AttentionCall) -> str | None:
        return "not in auto's order until a GPU benchmark shows it faster: name it to use it"

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None, causal: bool, scale: float) -> Tensor:
        return flex_attention_call(q, k, v, bias=bias, causal=causal, scale=scale)


def flex_attention_call(q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None, causal: bool, scale: float) -> Tensor:
    """The primitive on FlexAttention: compiled on CUDA, eager (unfused) elsewhere."""
    block_mask = causal_block_mask(q.shape[2], k.shape[2], str(q.device)) if causal else None
    gqa = q.shape[1] != k.shape[1]
    if bias is not None:
        bias = read_once(bias, q, k)
    flags = (bias is not None and bias.shape[0] > 1, bias is not None and bias.shape[1] > 1)
    if q.device.type == "cuda":
        return _compiled()(q, k, v, bias, block_mask, scale, gqa, *flags)
    with warnings.catch_warnings():  # unfused here on purpose: torch's advice to compile does not apply
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _flex(q, k, v, bias, block_mask, scale, gqa, *flags)


def read_once(bias: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """The tensor the score_mod indexes: the bias with every broadcast (size-1 or stride-0) batch or head
    dim of size 1, so each stored value is read, and given its gradient, once per head that reads it.
    A stride-0 head expansion becomes a slice of head 0, whose gradient autograd spreads back over the
    expanded view; pass a head-shared bias compact, (B, 1, Nq, Nk), to avoid that."""
    bias, _ = trainable_bias(bias, q, k)
    if bias.shape[1] > 1 and bias.stride(1) == 0:
        bias = bias[:, :1]
    if bias.shape[0] > 1 and bias.stride(0) == 0:
        bias = bias[:1]
    return bias


def _flex(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, block_mask, scale: float, gqa: bool,
          per_batch: bool, per_head: bool) -> Tensor:
    score_mod = None
    if bias is not None:
        def score_mod(score, b, h, i, j):
            return score + bias[b if per_batch else 0, h if per_head else 0, i, j]
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa)


@functools.lru_cache(maxsize=None)
def _compiled():
    """`_flex` compiled whole, so the bias is a graph input (not a closure guarded per call) and the flags
    are constants: one compile per shape, dtype and bias kind."""
    return torch.compile(_flex, dynamic=False)


@functools.lru_cache(maxsize=64)
def causal_block_mask(q_len: int, k_len: int, device: str):
    """Bottom-right aligned causal BlockMask: query i sees keys j <= i + k_len - q_len."""
    offset = k_len - q_len

    def causal(b, h, i, j):
        return j <= i + offset

    return create_block_mask(causal, B=None, H=None, Q_LEN=q_len, KV_LEN=k_len, device=device)


@functools.lru_cache(maxsize=None)
def self_check(device: str, dtype: torch.dtype, head_dim: int) -> str | None:
    """The compiled kernels once on a small problem against float64 math: None if they agree, else why not."""
    try:
        results = attention_agreement(lambda q, k, v, bias, scale: flex_attention_call(q, k, v, bias=bias, causal=True,
                                                                                      scale=scale),
                                      device, dtype, head_dim, CHECK_LENGTH, label="flex attention")
    except Exception as exc:  # a compile error, a launch failure, ...
        return f"FlexAttention failed its self-check on this {device} ({type(exc).__name__}: {exc})"
    return first_disagreement(results, device, dtype, head_dim, kernels="FlexAttention kernels")


__all__ = ["FlexBackend", "flex_attention_call", "causal_block_mask", "read_once", "self_check", "flex_api"]
