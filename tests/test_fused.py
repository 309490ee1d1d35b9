"""The fused selective path: `BiasGradAttention` (fused forward, blockwise recomputed backward) and the
fused selection penalty, against plain autograd through the `math` backend and the unfused penalty.

Tolerances: fp32 |difference| <= 1e-5 * max(1, largest |value|); float64 1e-10.
"""
from __future__ import annotations

import pytest
import torch

from attention_zoo.backends import fused
from attention_zoo.backends.fused import bias_grad_attention
from attention_zoo.backends.math import math_attention
from attention_zoo.backends.sdpa import sdpa_forward
from attention_zoo.functional import penalty_from_scores, selection_logits, selection_penalty, selection_scores
from attention_zoo.ops.selection import penalty
from tests.spies import LargestTensor


def minus_F(F):
    """-F as a compact head-shared bias (B, 1, Nq, Nk)."""
    return (-F).unsqueeze(1)

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def close(actual, expected, dtype, what):
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=TOL[dtype] * scale, rtol=0, msg=lambda m: f"{what}: {m}")


def qkv(B, H, Hkv, Nq, Nk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q as the projection makes it: a transposed view of (B, N, H, D)
    q = torch.randn(B, Nq, H, D, generator=g, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


def grads_of(fn, tensors, out_shape, dtype):
    for t in tensors:
        t.grad = None
    out = fn()
    out.backward(torch.randn(out_shape, generator=torch.Generator().manual_seed(7), dtype=dtype))
    return [out.detach()] + [t.grad.clone() for t in tensors]


# (B, H, Hkv, Nq, Nk, D): plain, GQA, MQA, a cached chunk (Nq < Nk), decode (Nq = 1), a length that is
# no multiple of the block size.
SHAPES = [(2, 4, 4, 70, 70, 8), (2, 4, 2, 70, 70, 8), (1, 4, 1, 33, 33, 8), (2, 4, 2, 21, 90, 8),
          (2, 4, 2, 1, 40, 8), (1, 2, 2, 130, 130, 4)]


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks much smaller than the sequences, so multi-block and partial-block paths all run."""
    monkeypatch.setitem(fused.BACKWARD_BLOCK, "cpu", 16)
    import attention_zoo.backends.sdpa as sdpa_module

    monkeypatch.setitem(sdpa_module.FORWARD_BLOCK, "cpu", 24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-Hkv{}-Nq{}-Nk{}-D{}".format(*s))
@pytest.mark.parametrize("bias_kind", ["selective", "selective_as_the_variant_builds_it", "per_head", "batch_broadcast"])
def test_bias_grad_attention_matches_math(small_blocks, shape, dtype, bias_kind):
    B, H, Hkv, Nq, Nk, D = shape
    q, k, v = qkv(B, H, Hkv, Nq, Nk, D, dtype)
    g = torch.Generator().manual_seed(3)
    leaf = {"per_head": torch.randn(B, H, Nq, Nk, generator=g, dtype=dtype),
            "batch_broadcast": torch.randn(1, 1, Nq, Nk, generator=g, dtype=dtype)}.get(bias_kind)
    leaf = None if leaf is None else leaf.requires_grad_()
    tensors = [q, k, v] + ([leaf] if leaf is not None else [])

    def bias():
        if bias_kind == "selective":  # -F from the selection head, expanded over heads with stride 0
            F = penalty_from_scores(selection_scores(selection_logits(q, k, H - 1), protect_bos=True))
            if Nq < Nk:  # a cached chunk: what the cache accumulated for earlier queries
                F = F + torch.linspace(0, 2, Nk, dtype=F.dtype)
            return minus_F(F)
        if bias_kind == "selective_as_the_variant_builds_it":  # compact, or expanded over heads with stride 0
            F = selection_penalty(selection_logits(q, k, H - 1))
            return minus_F(F) if Nq % 2 else minus_F(F).expand(-1, H, -1, -1)
        return leaf

    scale = D ** -0.5
    ours = grads_of(lambda: bias_grad_attention(q, k, v, bias(), causal=True, scale=scale, kernel=sdpa_forward),
                    tensors, (B, H, Nq, D), dtype)
    ref = grads_of(lambda: math_attention(q, k, v, bias=bias(), causal=True, scale=scale), tensors, (B, H, Nq, D), dtype)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dbias"], ours, ref):
        close(a, b, dtype, name)


def test_not_causal_and_no_bias_grad_inputs(small_blocks):
    q, k, v = qkv(2, 4, 2, 30, 30, 8, torch.float64)
    bias = torch.randn(2, 1, 30, 30, dtype=torch.float64, requires_grad=True)
    ours = grads_of(lambda: bias_grad_attention(q, k, v, bias, causal=False, scale=0.3, kernel=sdpa_forward),
                    [q, k, v, bias], (2, 4, 30, 8), torch.float64)
    ref = grads_of(lambda: math_attention(q, k, v, bias=bias, causal=False, scale=0.3), [q, k, v, bias],
                   (2, 4, 30, 8), torch.float64)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dbias"], ours, ref):
        close(a, b, torch.float64, name)




def test_a_stride_0_head_expansion_gets_the_spread_gradient():
    """A bias expanded over heads with stride 0: the head-summed gradient is spread over the expanded views,
    and the expand's backward sums it back exactly."""
    q, k, v = qkv(2, 4, 2, 20, 20, 8, torch.float64)
    F = torch.rand(2, 20, 20, dtype=torch.float64, requires_grad=True)
    tensors = [q, k, v, F]
    ours = grads_of(lambda: bias_grad_attention(q, k, v, minus_F(F).expand(-1, 4, -1, -1), causal=True, scale=0.35,
                                                kernel=sdpa_forward), tensors, (2, 4, 20, 8), torch.float64)
    ref = grads_of(lambda: math_attention(q, k, v, bias=minus_F(F).expand(-1, 4, -1, -1), causal=True, scale=0.35), tensors,
                   (2, 4, 20, 8), torch.float64)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dF"], ours, ref):
        close(a, b, torch.float64, name)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_selective_forward_and_backward_never_materialise_per_head_scores(kv_heads):
    """The whole selective step, penalty included, on the sdpa backend: no tensor as large as
    (B, H, N, N) is ever created (the math fallback would create several)."""
    from attention_zoo.backends import BACKENDS

    B, H, N, D = 2, 4, 64, 8
    q, k, v = qkv(B, H, kv_heads, N, N, D, torch.float32)
    with LargestTensor() as spy:
        bias = minus_F(selection_penalty(selection_logits(q, k, 0)))
        out = BACKENDS.get("sdpa").attention(q, k, v, bias=bias, causal=True, scale=D ** -0.5)
        out.sum().backward()
    assert spy.largest < B * H * N * N, f"{spy.op} made a tensor of {spy.largest} elements"
    with LargestTensor() as spy:  # the check itself can see a (B, H, N, N) tensor
        bias = minus_F(selection_penalty(selection_logits(q, k, 0)))
        BACKENDS.get("math").attention(q, k, v, bias=bias, causal=True, scale=D ** -0.5).sum().backward()
    assert spy.largest >= B * H * N * N


# --- the fused selection penalty --------------------------------------------------------------------

@pytest.mark.parametrize("negate", [False, True], ids=["F", "minus-F"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("Nq,Nk,accumulated,protect_bos", [(100, 100, False, True), (37, 130, True, False),
                                                          (1, 9, True, True), (128, 128, False, False)])
def test_fused_penalty_matches_unfused(dtype, Nq, Nk, accumulated, protect_bos, negate):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, Nq, Nk, generator=g, dtype=dtype, requires_grad=True)
    acc = torch.rand(2, Nk, generator=g, dtype=dtype, requires_grad=True) if accumulated else None
    tensors = [logits] + ([acc] if acc is not None else [])
    sign = -1 if negate else 1
    ours = grads_of(lambda: penalty.fused_selection_penalty(logits, protect_bos=protect_bos, accumulated=acc,
                                                            negate=negate), tensors, (2, Nq, Nk), dtype)
    ref = grads_of(lambda: sign * penalty_from_scores(selection_scores(logits, protect_bos=protect_bos), acc),
                   tensors, (2, Nq, Nk), dtype)
    for name, a, b in zip(["F", "dlogits", "daccumulated"], ours, ref):
        close(a, b, dtype, name)
    assert ours[0].dtype == torch.promote_types(dtype, torch.float32)


def test_fused_penalty_keeps_float32_for_half_logits():
    logits = torch.randn(1, 10, 10).to(torch.bfloat16)
    assert penalty.fused_selection_penalty(logits).dtype == torch.float32


@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_exclusive_row_cumsum(reverse, negate):
    x = torch.randn(3, 150, 7, dtype=torch.float64)
    inclusive = x.flip(1).cumsum(1).flip(1) if reverse else x.cumsum(1)
    close(penalty.exclusive_row_cumsum(x, reverse=reverse, negate=negate), (inclusive - x) * (-1 if negate else 1),
          torch.float64, "cumsum")


def test_fused_penalty_saves_only_a_bool_mask():
    logits = torch.randn(2, 40, 40, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        penalty.fused_selection_penalty(logits * 1.0)
    assert saved and all(t.dtype == torch.bool for t in saved)


def test_backward_split_over_threads_matches_one_thread():
    """On CPU with several intra-op threads the batch elements are shared out among worker threads."""
    q, k, v = qkv(4, 4, 2, 70, 70, 8, torch.float64)
    bias = torch.randn(4, 1, 70, 70, dtype=torch.float64, requires_grad=True)
    tensors = [q, k, v, bias]

    def run():
        return grads_of(lambda: bias_grad_attention(q, k, v, bias, causal=True, scale=0.3, kernel=sdpa_forward),
                        tensors, (4, 4, 70, 8), torch.float64)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    one = run()
    torch.set_num_threads(2)
    try:
        two = run()
        assert torch.get_num_threads() == 2  # restored after the workers set their own
    finally:
        torch.set_num_threads(before)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dbias"], two, one):
        close(a, b, torch.float64, name)


def test_bfloat16_inputs_with_a_float32_penalty(small_blocks):
    """bf16 q, k, v (the penalty stays float32): the backward recomputes in float32; gradients come
    back in bf16 and agree with float32 math to bf16 precision."""
    q, k, v = qkv(2, 4, 2, 40, 40, 16, torch.float32)
    F = torch.rand(2, 40, 40, requires_grad=True)
    dout = torch.randn(2, 4, 40, 16, generator=torch.Generator().manual_seed(7))
    results = []
    for dtype, attend in ((torch.bfloat16, lambda *a, bias: bias_grad_attention(*a, bias, causal=True, scale=0.25,
                                                                                   kernel=sdpa_forward)),
                          (torch.float32, lambda *a, bias: math_attention(*a, bias=bias, causal=True, scale=0.25))):
        F.grad = None
        inputs = [t.detach().to(torch.bfloat16).to(dtype).requires_grad_() for t in (q, k, v)]
        out = attend(*inputs, bias=minus_F(F).expand(-1, 4, -1, -1))
        out.backward(dout.to(dtype))
        results.append([out.detach()] + [t.grad for t in inputs] + [F.grad.clone()])
    ours, ref = results
    assert [t.dtype for t in ours] == [torch.bfloat16] * 4 + [torch.float32]
    for name, a, b in zip(["out", "dq", "dk", "dv", "dF"], ours, ref):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.float(), b, atol=3e-2 * scale, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
