"""Rows that see no key, and masks applied by selection, on every backend that runs here.

A query row that sees no key (more queries than keys under the bottom-right causal mask, or a bias that
masks the row whole with -inf, as padding does) gets output 0, finite gradients and no gradient of its
own, as flash attention and torch's SDPA give. Excluded entries of selective attention's scores are
selected to 0, so an infinite logit at an excluded (future) key changes nothing. Every backend that runs
on this machine is tried: math, sdpa, triton (Triton's interpreter on CPU), flex (forward only on CPU).
Tolerances: 1e-6 in float32 against float64; values said to be 0 are exactly 0.
"""
from __future__ import annotations

import pytest
import torch

from attention_zoo import functional
from attention_zoo.backends import BACKENDS

INF = float("inf")
TRAINING = ["math", "sdpa", "triton"]  # backends with a backward on CPU (triton in its interpreter)
FORWARD_ONLY = ["flex"]  # torch has no FlexAttention backward on CPU


@pytest.fixture(params=TRAINING + FORWARD_ONLY)
def backend(request):
    name = request.param
    if name == "triton":
        request.getfixturevalue("triton_backend")  # skips where triton's kernels cannot run here
    if name == "flex" and BACKENDS.get("flex").refuse(_call()):
        pytest.skip(BACKENDS.get("flex").refuse(_call()))
    return name


def _call():
    from attention_zoo.backends import AttentionCall
    return AttentionCall(device="cpu", dtype=torch.float32, heads=1, kv_heads=1, head_dim=16, q_len=2, k_len=1)


def trains(backend: str) -> bool:
    return backend in TRAINING


def reference(q, k, v, bias, causal, rows):
    """Plain float64 softmax attention of query rows `rows` (indices into Nq = q.shape[2]) that each see at
    least one key, so no masked softmax is needed. Returns (B, H, len(rows), D)."""
    Nq, Nk = q.shape[2], k.shape[2]
    scores = torch.einsum("bhnd,bhmd->bhnm", q[:, :, rows], k) * q.shape[-1] ** -0.5 + bias[:, :, rows]
    if causal:
        visible = torch.arange(Nk)[None, :] <= rows[:, None] + Nk - Nq
        scores = scores.masked_fill(~visible, -INF)
    return torch.einsum("bhnm,bhmd->bhnd", torch.softmax(scores, dim=-1), v)


def test_the_reported_causal_call_gives_zero_for_the_row_that_sees_no_key(backend):
    """q (1, 1, 2, 16), k = v (1, 1, 1, 16), causal: row 0 sits before the only key. Row 1 sees that key
    alone, so its output is v itself and, softmax over one key being constant, dq = dk = 0, dv = dout[1]."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 2, 16, generator=g).requires_grad_(trains(backend))
    kv = torch.randn(1, 1, 1, 16, generator=g).requires_grad_(trains(backend))
    out = functional.attention(q, kv, kv, causal=True, backend=backend)
    assert torch.equal(out[0, 0, 0], torch.zeros(16))
    torch.testing.assert_close(out[0, 0, 1], kv[0, 0, 0].detach(), atol=1e-6, rtol=0)
    if trains(backend):
        dout = torch.randn(1, 1, 2, 16, generator=g)
        dq, dkv = torch.autograd.grad(out, (q, kv), dout)
        assert torch.equal(dq[0, 0, 0], torch.zeros(16))  # the dead row: exactly 0
        torch.testing.assert_close(dq[0, 0, 1], torch.zeros(16), atol=1e-6, rtol=0)  # 0 up to rounding
        torch.testing.assert_close(dkv[0, 0, 0], dout[0, 0, 1], atol=1e-6, rtol=0)  # dk = 0, dv = dout[1]


@pytest.mark.parametrize("backend_name", TRAINING)
def test_the_reported_call_with_a_trainable_bias_has_finite_gradients(request, backend_name):
    """The same call with a trainable (1, 1, 2, 1) bias: on sdpa its forward was right but dq, dk, dv and
    d(bias) were NaN. The bias of a row over a single key changes nothing: d(bias) = 0."""
    if backend_name == "triton":
        request.getfixturevalue("triton_backend")
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, 2, 16, generator=g).requires_grad_()
    k, v = (torch.randn(1, 1, 1, 16, generator=g).requires_grad_() for _ in range(2))
    bias = torch.randn(1, 1, 2, 1, generator=g).requires_grad_()
    out = functional.attention(q, k, v, bias=bias, causal=True, backend=backend_name)
    dout = torch.randn(1, 1, 2, 16, generator=g)
    dq, dk, dv, dbias = torch.autograd.grad(out, (q, k, v, bias), dout)
    assert torch.equal(out[0, 0, 0], torch.zeros(16))
    torch.testing.assert_close(out[0, 0, 1], v[0, 0, 0].detach(), atol=1e-6, rtol=0)
    for name, grad in {"dq": dq, "dk": dk, "dbias": dbias}.items():
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(dv[0, 0, 0], dout[0, 0, 1], atol=1e-6, rtol=0)


# (B, H, Nq, Nk, causal, padded query rows): rows [0, Nq - Nk) see no key under the causal mask; padded
# rows are masked whole by a -inf bias. 200 queries pass sdpa's 128-row blocks on CPU, so a whole block
# sees no key; triton's interpreter tiles are 16 rows.
CASES = [
    (1, 1, 2, 1, True, ()),
    (2, 2, 40, 10, True, ()),
    (1, 2, 200, 10, True, ()),
    (2, 2, 5, 5, False, (1, 4)),
    (2, 2, 20, 20, True, (0, 7, 19)),
    (1, 4, 40, 10, True, (35,)),
]


@pytest.mark.parametrize("trainable_bias", [False, True], ids=["bias", "trainable-bias"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}-Nq{}-Nk{}-{}-pad{}".format(*c[:4], "causal" if c[4]
                                                                                           else "full", len(c[5])))
def test_rows_that_see_no_key(backend, case, trainable_bias):
    """Dead rows: output 0, gradient 0 for their q and bias rows; every other value and gradient as plain
    float64 attention of the live rows gives it; nothing non-finite anywhere."""
    B, H, Nq, Nk, causal, padded = case
    if backend == "triton" and Nq > 64:
        pytest.skip("the interpreter is slow; 40 queries already span several tiles")
    g = torch.Generator().manual_seed(Nq * 100 + Nk + len(padded))
    grad = trains(backend)
    q = torch.randn(B, H, Nq, 16, generator=g).requires_grad_(grad)
    k, v = (torch.randn(B, H, Nk, 16, generator=g).requires_grad_(grad) for _ in range(2))
    bias = torch.randn(B, 1, Nq, Nk, generator=g)
    bias[:, :, list(padded)] = -INF
    bias.requires_grad_(grad and trainable_bias)
    dead = torch.zeros(Nq, dtype=torch.bool)
    dead[list(padded)] = True
    if causal:
        dead[:max(0, Nq - Nk)] = True
    out = functional.attention(q, k, v, bias=bias, causal=causal, backend=backend)
    assert out.isfinite().all()
    assert torch.equal(out[:, :, dead], torch.zeros_like(out[:, :, dead]))
    live = ~dead
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    want = reference(*inputs, causal=causal, rows=live.nonzero()[:, 0])
    torch.testing.assert_close(out[:, :, live].double(), want, atol=1e-6, rtol=0)
    if not grad:
        return
    dout = torch.randn(B, H, Nq, 16, generator=g)
    wanted = [t for t in (q, k, v, bias) if t.requires_grad]
    got = torch.autograd.grad(out, wanted, dout)
    ref = torch.autograd.grad(want, inputs[:len(wanted)], dout[:, :, live].double(), allow_unused=True)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), got, ref):
        assert a.isfinite().all(), name
        if name in ("dq", "dbias"):
            assert torch.equal(a[:, :, dead], torch.zeros_like(a[:, :, dead])), name
            a, b = a[:, :, live], b[:, :, live]
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


# --- masks are applied by selection, never by multiplication ----------------------------------------------


def test_an_infinite_logit_at_an_excluded_key_leaves_the_penalty_finite():
    """L[0, 0, 2] = +inf is key 2 in query 0's future: excluded, so F = 0 everywhere (it was NaN at
    F[1, 2] and F[2, 2]). Fused and unfused (the cache's) paths alike, and the gradient of L is 0 there."""
    logits = torch.zeros(1, 3, 3)
    logits[0, 0, 2] = INF
    assert torch.equal(functional.selection_scores(logits, protect_bos=False), torch.zeros(1, 3, 3))
    assert torch.equal(functional.penalty_from_scores(functional.selection_scores(logits, protect_bos=False)),
                       torch.zeros(1, 3, 3))
    leaf = logits.clone().requires_grad_()
    penalty = functional.selection_penalty(leaf, protect_bos=False)
    assert torch.equal(penalty.detach(), torch.zeros(1, 3, 3))
    (dlogits,) = torch.autograd.grad(penalty, leaf, torch.ones(1, 3, 3))
    assert torch.equal(dlogits, torch.zeros(1, 3, 3))  # L <= 0 or excluded everywhere: S = 0 and so is dS/dL


def test_an_infinite_upstream_gradient_at_an_excluded_key_stays_out_of_the_logits_gradient():
    """dF = inf on a column reaches dS of every earlier row, excluded entries too: they must read 0, not
    inf * 0 = NaN. Key 2 is excluded for queries 0, 1, 2, active (L = 1) for query 3."""
    leaf = torch.ones(1, 4, 4).requires_grad_()
    penalty = functional.selection_penalty(leaf, protect_bos=False)
    dpen = torch.zeros(1, 4, 4)
    dpen[0, 3, 2] = INF
    (dlogits,) = torch.autograd.grad(penalty, leaf, dpen)
    assert torch.equal(dlogits[0, :3, 2], torch.zeros(3))  # excluded (key 2 is not before query 0, 1, 2)
    assert dlogits[0, 3, 2] == 0  # no row below query 3 to carry dF


@pytest.mark.parametrize("backend_name", TRAINING)
def test_a_half_precision_overflow_at_an_excluded_pair_changes_no_output(request, backend_name):
    """float16 selection logits overflow to inf at one excluded (future) pair: the output equals the float64
    result, where that logit is finite and excluded all the same (it made whole rows NaN)."""
    if backend_name == "triton":
        request.getfixturevalue("triton_backend")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 6, 16, generator=g) * 0.3 for _ in range(3))
    q[0, 0, 0, 0] = 1000.0  # query 0 of the selection head against key 5, its future:
    k[0, 0, 5, 0] = 1000.0  # 1000 * 1000 / 4 = 250000 > 65504, float16's largest value
    assert functional.selection_logits(q.half(), k.half(), 0)[0, 0, 5] == INF
    from attention_zoo.backends.sdpa import cpu_half_backward_error

    if backend_name == "sdpa" and cpu_half_backward_error():  # this torch's SDPA has no CPU fp16 backward: forward only
        with torch.no_grad():
            got = functional.selective_attention(q.half(), k.half(), v.half(), backend=backend_name)
    else:
        got = functional.selective_attention(q.half(), k.half(), v.half(), backend=backend_name)
    want = functional.selective_attention(q.double(), k.double(), v.double(), backend="math")
    assert got.isfinite().all()
    torch.testing.assert_close(got.double(), want, atol=3e-3 * max(1.0, want.abs().max().item()), rtol=0)


@pytest.mark.parametrize("bias_kind", ["none", "tensor", "selection"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "unmasked"])
@pytest.mark.parametrize("sizes", [(0, 3, 3), (1, 0, 3), (1, 3, 0), (1, 0, 0)], ids=lambda s: "B{}-Nq{}-Nk{}".format(*s))
def test_a_call_with_nothing_to_attend(backend, sizes, causal, bias_kind):
    """No batch element, no query or no key (an empty chunk, an empty cache): the empty result, or 0 for every
    query when there is no key, with zero (finite) gradients, on every backend. The math reference failed on no
    key (amax over an empty dim), sdpa on no batch element or query (an empty block plan), flex on each."""
    from attention_zoo.backends import dispatch
    from attention_zoo.ops.selection import Selection

    B, Nq, Nk = sizes
    if bias_kind == "selection" and Nq > Nk:
        pytest.skip("a Selection has no more queries than keys")
    grad = trains(backend)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n, 16, generator=g).requires_grad_(grad) for h, n in ((2, Nq), (1, Nk), (1, Nk)))
    bias = None
    if bias_kind == "tensor":
        bias = torch.randn(B, 1, Nq, Nk, generator=g).requires_grad_(grad)
    elif bias_kind == "selection":
        bias = Selection.of_head(torch.randn(B, Nq, 4, generator=g).requires_grad_(grad),
                                 torch.randn(B, Nk, 4, generator=g).requires_grad_(grad), 0.5)
    with torch.set_grad_enabled(grad):
        out = dispatch(q, k, v, bias=bias, causal=causal, scale=0.25, backend=backend)
    assert out.shape == (B, 2, Nq, 16)
    assert torch.equal(out, torch.zeros_like(out))
    if grad:
        out.sum().backward()
        for t in (q, k, v):
            assert torch.equal(t.grad, torch.zeros_like(t))
