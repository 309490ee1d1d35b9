"""The sdpa backend against the math reference: every bias layout and mask case it handles, which path
it takes (fused kernels, never SDPA's silent math fallback for a bias with grad), and its refusals.

fp32: |difference| <= 1e-5 * max(1, largest |value|); float64 1e-10; bf16 forward 2e-2.
"""
from __future__ import annotations

import re

import pytest
import torch

import attention_zoo.backends.sdpa as sdpa_module
from attention_zoo.backends import BACKENDS, AttentionCall, choose
from tests.spies import LargestTensor

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2}
SDPA, MATH = BACKENDS.get("sdpa"), BACKENDS.get("math")


def close(actual, expected, dtype, what=""):
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOL[dtype] * scale, rtol=0,
                               msg=lambda m: f"{what}: {m}")


def tensors(B, H, Hkv, Nq, Nk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, D, generator=g).to(dtype) for h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk))]


def bias_of(kind, B, H, Nq, Nk, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "head_broadcast":  # a head-shared bias expanded with stride 0 over heads
        return torch.randn(B, Nq, Nk, generator=g).to(dtype).unsqueeze(1).expand(B, H, Nq, Nk)
    if kind == "size1":
        return torch.randn(B, 1, Nq, Nk, generator=g).to(dtype)
    return torch.randn(B, H, Nq, Nk, generator=g).to(dtype)


@pytest.fixture(autouse=True)
def small_forward_blocks(monkeypatch):
    monkeypatch.setitem(sdpa_module.FORWARD_BLOCK, "cpu", 16)


CASES = [  # (B, H, Hkv, Nq, Nk, causal)
    (2, 4, 4, 50, 50, True), (2, 4, 2, 50, 50, True), (1, 4, 1, 50, 50, True),
    (2, 4, 2, 20, 50, True), (2, 4, 2, 1, 50, True), (2, 4, 4, 30, 30, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}-Hkv{}-Nq{}-Nk{}-causal{}".format(*c))
@pytest.mark.parametrize("bias_kind", ["none", "head_broadcast", "size1", "per_head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sdpa_matches_math_with_grads_through_q_k_v(case, bias_kind, dtype):
    B, H, Hkv, Nq, Nk, causal = case
    q, k, v = [t.requires_grad_() for t in tensors(B, H, Hkv, Nq, Nk, 8, dtype)]
    bias = bias_of(bias_kind, B, H, Nq, Nk, dtype)
    results = []
    for backend in (SDPA, MATH):
        for t in (q, k, v):
            t.grad = None
        out = backend.attention(q, k, v, bias=bias, causal=causal, scale=0.3)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=dtype))
        results.append([out.detach(), q.grad, k.grad, v.grad])
    for name, a, b in zip(["out", "dq", "dk", "dv"], *results):
        close(a, b, dtype, name)


def test_bf16_forward_matches_math():
    q, k, v = tensors(2, 4, 2, 40, 40, 16, torch.bfloat16)
    bias = bias_of("head_broadcast", 2, 4, 40, 40, torch.float32)  # the penalty stays float32
    with torch.no_grad():
        close(SDPA.attention(q, k, v, bias=bias, causal=True, scale=0.25),
              MATH.attention(q.float(), k.float(), v.float(), bias=bias, causal=True, scale=0.25), torch.bfloat16)


def test_a_bias_with_grad_gets_its_gradient_without_per_head_scores():
    """A trainable head-broadcast bias: its gradient as math gives it, and no tensor as large as (B, H, N, N)
    made on the way (SDPA left to itself would fall back to its math path, which makes several). A detached
    bias gets no gradient; without autograd no graph is kept."""
    B, H, N = 2, 4, 24
    q, k, v = [t.double().requires_grad_() for t in tensors(B, H, 2, N, N, 8)]
    trainable = torch.randn(B, N, N, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(B, H, N, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = {}
    for backend in (SDPA, MATH):
        with LargestTensor() as spy:
            out = backend.attention(q, k, v, bias=trainable.unsqueeze(1).expand(B, H, N, N), causal=True, scale=0.5)
            grads[backend.name] = torch.autograd.grad(out, (q, k, v, trainable), dout)
        if backend is SDPA:
            assert spy.largest < B * H * N * N, f"{spy.op} made a tensor of {spy.largest} elements"
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), grads["sdpa"], grads["math"]):
        close(a, b, torch.float64, name)
    fixed = trainable.detach().requires_grad_()
    out = SDPA.attention(q, k, v, bias=fixed.detach().unsqueeze(1).expand(B, H, N, N), causal=True, scale=0.5)
    out.sum().backward()
    assert fixed.grad is None and q.grad is not None
    with torch.no_grad():
        assert SDPA.attention(q, k, v, bias=trainable.unsqueeze(1).expand(B, H, N, N), causal=True,
                              scale=0.5).grad_fn is None


def test_head_broadcast_mask_is_never_copied_per_head(monkeypatch):
    """SDPA receives a (B, 1, n, kv) mask for a head-broadcast bias, not H copies."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(None if attn_mask is None else tuple(attn_mask.shape))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(sdpa_module.F, "scaled_dot_product_attention", spy)
    q, k, v = tensors(2, 4, 2, 40, 40, 8)
    with torch.no_grad():
        SDPA.attention(q, k, v, bias=bias_of("head_broadcast", 2, 4, 40, 40, torch.float32), causal=True, scale=0.3)
    assert len(seen) > 1 and all(s[:2] == (2, 1) for s in seen)  # one mask per query block, head-broadcast
    assert sum(s[-2] for s in seen) == 40 and all(s[-1] <= 40 for s in seen)  # each query row exactly once
    read = sum(rows * keys for *_, rows, keys in seen)
    assert read < 0.75 * 40 * 40  # blocks skip most of the causal upper triangle (a whole mask reads 40 x 40)


def test_refusals_and_auto_order_on_cpu(monkeypatch):
    """fp16 training on CPU is refused only where torch's SDPA cannot differentiate fp16 there, with torch's own
    error as the reason (the probe is replaced by a failing one here: torch 2.13 can)."""
    call = AttentionCall(device="cpu", dtype=torch.float16, heads=4, kv_heads=4, head_dim=8, q_len=8, k_len=8,
                         has_bias=True, bias_requires_grad=True, grad_enabled=True)
    monkeypatch.setattr(sdpa_module, "cpu_half_backward_error", lambda: "RuntimeError: no half kernel")
    assert SDPA.refuse(call) == "fp16 backward on CPU is not supported by this torch's SDPA (RuntimeError: no half kernel)"
    chosen, skipped = choose("auto", call)
    assert chosen.name == "math"
    assert any(s.startswith("xformers:") and "CUDA" in s for s in skipped)
    assert any(s.startswith("sdpa:") and "no half kernel" in s for s in skipped)
    monkeypatch.setattr(sdpa_module, "cpu_half_backward_error", lambda: None)
    assert SDPA.refuse(call) is None


def test_the_fp16_probe_answers_the_same_under_inference_mode():
    """`refuse` may be asked under inference mode (`describe`, generation), whose tensors cannot be saved for a
    backward: the probe must not cache that as torch's inability."""
    with torch.inference_mode():
        inside = sdpa_module.half_backward_probe()
    assert inside == sdpa_module.half_backward_probe()


@pytest.mark.skipif(sdpa_module.cpu_half_backward_error() is not None, reason="this torch has no CPU fp16 SDPA backward")
@pytest.mark.parametrize("bias_kind", ["none", "size1", "per_head"])
def test_fp16_training_on_cpu_matches_math_where_torch_differentiates_it(bias_kind):
    """The refusal's reason must be true: where the probe passes, sdpa runs fp16 with gradients on CPU (GQA, a
    trainable bias, more keys than queries) within 2e-3 x max(1, |value|) of float64 math, output and every
    gradient (fp16's spacing is 1e-3 at 1; seen: under 1.1e-3)."""
    B, H, Hkv, Nq, Nk, D = 2, 4, 2, 9, 70, 16
    q, k, v = (t.half().requires_grad_() for t in tensors(B, H, Hkv, Nq, Nk, D))
    bias = bias_of(bias_kind, B, H, Nq, Nk, torch.float16)
    leaves = [q, k, v] + ([bias.requires_grad_()] if bias is not None else [])
    assert SDPA.refuse(AttentionCall.from_tensors(q, k, bias, v)) is None
    out = SDPA.attention(q, k, v, bias=bias, causal=True, scale=D ** -0.5)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).half()
    got = torch.autograd.grad(out, leaves, g)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = MATH.attention(*ref_leaves[:3], bias=ref_leaves[3] if bias is not None else None, causal=True, scale=D ** -0.5)
    want = torch.autograd.grad(ref, ref_leaves, g.double())
    for what, a, b in zip(("out", "dq", "dk", "dv", "dbias"), (out, *got), (ref, *want)):
        assert a.dtype == torch.float16, what
        torch.testing.assert_close(a.double(), b, atol=2e-3 * max(1.0, b.abs().max().item()), rtol=0, msg=what)


def test_backend_choice_is_memoised_per_call_signature(monkeypatch):
    from attention_zoo import backends

    sdpa = backends.BACKENDS.get("sdpa")
    asked = []
    real = type(sdpa).refuse
    monkeypatch.setattr(sdpa, "refuse", lambda call: asked.append(call) or real(sdpa, call))
    q = k = v = torch.randn(1, 2, 8, 4)
    for _ in range(3):
        backends.dispatch(q, k, v, bias=None, causal=True, scale=0.5, backend="sdpa")
    assert len(asked) == 1  # the same signature: asked once
    backends.dispatch(q[:, :, :4], k, v, bias=None, causal=True, scale=0.5, backend="sdpa")
    assert len(asked) == 2  # another length: asked again


def test_grad_enabled_counts_v():
    from attention_zoo.backends import AttentionCall

    q = k = torch.randn(1, 2, 8, 4)
    v = torch.randn(1, 2, 8, 4, requires_grad=True)
    assert AttentionCall.from_tensors(q, k, None, v).grad_enabled
    assert not AttentionCall.from_tensors(q, k, None, v.detach()).grad_enabled


def test_the_backend_choice_memo_is_bounded(monkeypatch):
    """Decoding makes a new call signature per key length: the memo keeps the latest MEMO_SIZE only."""
    import attention_zoo.backends as backends

    monkeypatch.setattr(backends, "_chosen", {})
    monkeypatch.setattr(backends, "MEMO_SIZE", 4)
    q = torch.randn(1, 2, 1, 8)
    for keys in range(1, 11):
        kv = torch.randn(1, 2, keys, 8)
        backends.dispatch(q, kv, kv, bias=None, causal=True, scale=0.5)
    assert len(backends._chosen) == 4
    assert sorted(key[1].k_len for key in backends._chosen) == [7, 8, 9, 10]


@pytest.mark.parametrize("shape", [(6,), (5, 6), (4, 5, 6), (1, 5, 6), (2, 1, 1, 6)], ids=str)
@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
def test_a_bias_with_fewer_dims_broadcasts_as_documented(shape, backend):
    """A bias broadcastable to (B, H, Nq, Nk) with fewer than 4 dims ((Nq, Nk) from positions alone) ran on math
    and crashed on sdpa, the default on CPU (an IndexError, a size mismatch, "bias must be 4-D"). It is now a
    4-D view everywhere: outputs and the bias's gradient (summed over what it broadcast over) match the math
    backend given the bias expanded by hand, fp64."""
    from attention_zoo import functional

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(2, 2, 6, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    bias = torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
    full = bias.detach().expand(2, 4, 5, 6).clone().requires_grad_()
    out = functional.attention(q, k, v, bias=bias, backend=backend)
    want = functional.attention(q, k, v, bias=full, backend="math")
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    weights = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    (got,) = torch.autograd.grad((out * weights).sum(), bias)
    (expanded,) = torch.autograd.grad((want * weights).sum(), full)
    dims = tuple(range(4 - len(shape))) + tuple(4 - len(shape) + i for i, n in enumerate(shape) if n == 1)
    torch.testing.assert_close(got, expanded.sum(dims, keepdim=True).reshape(shape), rtol=0, atol=1e-12)


def test_a_bias_that_does_not_broadcast_is_one_clear_error():
    from attention_zoo import functional

    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8)
    for shape in [(5, 5), (3, 5, 6), (1, 2, 4, 5, 6)]:
        message = f"attention bias of shape {tuple(shape)} does not broadcast to (B, H, Nq, Nk) = (2, 4, 5, 6)"
        with pytest.raises(ValueError, match=re.escape(message)):
            functional.attention(q, k, k, bias=torch.zeros(shape), backend="sdpa")
