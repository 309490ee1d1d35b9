"""Fused Triton kernels for attention with a trainable bias (CUDA), imported lazily.

The one call the other fused kernels cannot serve whole is training with a bias that requires grad:
selective attention's head-shared -F (and RealFormer's per-head residual scores). xformers and SDPA
run its forward, but its backward then falls to `fused.BiasGradAttention`, PyTorch ops on blocks of
query rows. This backend runs forward and backward as flash kernels (`triton_kernels.py`), the bias
gradient summed over heads in registers, nothing of size (B, H, N, N) ever made.

Selective attention reaches it as a structured Selection, not a bias: its kernels form -F tile by tile
from the selection heads' q and k (`ops/selection/triton_fused.py`), so no (B, Nq, Nk) F is made, forward
or backward.

A SeparableBias (row_i + col_j, ops/separable.py) reaches it whole: the kernels read the column term as a
float32 per-key bias and return its gradient from the dk/dv pass, exact in bf16 where the other backends
would have to make it dense.

Named explicitly (`backend: triton`) it runs every call, with or without a bias or gradients. Under
`auto` it comes first but defers every call other than training with a trainable bias and a separable bias
in half precision (inference, vanilla, GQA training) to xformers and SDPA, whose kernels are faster for those.

Before its first use for a (device, dtype, head dim) it runs the kernels once on a small problem and
compares them with the math backend; if they fail to compile or disagree, it refuses with that
reason from then on, so a Triton or driver problem costs speed, never correctness.

On CPU, Triton's interpreter (TRITON_INTERPRET=1 in the environment before triton is first imported)
runs the same kernels on CPU tensors: that is how the test suite checks them without a GPU. It is slow
and meant for tests: `auto` never picks it on CPU; name the backend to use it.
"""
from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .base import AttentionCall, Backend
from .fused import spread_over_heads, trainable_bias
from .self_check import BATCH, attention_agreement, first_disagreement, on_this_gpu, random_inputs, value_and_grads

log = logging.getLogger("attention_zoo.backends")
_logged_refusals: set[str] = set()

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128  # the autotuned tile configurations (triton_tuning.py) are chosen up to here


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def load_kernels() -> tuple[ModuleType | None, str | None]:
    """(triton_kernels module, None) or (None, why triton cannot be used). Imported once, on first use."""
    try:
        from . import triton_kernels
    except Exception as exc:  # ImportError, or a broken install raising anything at import
        return None, f"{type(exc).__name__}: {exc}".strip()
    return triton_kernels, None


class TritonBackend(Backend):
    name = "triton"
    description = "fused Triton flash kernels for training with a trainable bias (CUDA; selective's -F, residual scores)"

    def refuse(self, call: AttentionCall) -> str | None:
        if call.device not in ("cuda", "cpu"):
            return f"Triton kernels run on CUDA (tensors are on {call.device})"
        if call.device == "cpu" and not interpreter_requested():
            return ("Triton kernels run on CUDA (tensors are on cpu; TRITON_INTERPRET=1 runs them in Triton's interpreter, "
                    "for tests)")
        if unequal := call.unequal_value_dim():
            return unequal
        kernels, error = load_kernels()
        if kernels is None:
            return f"triton is not installed or does not import ({error}); pip install triton"
        if call.device == "cpu" and not kernels.INTERPRETED:
            return "triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on CPU"
        if call.device == "cpu" and kernels.VERSION < kernels.INTERPRETER_MIN_VERSION:
            need = ".".join(map(str, kernels.INTERPRETER_MIN_VERSION))
            have = ".".join(map(str, kernels.VERSION))
            return f"Triton's interpreter runs these kernels from triton {need} on (this is {have})"
        if call.device == "cuda" and kernels.INTERPRETED:
            return "the kernels were built for Triton's interpreter (TRITON_INTERPRET=1), which runs on CPU only"
        if call.dtype not in SUPPORTED_DTYPES:
            return f"dtype {call.dtype} not supported (supported: float16, bfloat16, float32)"
        if call.dtype == torch.bfloat16 and kernels.INTERPRETED:
            return "Triton's interpreter computes bfloat16 tl.dot wrongly (triton 3.9); bfloat16 runs on CUDA only"
        if call.head_dim > MAX_HEAD_DIM:
            return f"head dim {call.head_dim} is above {MAX_HEAD_DIM}"
        return on_this_gpu(self_check, call)

    def head_dim_limit(self, device: str) -> int | None:
        return MAX_HEAD_DIM

    def defer(self, call: AttentionCall) -> str | None:
        if call.device != "cuda":
            return "on CPU it runs in Triton's interpreter, for tests only: name it to use it"
        if call.has_bias and call.bias_requires_grad and call.grad_enabled:
            return None
        if call.separable_width and call.dtype in (torch.float16, torch.bfloat16):
            return None  # the others would attend with it dense: a folded column is not exact in half precision
        return "auto uses it only to train with a trainable bias (selective's -F, residual scores) or to read a " \
               "separable bias in half precision; xformers and sdpa kernels are faster for every other call"

    def selective_attention(self, q: Tensor, k: Tensor, v: Tensor, selection, *, causal: bool, scale: float) -> Tensor:
        """Selective attention with -F formed tile by tile inside the kernels (ops/selection/triton_fused.py),
        nothing of size (B, Nq, Nk) made. A selection those kernels refuse (`fused_refusal`) falls back, with
        the reason logged once, to the dense -F (B, 1, Nq, Nk) read as a head-shared bias."""
        from ..ops.selection.dense import penalty
        from ..ops.selection.triton_fused import fused_refusal, fused_selective_attention

        reason = fused_refusal(selection)
        if reason is None:
            return fused_selective_attention(q, k, v, selection, causal=causal, scale=scale)
        if reason not in _logged_refusals:
            _logged_refusals.add(reason)
            log.info("triton backend: selective attention with a dense -F (%s)", reason)
        bias = penalty(selection, negate=True, backend=self.name).unsqueeze(1)
        return self.attention(q, k, v, bias=bias, causal=causal, scale=scale)

    def separable_attention(self, q: Tensor, k: Tensor, v: Tensor, bias, *, causal: bool, scale: float) -> Tensor:
        """A SeparableBias read by the kernels: its column term as a float32 (B, 1|H, 1, Nk) bias (a stride-0 row
        dim), added to the float32 scores in any input dtype, so bf16 keeps a large col_j exact to float32; its
        gradient, the column sums of dS, comes from the dk/dv kernel. The row term is dropped (softmax ignores
        it). Nothing (Nq, Nk)-sized is made, forward or backward."""
        return TritonKeyBiasAttention.apply(q, k, v, bias.col, causal, scale)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None, causal: bool, scale: float) -> Tensor:
        spread_heads = 0
        if bias is not None:
            bias, spread_heads = trainable_bias(bias, q, k)
        return TritonAttention.apply(q, k, v, bias, causal, scale, spread_heads)


def _forward(ctx, q: Tensor, k: Tensor, v: Tensor, read: Tensor | None, causal: bool, scale: float) -> Tensor:
    """The forward kernel on the bias as the kernels read it, saving what both backward passes need."""
    kernels, error = load_kernels()
    if kernels is None:
        raise RuntimeError(f"triton is not available: {error}")
    out, lse = kernels.attention_forward(q.detach(), k.detach(), v.detach(), read, causal=causal, scale=scale)
    ctx.save_for_backward(q, k, v, read, out, lse)
    ctx.causal, ctx.scale = causal, scale
    return out


class TritonAttention(torch.autograd.Function):
    """softmax(scale q k^T + bias + causal) v with flash kernels both ways; d(bias) summed over the heads
    that share it. `bias`: None, or (Bb, Hb, Nq, Nk) as `fused.trainable_bias` returns it; with
    `spread_heads` a stride-0 head expansion, read once and given back the spread gradient."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool, scale: float,
                spread_heads: int = 0) -> Tensor:
        read = None
        if bias is not None:
            # The kernels read a size-1 or stride-0 dim as a broadcast: a batch-shared bias is expanded to
            # B (no copy) so each batch element's gradient has a row of its own, summed back below.
            read = bias[:, :1] if spread_heads else bias
            read = read.detach().expand(q.shape[0], *read.shape[1:])
            ctx.bias_shape, ctx.bias_dtype = bias.shape, bias.dtype
        ctx.spread_heads = spread_heads
        return _forward(ctx, q, k, v, read, causal, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        q, k, v, read, out, lse = ctx.saved_tensors
        kernels, _ = load_kernels()
        bias_grad = ctx.needs_input_grad[3]
        dq, dk, dv, dbias = kernels.attention_backward(q, k, v, read, out, lse, dout, causal=ctx.causal, scale=ctx.scale,
                                                       bias_grad=bias_grad)
        if dbias is not None:
            if ctx.bias_shape[0] == 1 and dbias.shape[0] > 1:
                dbias = dbias.sum(0, keepdim=True)
            dbias = dbias.to(ctx.bias_dtype)
            if ctx.spread_heads:
                dbias = spread_over_heads(dbias, ctx.spread_heads, ctx.bias_shape)
        return dq, dk, dv, dbias, None, None, None


class TritonKeyBiasAttention(torch.autograd.Function):
    """softmax(scale q k^T + col_j + causal) v with flash kernels both ways. col: (B|1, H|1, Nk), any float
    dtype, read as float32; its gradient (B|1, H|1, Nk) in col's dtype, summed over what it broadcasts."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, col: Tensor, causal: bool, scale: float) -> Tensor:
        ctx.col_shape, ctx.col_dtype = col.shape, col.dtype
        read = col.detach().float()[:, :, None, :].expand(q.shape[0], -1, -1, -1)  # (B, 1|H, 1, Nk): rows broadcast
        return _forward(ctx, q, k, v, read, causal, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        q, k, v, read, out, lse = ctx.saved_tensors
        kernels, _ = load_kernels()
        dq, dk, dv, dkey = kernels.attention_backward(q, k, v, read, out, lse, dout, causal=ctx.causal, scale=ctx.scale,
                                                      bias_grad=False, key_bias_grad=ctx.needs_input_grad[3])
        # (B, H, Nk) per query head: summed over the dims col broadcasts
        dcol = None if dkey is None else dkey.sum_to_size(ctx.col_shape).to(ctx.col_dtype)
        return dq, dk, dv, dcol, None, None


@functools.lru_cache(maxsize=None)
def self_check(device: str, dtype: torch.dtype, head_dim: int) -> str | None:
    """Run every Triton kernel once on a small problem against a float64 PyTorch reference
    (`self_check.py`): None if they agree, else why not. The checks run in order and the first disagreement
    ends it. Cached: once per (device, dtype, head dim) and process."""
    try:
        results = (result for check in SELF_CHECKS for result in check(device, dtype, head_dim))
        return first_disagreement(results, device, dtype, head_dim)
    except Exception as exc:  # a compile error, a launch failure, ...
        return f"the kernels failed their self-check on this {device} ({type(exc).__name__}: {exc})"


def _check_length() -> int:
    """Past one key span of the head-shared backward kernel (so spans meet), with partial tiles: 560 keys on a
    GPU; 40 in the interpreter (32-key spans, 16-key tiles), where only the tests run it."""
    from .triton_tuning import INTERPRETED, KEY_SPAN

    return KEY_SPAN + (8 if INTERPRETED else 48)


def _attention_check(device: str, dtype: torch.dtype, head_dim: int):
    """Both dq strategies (auto may pick either per problem size), one after the other: the second runs only
    if the first agreed."""
    from .triton_tuning import SHARED_DQ_STRATEGIES, shared_dq_forced

    for strategy in SHARED_DQ_STRATEGIES:
        with shared_dq_forced(strategy):  # left before yielding: the forced strategy never outlives its run
            results = attention_agreement(lambda q, k, v, bias, scale: TritonAttention.apply(q, k, v, bias, True, scale, 0),
                                          device, dtype, head_dim, _check_length(), label=f"attention ({strategy} dq)")
        yield from results


def _penalty_check(device: str, dtype: torch.dtype, head_dim: int):
    from ..functional import penalty_from_scores, selection_scores
    from ..ops.selection.penalty import TritonSelectionPenalty

    N = _check_length()
    q, k = (t.requires_grad_() for t in random_inputs(device, dtype, (BATCH, N, head_dim), (BATCH, N, head_dim)))
    dpen, = random_inputs(device, torch.float32, (BATCH, N, N))
    got = value_and_grads(lambda: TritonSelectionPenalty.apply(q, k, head_dim ** -0.5, True), dpen, (q, k))
    ref = [t.detach().double().requires_grad_() for t in (q, k)]
    logits = lambda: torch.einsum("bnd,bmd->bnm", ref[0], ref[1]) * head_dim ** -0.5  # noqa: E731
    want = value_and_grads(lambda: penalty_from_scores(selection_scores(logits(), protect_bos=True)), dpen.double(), ref)
    return zip(("selection F", "selection dq", "selection dk"), got, want)


def _selective_check(device: str, dtype: torch.dtype, head_dim: int):
    """The fused selective kernels: GQA, queries after 8 cached keys, two terms (a cache's accumulator on one,
    BOS unprotected on the other), past two stored boundary rows with partial tiles."""
    from ..ops.selection import Selection, SelectionTerm, reference
    from ..ops.selection.triton_fused import fused_selective_attention
    from .self_check import HEADS, KV_HEADS
    from .triton_tuning import SELECTIVE_ROWS

    Nk = 2 * SELECTIVE_ROWS + 8
    Nq, scale = Nk - 8, head_dim ** -0.5
    shapes = [(BATCH, HEADS, Nq, head_dim), (BATCH, KV_HEADS, Nk, head_dim), (BATCH, KV_HEADS, Nk, head_dim),
              (BATCH, Nq, head_dim), (BATCH, Nk, head_dim), (BATCH, Nq, head_dim), (BATCH, Nk, head_dim)]
    *inputs, dout = random_inputs(device, dtype, *shapes, (BATCH, HEADS, Nq, head_dim))
    acc, = random_inputs(device, torch.float32, (BATCH, Nk))
    leaves = [t.requires_grad_() for t in (*inputs, acc.abs())]

    def selection(t):  # t: q, k, v, then the terms' q_s, k_s and the accumulator
        return Selection((SelectionTerm(t[3], t[4], scale, True, 0.5, t[7]), SelectionTerm(t[5], t[6], scale, False)))

    got = value_and_grads(lambda: fused_selective_attention(*leaves[:3], selection(leaves), causal=True, scale=scale),
                          dout, leaves)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    want = value_and_grads(lambda: reference.selective_attention(*ref[:3], selection(ref), causal=True, scale=scale),
                           dout.double(), ref)
    names = ("out", "dq", "dk", "dv", "dq_s", "dk_s", "dq_s 2", "dk_s 2", "daccumulated")
    return zip((f"selective {what}" for what in names), got, want)


def _key_bias_check(device: str, dtype: torch.dtype, head_dim: int):
    """A SeparableBias's column term, per head, read by the kernels (GQA, partial tiles): out and the gradients
    of q, k, v and the column against math with the dense bias in float64."""
    from ..backends.math import math_attention
    from .self_check import HEADS, KV_HEADS

    N, scale = _check_length(), head_dim ** -0.5
    q, k, v, dout = random_inputs(device, dtype, (BATCH, HEADS, N, head_dim), (BATCH, KV_HEADS, N, head_dim),
                                  (BATCH, KV_HEADS, N, head_dim), (BATCH, HEADS, N, head_dim))
    col, = random_inputs(device, torch.float32, (BATCH, HEADS, N))
    ins = [t.requires_grad_() for t in (q, k, v, col)]
    got = value_and_grads(lambda: TritonKeyBiasAttention.apply(*ins, True, scale), dout, ins)
    ref = [t.detach().double().requires_grad_() for t in ins]
    want = value_and_grads(lambda: math_attention(*ref[:3], bias=ref[3][:, :, None, :], causal=True, scale=scale),
                           dout.double(), ref)
    return zip((f"separable bias {what}" for what in ("out", "dq", "dk", "dv", "dcol")), got, want)


# What `self_check` runs, in order (tests narrow it to the check a wrong kernel should fail).
SELF_CHECKS = (_attention_check, _penalty_check, _selective_check, _key_bias_check)


__all__ = ["TritonBackend", "TritonAttention", "TritonKeyBiasAttention", "load_kernels", "self_check"]
