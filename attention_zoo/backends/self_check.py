"""The first-use check of a backend whose kernels are compiled on the machine that runs them (triton, flex).

Before such a backend serves a (device, dtype, head dim) it runs one small problem, causal, GQA, with a
head-shared bias that needs a gradient and lengths that leave partial tiles, and compares the output
and every gradient with the math backend in float64. A compile error or a disagreement becomes the
backend's refusal reason, so a compiler or driver problem costs speed, never correctness.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

# Tolerance against float64 math, relative to the largest |value| (fp32 runs IEEE fp32 dots in triton).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
BATCH, HEADS, KV_HEADS = 2, 4, 2  # GQA

Result = tuple[str, Tensor, Tensor]  # (what, got, want)


def random_inputs(device: str, dtype: torch.dtype, *shapes: tuple[int, ...]) -> list[Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(shape, device=device, generator=gen).to(dtype) for shape in shapes]


def value_and_grads(fn: Callable[[], Tensor], dout: Tensor, inputs: Iterable[Tensor]) -> list[Tensor]:
    out = fn()
    return [out.detach(), *torch.autograd.grad(out, list(inputs), dout.to(out.dtype))]


def attention_agreement(run: Callable[..., Tensor], device: str, dtype: torch.dtype, head_dim: int, length: int,
                        label: str = "attention") -> list[Result]:
    """`run(q, k, v, bias, scale)` (bias: (B, 1, N, N) float32, shared by every head; causal) against math,
    output and the gradients of q, k, v and the bias."""
    from .math import math_attention

    q, k, v, dout = random_inputs(device, dtype, (BATCH, HEADS, length, head_dim), (BATCH, KV_HEADS, length, head_dim),
                                  (BATCH, KV_HEADS, length, head_dim), (BATCH, HEADS, length, head_dim))
    bias, = random_inputs(device, torch.float32, (BATCH, 1, length, length))
    scale = head_dim ** -0.5
    ins = [t.requires_grad_() for t in (q, k, v, bias)]
    ref = [t.detach().double().requires_grad_() for t in ins]
    want = value_and_grads(lambda: math_attention(*ref[:3], bias=ref[3], causal=True, scale=scale), dout.double(), ref)
    got = value_and_grads(lambda: run(*ins, scale), dout, ins)
    names = (f"{label} {what}" for what in ("out", "dq", "dk", "dv", "dbias"))
    return list(zip(names, got, want))


def on_this_gpu(check: Callable[[str, torch.dtype, int], str | None], call) -> str | None:
    """`check(device, dtype, head dim)` (a cached self-check) for a CUDA call on this machine's current GPU;
    None for any other call, and for CUDA planned from a machine without one (`describe --device cuda`)."""
    if call.device != "cuda" or not torch.cuda.is_available():
        return None
    return check(str(torch.device("cuda", torch.cuda.current_device())), call.dtype, call.head_dim)


def first_disagreement(results: Iterable[Result], device: str, dtype: torch.dtype, head_dim: int,
                       kernels: str = "kernels") -> str | None:
    """Why the results disagree with math (the first that does), or None."""
    for what, got, want in results:
        err = (got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())
        if not err <= TOLERANCE[dtype]:
            return (f"the {kernels} disagree with PyTorch on this {device} ({what} off by {err:.2e} for {dtype}, "
                    f"head dim {head_dim})")
    return None


__all__ = ["TOLERANCE", "attention_agreement", "first_disagreement", "on_this_gpu", "random_inputs", "value_and_grads"]
