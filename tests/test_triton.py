"""The triton backend's kernels against the math backend, on outputs and every gradient.

Without a GPU they run in Triton's interpreter (see conftest.py): the same kernel code, executed
program by program in numpy, with tiles of 16 so every case walks several query and key blocks and
partial tiles. On CUDA the same tests run the compiled kernels (64 x 64 tiles). Tolerances, relative to
max(1, largest |value|): fp32 1e-5 (IEEE fp32 dots); fp16 3e-3 against a float64 reference.
Every registered variant also trains on this backend in tests/test_contract.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from attention_zoo.backends import AttentionCall, choose
from attention_zoo.backends.math import math_attention
from attention_zoo.errors import UserError
from tests.spies import LargestTensor

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def shared_from_base(B, H, Nq, Nk, g):
    """A head-shared bias expanded to H heads with stride 0 from (B, Nq, Nk)."""
    base = torch.randn(B, Nq, Nk, generator=g).to(DEVICE).requires_grad_()
    return base, base.unsqueeze(1).expand(B, H, Nq, Nk)


def shared_without_base(B, H, Nq, Nk, g):
    """A stride-0 head expansion of a view whose `_base` has another geometry: the spread-gradient path."""
    wide = torch.randn(B, Nq, 2 * Nk, generator=g).to(DEVICE).requires_grad_()
    return wide, wide[:, :, :Nk].unsqueeze(1).expand(B, H, Nq, Nk)



def compact(shape):
    def make(B, H, Nq, Nk, g):
        b, h = shape
        leaf = torch.randn(b if b else B, h if h else H, Nq, Nk, generator=g).to(DEVICE).requires_grad_()
        return leaf, leaf
    return make


BIASES = {
    "head-shared": shared_from_base,
    "head-shared-no-base": shared_without_base,
    "B1NN": compact((0, 1)),
    "per-head": compact((0, 0)),
    "batch-and-head-shared": compact((1, 1)),
    "none": None,
}
CASES = [  # (B, H, Hkv, Nq, Nk, D, causal)
    (2, 4, 4, 37, 37, 16, True),   # partial last tile
    (2, 4, 2, 40, 40, 24, True),   # GQA, a head dim that is no power of two
    (1, 4, 1, 33, 33, 16, True),   # MQA
    (2, 2, 2, 19, 50, 16, True),   # a cached chunk: queries sit at the end (bottom-right causal)
    (2, 4, 2, 30, 45, 16, False),  # no mask
]
if DEVICE == "cuda":  # compiled: past the head-shared backward's 512-key spans (the interpreter's are 32), and
    # whole tiles below the diagonal (the unmasked loops), also with cached keys before the queries
    CASES += [(2, 4, 2, 600, 600, 64, True), (1, 4, 2, 200, 600, 64, True)]


def run_both(backend, case, bias_kind, dtype):
    B, H, Hkv, Nq, Nk, D, causal = case
    g = torch.Generator().manual_seed(zlib.crc32(repr((case, bias_kind)).encode()))  # the same in every process
    q = torch.randn(B, H, Nq, D, generator=g).to(DEVICE, dtype).requires_grad_()
    k, v = (torch.randn(B, Hkv, Nk, D, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(2))
    leaf, bias = BIASES[bias_kind](B, H, Nq, Nk, g) if BIASES[bias_kind] else (None, None)
    inputs = [t for t in (q, k, v, leaf) if t is not None]
    dout = torch.randn(B, H, Nq, D, generator=g).to(DEVICE, dtype)
    out = backend.attention(q, k, v, bias=bias, causal=causal, scale=D ** -0.5)
    got = [out, *torch.autograd.grad(out, inputs, dout)]
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    rq, rk, rv = ref_inputs[:3]
    rbias = None
    if leaf is not None:  # the same view of the float64 leaf
        rleaf = ref_inputs[3]
        rbias = {"head-shared": lambda: rleaf.unsqueeze(1).expand(B, H, Nq, Nk),
                 "head-shared-no-base": lambda: rleaf[:, :, :Nk].unsqueeze(1).expand(B, H, Nq, Nk),
                 "head-shared-negated-view": lambda: (-rleaf).unsqueeze(1).expand(B, H, Nq, Nk)}.get(bias_kind, lambda: rleaf)()
    ref = math_attention(rq, rk, rv, bias=rbias, causal=causal, scale=D ** -0.5)
    want = [ref, *torch.autograd.grad(ref, ref_inputs, dout.double())]
    return got, want


def assert_matches(got, want, dtype, names=("out", "dq", "dk", "dv", "dbias"), label=""):
    """Each result against its float64 reference, within TOL[dtype] of max(1, largest |value|)."""
    for what, a, b in zip(names, got, want):
        assert a.shape == b.shape, what
        torch.testing.assert_close(a.double(), b, atol=TOL[dtype] * max(1.0, b.abs().max().item()), rtol=0,
                                   msg=lambda m, what=what: f"{label}{what}: {m}")


def case_name(c):
    return "B{}-H{}-Hkv{}-Nq{}-Nk{}-D{}-{}".format(*c[:6], "causal" if c[6] else "full")


# Every case with every bias kind, but for a batch of 1 a (1, 1, Nq, Nk) "batch-and-head-shared" bias is a "B1NN"
# one: the same shape, so the same path.
FP32_ROWS = [(case, kind) for case in CASES for kind in BIASES if not (case[0] == 1 and kind == "batch-and-head-shared")]


@pytest.mark.parametrize("case,bias_kind", FP32_ROWS, ids=[f"{case_name(c)}-{k}" for c, k in FP32_ROWS])
def test_matches_math_fp32(triton_backend, case, bias_kind, monkeypatch):
    """Output and every gradient, with the default dq strategy for a shared bias ("recompute"). Also: the kernels
    return one (B, 1, Nq, Nk) gradient for a head-shared bias, never one per head (a spy on attention_backward:
    the backend's head-summed gradient would have the same values either way)."""
    from attention_zoo.backends import triton_kernels
    from attention_zoo.backends.triton_tuning import SHARED_DQ_ENV

    monkeypatch.delenv(SHARED_DQ_ENV, raising=False)  # the default dq strategy, "recompute"
    shapes = []
    real = triton_kernels.attention_backward

    def spy(*args, **kwargs):
        grads = real(*args, **kwargs)
        shapes.append(None if grads[3] is None else tuple(grads[3].shape))
        return grads

    monkeypatch.setattr(triton_kernels, "attention_backward", spy)
    got, want = run_both(triton_backend, case, bias_kind, torch.float32)
    assert_matches(got, want, torch.float32)
    if bias_kind.startswith("head-shared"):
        B, _, _, Nq, Nk = case[:5]
        assert shapes == [(B, 1, Nq, Nk)]


@pytest.mark.parametrize("bias_kind", ["head-shared", "B1NN"])
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: "B{}-H{}-Hkv{}-Nq{}-Nk{}".format(*c[:5]))
def test_atomic_shared_bias_dq_strategy_matches_math(triton_backend, case, bias_kind, monkeypatch):
    """A head-shared bias's dq by atomics in the d(bias) kernel: exact. The other strategy, dq recomputed by the
    per-head dq kernel, is the default (test_shared_dq_strategy_is_deterministic_by_default_...), so
    test_matches_math_fp32 runs it on these very problems (the same cases, bias kinds and seeds)."""
    from attention_zoo.backends.triton_tuning import SHARED_DQ_ENV

    monkeypatch.setenv(SHARED_DQ_ENV, "atomic")
    got, want = run_both(triton_backend, case, bias_kind, torch.float32)
    assert_matches(got, want, torch.float32, label="atomic ")


def test_shared_dq_strategy_is_deterministic_by_default_and_timed_only_when_asked(monkeypatch):
    from attention_zoo.backends import triton_tuning

    monkeypatch.setattr(triton_tuning, "INTERPRETED", False)  # as on a GPU
    monkeypatch.setattr(triton_tuning, "_shared_dq_chosen", {})
    monkeypatch.delenv(triton_tuning.SHARED_DQ_ENV, raising=False)
    ran, timed = [], []

    def timer(fn):
        fn()
        timed.append(ran[-1])
        return {"atomic": 1.0, "recompute": 2.0}[ran[-1]]

    run = ran.append
    assert triton_tuning.shared_dq_strategy(("problem",), run, timer) == "recompute"  # no atomics unless asked
    assert timed == []
    monkeypatch.setenv(triton_tuning.SHARED_DQ_ENV, "fastest")
    assert triton_tuning.shared_dq_strategy(("problem",), run, timer) == "atomic"
    assert triton_tuning.shared_dq_strategy(("problem",), run, timer) == "atomic"
    assert timed == ["atomic", "recompute"]  # both timed once, the choice kept for the problem
    monkeypatch.setenv(triton_tuning.SHARED_DQ_ENV, "atomic")
    assert triton_tuning.shared_dq_strategy(("problem",), run, timer) == "atomic"
    monkeypatch.setenv(triton_tuning.SHARED_DQ_ENV, "fastest")
    monkeypatch.setattr(triton_tuning, "_capturing_cuda_graph", lambda: True)  # no timing inside a capture
    assert triton_tuning.shared_dq_strategy(("captured",), run, timer) == "atomic" and timed == ["atomic", "recompute"]
    monkeypatch.setenv(triton_tuning.SHARED_DQ_ENV, "atomics")
    with pytest.raises(UserError, match="ATTENTION_ZOO_TRITON_SHARED_DQ='atomics': expected one of atomic, recompute, fastest"):
        triton_tuning.shared_dq_strategy(("problem",), run, timer)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_matches_math_half(triton_backend, dtype):
    if triton_backend.refuse(call(dtype=dtype, device=DEVICE)):
        pytest.skip(triton_backend.refuse(call(dtype=dtype, device=DEVICE)))
    got, want = run_both(triton_backend, CASES[1], "head-shared", dtype)
    for what, a in zip(("out", "dq", "dk", "dv", "dbias"), got):
        assert a.dtype == (torch.float32 if what == "dbias" else dtype), what  # the bias leaf is float32, as F is
    assert_matches(got, want, dtype)


def call(device="cuda", dtype=torch.float32, head_dim=64, bias_grad=True, heads=8):
    return AttentionCall(device=device, dtype=dtype, heads=heads, kv_heads=heads, head_dim=head_dim, q_len=16, k_len=16,
                         has_bias=bias_grad, bias_requires_grad=bias_grad, grad_enabled=True)


def test_refusals_name_the_reason(triton_backend):
    assert "float64" in triton_backend.refuse(call(device=DEVICE, dtype=torch.float64))
    assert "head dim 256" in triton_backend.refuse(call(device=DEVICE, head_dim=256))
    assert "CUDA" in triton_backend.refuse(call(device="mps"))


def test_auto_defers_all_but_training_with_a_trainable_bias(monkeypatch):
    from attention_zoo.backends import BACKENDS

    triton = BACKENDS.get("triton")
    assert "trainable bias" in triton.defer(call(bias_grad=False))
    assert triton.defer(call(bias_grad=True)) is None
    assert "interpreter" in triton.defer(call(device="cpu"))  # auto never runs the interpreter
    chosen, skipped = choose("auto", call(device="cpu"))
    assert chosen.name == "sdpa" and skipped[0].startswith("triton: ")


def test_an_interpreter_too_old_for_the_kernels_is_refused(triton_backend, monkeypatch):
    """triton 3.6's interpreter fails on these kernels' loop bounds (3.7 and 3.9 run them): a clear refusal."""
    from attention_zoo.backends import triton_kernels

    if DEVICE == "cuda":
        pytest.skip("the interpreter's version floor concerns CPU runs")
    monkeypatch.setattr(triton_kernels, "VERSION", (3, 6))
    assert "from triton 3.7 on (this is 3.6)" in triton_backend.refuse(call(device="cpu"))


def test_cpu_without_the_interpreter_refuses_without_importing(monkeypatch):
    from attention_zoo.backends import BACKENDS
    from attention_zoo.backends import triton as triton_module

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton_module, "load_kernels", lambda: pytest.fail("imported triton for a CPU call"))
    assert "TRITON_INTERPRET=1" in BACKENDS.get("triton").refuse(call(device="cpu"))


def test_self_check_passes_and_catches_wrong_kernels(triton_backend, monkeypatch):
    """The whole self-check passes at its own sizes; then each wrong kernel below is caught by the check that
    covers it (SELF_CHECKS narrowed to that one: the others would pass and only cost time), and the first
    disagreement ends the check."""
    from attention_zoo.backends import triton as triton_module
    from attention_zoo.backends import triton_kernels
    from attention_zoo.ops.selection import triton_fused

    assert triton_module.self_check.__wrapped__(DEVICE, torch.float32, 16) is None
    checks = {"attention": triton_module._attention_check, "penalty": triton_module._penalty_check,
              "selective": triton_module._selective_check, "separable": triton_module._key_bias_check}

    def caught(check: str) -> str | None:
        monkeypatch.setattr(triton_module, "SELF_CHECKS", (checks[check],))
        return triton_module.self_check.__wrapped__(DEVICE, torch.float32, 16)

    real = triton_kernels.attention_backward

    def wrong(*args, **kwargs):
        dq, dk, dv, dbias = real(*args, **kwargs)
        return dq, dk, dv, dbias * 1.01

    real_shared = triton_kernels._shared_bias_dq
    strategies = []

    def recording(strategy, *args, **kwargs):
        strategies.append(strategy)
        return real_shared(strategy, *args, **kwargs)

    monkeypatch.setattr(triton_kernels, "attention_backward", wrong)
    monkeypatch.setattr(triton_kernels, "_shared_bias_dq", recording)
    reason = caught("attention")
    assert "disagree" in reason and "atomic dq) dbias" in reason
    assert strategies == ["atomic"]  # the first disagreement ended the check: recompute never ran
    monkeypatch.setattr(triton_kernels, "attention_backward", real)

    # a wrong strategy is caught even when the other is right

    def wrong_recompute(strategy, *args, **kwargs):
        dq = real_shared(strategy, *args, **kwargs)
        return dq * 1.01 if strategy == "recompute" else dq

    monkeypatch.setattr(triton_kernels, "_shared_bias_dq", wrong_recompute)
    assert "attention (recompute dq) dq off by" in caught("attention")
    monkeypatch.setattr(triton_kernels, "_shared_bias_dq", real_shared)

    from attention_zoo.ops.selection import triton as triton_selection
    monkeypatch.setattr(triton_selection, "penalty_forward",
                        lambda q, k, **kw: torch.zeros(q.shape[0], q.shape[1], k.shape[1], device=q.device))
    assert "selection F" in caught("penalty")

    real_fused = triton_fused.selective_backward

    def wrong_fused(*args, **kwargs):
        dq, dk, dv, dqs, dks, dacc = real_fused(*args, **kwargs)
        return dq, dk, dv, dqs, dks, dacc * 1.01

    monkeypatch.setattr(triton_fused, "selective_backward", wrong_fused)
    assert "selective daccumulated off by" in caught("selective")

    def wrong_key_bias(*args, **kwargs):
        dq, dk, dv, dkey = real(*args, **kwargs)
        return dq, dk, dv, None if dkey is None else dkey * 1.01

    monkeypatch.setattr(triton_kernels, "attention_backward", wrong_key_bias)
    assert "separable bias dcol off by" in caught("separable")
    monkeypatch.setattr(triton_kernels, "attention_backward", real)

    monkeypatch.setattr(triton_kernels, "attention_forward", lambda *a, **k: 1 / 0)
    assert "ZeroDivisionError" in caught("attention")


# --- the selection penalty F from the selection head's q and k ------------------------------------------

PENALTY_CASES = [  # (B, Nq, Nk, D, protect_bos)
    (2, 37, 37, 16, True),
    (2, 40, 40, 24, False),
    (1, 19, 50, 16, True),  # a cached chunk: queries at the end
]


@pytest.mark.parametrize("negate", [False, True], ids=["F", "minus-F"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", PENALTY_CASES, ids=lambda c: "B{}-Nq{}-Nk{}-D{}-bos{}".format(*c))
def test_penalty_kernels_match_the_equations(triton_backend, case, dtype, negate):
    """F = exclusive row cumsum of masked ReLU(scale q_s k_s^T) (or -F, written as such), and its q_s, k_s
    gradients, against the unfused float64 functions (functional.selection_scores, penalty_from_scores)."""
    from attention_zoo.functional import penalty_from_scores, selection_scores
    from attention_zoo.ops.selection.penalty import TritonSelectionPenalty

    B, Nq, Nk, D, bos = case
    g = torch.Generator().manual_seed(Nq * D)
    q = torch.randn(B, Nq, D, generator=g).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(B, Nk, D, generator=g).to(DEVICE, dtype).requires_grad_()
    dpen = torch.randn(B, Nq, Nk, generator=g).to(DEVICE)
    pen = TritonSelectionPenalty.apply(q, k, D ** -0.5, bos, negate)
    got = [pen, *torch.autograd.grad(pen, (q, k), dpen)]
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    ref = penalty_from_scores(selection_scores(torch.einsum("bnd,bmd->bnm", q64, k64) * D ** -0.5, protect_bos=bos))
    ref = -ref if negate else ref
    want = [ref, *torch.autograd.grad(ref, (q64, k64), dpen.double())]
    assert pen.dtype == torch.float32 and got[1].dtype == dtype
    assert_matches(got, want, dtype, names=("F", "dq", "dk"))


def test_penalty_uses_triton_where_the_backend_would(triton_backend):
    from attention_zoo.ops.selection.penalty import triton_penalty_refusal

    q = torch.randn(1, 8, 16, device=DEVICE)
    assert "named" in triton_penalty_refusal(q, q, "sdpa")  # naming another backend keeps the PyTorch path
    assert triton_penalty_refusal(q, q, "triton") is None
    if DEVICE == "cpu":
        assert "CUDA only" in triton_penalty_refusal(q, q, "auto")  # auto never runs the interpreter
        assert "CUDA only" in triton_penalty_refusal(q, q, "flex")


KERNELS = {"_forward", "_backward_dk_dv", "_backward_dq", "_backward_dq_dbias_shared", "_penalty_forward",
           "_penalty_backward", "_selective_boundary_rows", "_selective_forward", "_selective_key_pass",
           "_selective_query_pass"}


@pytest.mark.parametrize("dtype,options", [("bf16", []), ("fp32", ["--each-kernel-once", "--narrow-tiles"])],
                         ids=["bf16", "fp32"])
def test_kernels_compile_for_hopper_without_a_gpu(tmp_path, dtype, options, request):
    """Every kernel, as the backend launches it for each variant's kind of bias (and both dq strategies, and the
    fused selective kernels with one term and with two), compiles through PTX to an sm_90 cubin
    (tests/sm90_compile.py): what the interpreter never does. bf16 (the dtype of GPU training) compiles every
    distinct build in its first tuned tile, fp32 each kernel and dq strategy once in 16-wide tiles (fp32's IEEE
    dots unroll into FMAs, whose count grows with the tile: its code paths are what this checks, bf16 checks the
    tuned tiles); one dtype per test, so pytest-xdist runs the two side by side. A subprocess, as the kernels
    must be built without TRITON_INTERPRET.

    Triton's cache keeps what it compiled in pytest's cache folder between sessions (a fresh folder when the
    cache plugin is off): its key hashes the kernel's source and every jit function it calls, the constants, the
    specialisation, the options, the target and Triton's version, so an entry answers only for the very build
    that compiled before; any change to a kernel compiles it anew. A cold run compiles all of them."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cache = getattr(request.config, "cache", None)
    env["TRITON_CACHE_DIR"] = str(cache.mkdir("sm90-triton") if cache is not None else tmp_path)
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "sm90_compile.py"), "--dtype", dtype, *options],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    compiled = [tuple(line.split()[1:3]) for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert set(compiled) == {(dtype, kernel) for kernel in KERNELS}, result.stdout
    assert "WITH_DQ=True" in result.stdout and "WITH_DQ=False" in result.stdout  # both dq strategies
    if not options:  # every constexpr branch the cases reach, and the fused kernels' T = 1 and T = 2 builds
        for flags in ("HAS_BIAS=False", "CAUSAL=False", "BIAS_GRAD=True", "selective + GQA", "head dim 48"):
            assert flags in result.stdout, flags
        for kernel in ("_selective_boundary_rows", "_selective_forward", "_selective_key_pass", "_selective_query_pass"):
            assert sum(f"{dtype} {kernel} " in line for line in result.stdout.splitlines()) == 2, kernel
    else:
        assert len(compiled) == len(KERNELS) + 1  # the shared-bias kernel once per dq strategy
    assert "\n0 failed" in result.stdout


def test_key_spans_hold_whole_key_blocks():
    """The head-shared dq/d(bias) kernel splits the keys into spans, one program each: a key block
    crossing a span's end would be computed twice. Every tuned BLOCK_N must divide the span."""
    pytest.importorskip("triton")
    from attention_zoo.backends import triton_tuning as tuning

    assert all(tuning.COMPILED_KEY_SPAN % n == 0 for _, n, _, _ in tuning.SHARED_DQ_CONFIGS)
    interpreted = tuning.INTERPRETER_CONFIGS + tuning.INTERPRETER_AUTOTUNED_CONFIGS
    assert all(tuning.INTERPRETER_KEY_SPAN % n == 0 for _, n, _, _ in interpreted)



# --- selective attention fused: -F formed per tile from the selection heads (ops/selection/triton_fused.py) ---

# name -> ((B, H, Hkv, Nq, Nk, D, causal), terms as (weight, protect_bos, accumulated)). In the interpreter the
# boundary rows G sit every 16 query rows and the forward and query pass take 32-row tiles, so each case walks
# several stored rows, a tile holding two of them, and partial tiles at both ends.
FUSED_CASES = {
    "selective": ((1, 2, 2, 37, 37, 16, True), [(1.0, True, False)]),
    "selective-gqa": ((1, 4, 2, 40, 40, 24, True), [(1.0, True, False)]),
    # cross-layer accumulate: decay * the source layer's F + this layer's own (a shared Selection is one term)
    "accumulate": ((1, 2, 1, 33, 33, 16, True), [(0.5, True, False), (1.0, True, False)]),
    "accumulate-chain-no-bos": ((1, 2, 2, 35, 35, 16, True), [(0.25, True, False), (0.5, False, False), (1.0, False, False)]),
    # a cached chunk: queries at the end, each term's accumulator from earlier chunks (a gradient too)
    "cached-chunk": ((1, 2, 1, 19, 50, 16, True), [(0.5, True, True), (1.0, True, True)]),
    "no-mask": ((1, 2, 2, 30, 45, 16, False), [(1.0, False, False)]),
}
if DEVICE == "cuda":  # compiled: 64-row stored rows and 64- or 128-row tiles, so longer sequences
    FUSED_CASES["gpu-gqa-accumulate"] = ((2, 4, 2, 300, 300, 64, True), [(0.5, True, False), (1.0, True, False)])
    FUSED_CASES["gpu-cached-chunk"] = ((1, 4, 2, 200, 600, 64, True), [(1.0, True, True)])


def fused_problem(name, dtype, seed=0):
    """(q, k, v, selection, leaves, dout) on DEVICE in `dtype`; a cache's accumulators are float32, as F is."""
    from attention_zoo.ops.selection import Selection, SelectionTerm

    (B, H, Hkv, Nq, Nk, D, causal), terms = FUSED_CASES[name]
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + seed)
    make = lambda *shape, dt=dtype: torch.randn(*shape, generator=g).to(DEVICE, dt).requires_grad_()  # noqa: E731
    q, k, v = make(B, H, Nq, D), make(B, Hkv, Nk, D), make(B, Hkv, Nk, D)
    leaves, parts = [q, k, v], []
    for weight, bos, cached in terms:
        qs, ks = make(B, Nq, D), make(B, Nk, D)
        acc = (torch.rand(B, Nk, generator=g) * 4).to(DEVICE).requires_grad_() if cached else None
        leaves += [qs, ks] + ([acc] if cached else [])
        parts.append(SelectionTerm(qs, ks, D ** -0.5, bos, weight, acc))
    return q, k, v, Selection(tuple(parts)), leaves, torch.randn(B, H, Nq, D, generator=g).to(DEVICE, dtype)


def fused_both(triton_backend, name, dtype):
    """[out, every gradient] from the triton backend's fused path and from math's reference in float64."""
    from attention_zoo.ops.selection import Selection, SelectionTerm, reference

    q, k, v, selection, leaves, dout = fused_problem(name, dtype)
    causal = FUSED_CASES[name][0][6]
    scale = q.shape[-1] ** -0.5
    out = triton_backend.selective_attention(q, k, v, selection, causal=causal, scale=scale)
    got = [out, *torch.autograd.grad(out, leaves, dout)]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves[3:])
    terms = tuple(SelectionTerm(next(it), next(it), t.scale, t.protect_bos, t.weight,
                                next(it) if t.accumulated is not None else None) for t in selection.terms)
    ref = reference.selective_attention(*ref_leaves[:3], Selection(terms), causal=causal, scale=scale)
    return got, [ref, *torch.autograd.grad(ref, ref_leaves, dout.double())]


def fused_names(name):
    terms = FUSED_CASES[name][1]
    per_term = [[f"dq_s{t}", f"dk_s{t}"] + ([f"dacc{t}"] if cached else []) for t, (_, _, cached) in enumerate(terms)]
    return ("out", "dq", "dk", "dv", *sum(per_term, []))


@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_selective_matches_math_fp32(triton_backend, name):
    """Output, dq, dk, dv and every term's dq_s, dk_s (and accumulator) against `math` in float64, within
    1e-5 of max(1, largest |value|) (IEEE fp32 dots)."""
    got, want = fused_both(triton_backend, name, torch.float32)
    assert_matches(got, want, torch.float32, names=fused_names(name), label=f"{name} ")


def test_fused_passes_autotune_without_adding_twice(triton_backend, monkeypatch):
    """The key and query passes add into their outputs, and the autotuner runs a kernel once per configuration
    before the chosen one: with two configurations (one elsewhere in the interpreter) the outputs must be reset
    in between, or the gradients come back several times over."""
    import triton

    from attention_zoo.ops.selection import triton_fused

    for kernel in (triton_fused._selective_key_pass, triton_fused._selective_query_pass):
        first = kernel.configs[0]
        wider = dict(first.kwargs, BLOCK_N=2 * first.kwargs["BLOCK_N"])
        monkeypatch.setattr(kernel, "configs", [first, triton.Config(wider, num_warps=first.num_warps,
                                                                     num_stages=first.num_stages)])
        monkeypatch.setattr(kernel, "cache", {})
    got, want = fused_both(triton_backend, "cached-chunk", torch.float32)
    assert_matches(got, want, torch.float32, names=fused_names("cached-chunk"))


def test_fused_selective_matches_math_fp16(triton_backend):
    """fp16 inputs (float32 F, dots accumulated in float32): within 3e-3 of max(1, largest |value|)."""
    got, want = fused_both(triton_backend, "selective-gqa", torch.float16)
    assert got[0].dtype == torch.float16 and got[4].dtype == torch.float16
    assert_matches(got, want, torch.float16, names=fused_names("selective-gqa"))


class LargestOwnTensor(LargestTensor):
    """LargestTensor, blind to the uint8 views through which Triton's interpreter stages each kernel argument's
    storage (as bytes: 4 "elements" per float32)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in (*args, *(kwargs or {}).values())):
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


def test_fused_selective_makes_no_B_Nq_Nk_tensor(triton_backend):
    """Forward and backward allocate nothing near (B, Nq, Nk) (G and the carry rows are 1/16 of it here), while
    the dense F the other path hands the kernels is that size: the spy sees it."""
    from attention_zoo.ops.selection import Selection

    B, H, N, D = 1, 1, 64, 16
    g = torch.Generator().manual_seed(5)
    q, k, v, qs, ks = (torch.randn(B, *shape, generator=g).to(DEVICE).requires_grad_()
                       for shape in ((H, N, D), (1, N, D), (1, N, D), (N, D), (N, D)))
    selection = Selection.of_head(qs, ks, D ** -0.5)
    with LargestOwnTensor() as spy:
        out = triton_backend.selective_attention(q, k, v, selection, causal=True, scale=D ** -0.5)
        torch.autograd.grad(out.sum(), (q, k, v, qs, ks))
    assert spy.largest < B * N * N // 2, f"{spy.op} made {spy.largest} elements"
    with LargestOwnTensor() as dense_spy:
        selection.dense()
    assert dense_spy.largest >= B * N * N


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter runs programs one after another: only a GPU can reorder sums")
def test_fused_selective_gradients_repeat_bit_for_bit(triton_backend):
    """No atomics anywhere in the fused path: every sum has one writer, in a fixed order."""
    runs = [fused_both(triton_backend, "cached-chunk", torch.float32)[0] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_fused_selective_refuses_what_it_cannot_stack_and_falls_back(triton_backend):
    """Terms of different widths cannot share a stacked tile: the backend says why and runs the dense -F."""
    from attention_zoo.ops.selection import Selection, SelectionTerm
    from attention_zoo.ops.selection.triton_fused import fused_refusal

    q, k, v, selection, leaves, dout = fused_problem("selective", torch.float32)
    t = selection.terms[0]
    wider = Selection((t, SelectionTerm(torch.cat([t.q, t.q], -1), torch.cat([t.k, t.k], -1), t.scale)))
    assert "different widths [16, 32]" in fused_refusal(wider)
    assert fused_refusal(selection) is None
    out = triton_backend.selective_attention(q, k, v, wider, causal=True, scale=0.25)
    want = math_attention(q, k, v, bias=-wider.dense()[:, None], causal=True, scale=0.25)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_fused_tile_configurations_start_every_tile_on_a_stored_row():
    """The fused kernels read F at query-block boundaries stored every SELECTIVE_ROWS rows: the boundary and key
    passes must walk blocks of exactly that many rows, the forward and query pass a multiple of it."""
    pytest.importorskip("triton")
    from attention_zoo.backends import triton_tuning as tuning

    rows = [m for m, _, _, _ in tuning.SELECTIVE_ROW_CONFIGS]
    wide = [m for m, _, _, _ in tuning.SELECTIVE_FORWARD_CONFIGS + tuning.SELECTIVE_QUERY_CONFIGS]
    assert set(rows) == {64} and all(m % 64 == 0 for m in wide)
    assert {m for m, _, _, _ in tuning.INTERPRETER_ROW_CONFIGS} == {16}
    assert all(m % 16 == 0 for m, _, _, _ in tuning.INTERPRETER_WIDE_CONFIGS)
    assert tuning.SELECTIVE_ROWS == (16 if tuning.INTERPRETED else 64)


def infinite_selection_logit(dtype=torch.float32):
    """A selection head whose query row 5 has an infinite component: its logits are +inf against every key
    with a positive component there (and -inf, so S = 0, against the others)."""
    g = torch.Generator().manual_seed(11)
    qs, ks = torch.randn(1, 21, 16, generator=g), torch.randn(1, 21, 16, generator=g)
    qs[0, 5, 0] = float("inf")
    return qs.to(DEVICE, dtype), ks.to(DEVICE, dtype)


def test_penalty_kernel_with_an_infinite_selection_logit(triton_backend):
    """F stays finite on the row holding the +inf (its own S is not in its F) and is +inf below it, as the
    reference's cumulative sum gives; `cumsum(S) - S` gave inf - inf = NaN on that row."""
    from attention_zoo.ops.selection import Selection, reference
    from attention_zoo.ops.selection.penalty import TritonSelectionPenalty

    qs, ks = infinite_selection_logit()
    want = reference.penalty(Selection.of_head(qs.cpu().double(), ks.cpu().double(), 0.25))
    got = TritonSelectionPenalty.apply(qs, ks, 0.25, True)
    assert torch.isinf(want[0, 6:]).any() and torch.isfinite(want[0, :6]).all()
    torch.testing.assert_close(got.cpu().double(), want, atol=1e-5 * want[want.isfinite()].abs().max().item(), rtol=0)


def test_fused_forward_with_an_infinite_selection_logit(triton_backend):
    """An infinite F masks those keys for the rows below, like the causal mask: out is finite and matches math."""
    from attention_zoo.ops.selection import Selection, reference

    qs, ks = infinite_selection_logit()
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 21, 16, generator=g).to(DEVICE) for _ in range(3))
    selection = Selection.of_head(qs, ks, 0.25)
    got = triton_backend.selective_attention(q, k, v, selection, causal=True, scale=0.25)
    want = reference.selective_attention(q.double(), k.double(), v.double(),
                                         Selection.of_head(qs.double(), ks.double(), 0.25), causal=True, scale=0.25)
    assert torch.isfinite(got).all()
    assert_matches([got], [want], torch.float32, names=("out",))


# -- a SeparableBias read by the kernels (its column term, float32, a stride-0 row dim) --------------------------
SEPARABLE_COLS = {"per-head": lambda B, H: (B, H), "head-shared": lambda B, H: (B, 1), "batch-shared": lambda B, H: (1, H)}
SEPARABLE_ROWS = [(case, kind) for case in CASES for kind in SEPARABLE_COLS]


def separable_both(backend, case, kind, dtype, scale_col=1.0):
    """(out, dq, dk, dv, dcol) by the kernels and by a float64 reference written from the formula: softmax over the
    visible keys of scale q k^T + row_i + col_j, the row term included (softmax must ignore it)."""
    from attention_zoo import SeparableBias

    B, H, Hkv, Nq, Nk, D, causal = case
    g = torch.Generator().manual_seed(zlib.crc32(repr((case, kind, "separable")).encode()))
    q = torch.randn(B, H, Nq, D, generator=g).to(DEVICE, dtype).requires_grad_()
    k, v = (torch.randn(B, Hkv, Nk, D, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(2))
    cb, ch = SEPARABLE_COLS[kind](B, H)
    col = (scale_col * torch.randn(cb, ch, Nk, generator=g)).to(DEVICE).requires_grad_()  # float32, as FoX makes c
    row = torch.randn(cb, ch, Nq, generator=g).to(DEVICE)
    dout = torch.randn(B, H, Nq, D, generator=g).to(DEVICE, dtype)
    out = backend.separable_attention(q, k, v, SeparableBias(col=col, row=row), causal=causal, scale=D ** -0.5)
    got = [out, *torch.autograd.grad(out, (q, k, v, col), dout)]
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, col)]
    bias = row.double()[..., :, None] + ref[3][..., None, :]  # (cb, ch, Nq, Nk)
    expected = math_attention(*ref[:3], bias=bias, causal=causal, scale=D ** -0.5)
    return got, [expected, *torch.autograd.grad(expected, ref, dout.double())]


@pytest.mark.parametrize("case,kind", SEPARABLE_ROWS, ids=[f"{case_name(c)}-{k}" for c, k in SEPARABLE_ROWS])
def test_separable_bias_matches_the_formula_fp32(triton_backend, case, kind):
    """Output and the gradients of q, k, v and the column term (summed over what it broadcasts), fp32 within 1e-5
    of max(1, |value|) against float64: per-head, head-shared and batch-shared columns, GQA, MQA, cached keys."""
    got, want = separable_both(triton_backend, case, kind, torch.float32)
    assert got[4].shape == want[4].shape and got[4].dtype == torch.float32
    assert_matches(got, want, torch.float32, names=("out", "dq", "dk", "dv", "dcol"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_separable_bias_in_half_precision_keeps_large_columns(triton_backend, dtype):
    """Columns of |c| ~ 500 (Forgetting Attention's running sums) in half precision inputs: the kernels add them
    in float32, so the result is within the dtype's tolerance of the float64 formula (a folded or bf16 column
    would be off by whole units)."""
    if triton_backend.refuse(call(dtype=dtype, device=DEVICE)):
        pytest.skip(triton_backend.refuse(call(dtype=dtype, device=DEVICE)))
    got, want = separable_both(triton_backend, CASES[1], "per-head", dtype, scale_col=500.0)
    assert_matches(got, want, dtype, names=("out", "dq", "dk", "dv", "dcol"))


def test_separable_bias_makes_no_Nq_Nk_tensor(triton_backend):
    """Forward and backward allocate nothing near (B, H, Nq, Nk); the spy sees the dense bias when it is made."""
    from attention_zoo import SeparableBias

    B, H, N, D = 1, 2, 64, 16
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    col = torch.randn(B, H, N, generator=g).to(DEVICE).requires_grad_()
    with LargestOwnTensor() as spy:
        out = triton_backend.separable_attention(q, k, v, SeparableBias(col=col), causal=True, scale=D ** -0.5)
        torch.autograd.grad(out.sum(), (q, k, v, col))
    assert spy.largest < B * H * N * N // 2, f"{spy.op} made {spy.largest} elements"  # q, k, v: 1/4 of it
    with LargestOwnTensor() as dense_spy:
        SeparableBias(col=col).dense().expand(B, H, N, N).contiguous()
    assert dense_spy.largest >= B * H * N * N


def test_auto_sends_half_precision_separable_calls_to_triton():
    """On CUDA, a separable bias in bf16/fp16 would go dense on the other backends: auto takes it to triton, which
    reads it; in fp32 (folded exactly elsewhere) and without a separable bias it still defers."""
    from attention_zoo.backends import BACKENDS

    backend = BACKENDS.get("triton")
    separable = dict(call(dtype=torch.bfloat16, bias_grad=False).__dict__, separable_width=1, has_bias=True)
    assert backend.defer(AttentionCall(**separable)) is None
    assert backend.defer(AttentionCall(**{**separable, "dtype": torch.float32})) is not None
    assert backend.defer(call(dtype=torch.bfloat16, bias_grad=False)) is not None
