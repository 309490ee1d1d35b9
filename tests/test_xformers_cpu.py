"""The xformers backend, checked without a GPU.

xformers' kernels are CUDA-only, but its input checks and its reference implementation run on CPU:
- the inputs the backend builds (layout, GQA, bias) pass xformers' own `not_supported_reasons` of the
  cutlass ops, apart from the reasons that only say "not on a GPU";
- its tensor bias equals what the math backend adds to the logits (bias + causal -inf);
- with xformers' CPU reference (`ref_attention`) standing in for the kernel, the whole backend (layout
  round trip, 5-D GQA, the BiasGradAttention path, xformers' own bias gradient) matches `math` on
  outputs and gradients;
- refusals name their reason, and `auto` falls back with it.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attention_zoo.backends.xformers as xf_module
from attention_zoo.backends import BACKENDS, AttentionCall, causal_mask, choose
from attention_zoo.cli import main
from attention_zoo.functional import selection_logits, selection_penalty

ROOT = Path(__file__).resolve().parents[1]
XF, MATH = BACKENDS.get("xformers"), BACKENDS.get("math")
CPU_ONLY_REASONS = ("device=", "xFormers wasn't build", "operator wasn't built", "bf16 is only supported")


def call(device="cuda", dtype=torch.float16, head_dim=64, **kw):
    return AttentionCall(device=device, dtype=dtype, heads=8, kv_heads=8, head_dim=head_dim, q_len=16, k_len=16, **kw)


# --- refusals (no xformers import needed on CPU) -----------------------------------------------------

def test_refuses_cpu_without_importing(monkeypatch):
    monkeypatch.setattr(xf_module, "load_xformers", lambda: pytest.fail("imported xformers for a CPU call"))
    assert "CUDA only" in XF.refuse(call(device="cpu"))


def test_refuses_when_xformers_is_missing(monkeypatch):
    monkeypatch.setattr(xf_module, "load_xformers", lambda: (None, "ModuleNotFoundError: No module named 'xformers'"))
    reason = XF.refuse(call())
    assert "not installed" in reason and "No module named" in reason
    chosen, skipped = choose("auto", call())
    assert chosen.name == "sdpa" and skipped[-1] == f"xformers: {reason}"
    assert [s.split(":")[0] for s in skipped] == ["triton", "xformers"]  # auto's order, each with its reason


def test_refuses_dtype_and_head_dim(monkeypatch):
    monkeypatch.setattr(xf_module, "load_xformers", lambda: (object(), None))
    monkeypatch.setattr(xf_module, "missing_cuda_kernels", lambda: None)
    assert "float64" in XF.refuse(call(dtype=torch.float64))
    assert "head dim 12" in XF.refuse(call(dtype=torch.float16, head_dim=12))
    assert XF.refuse(call(dtype=torch.float32, head_dim=12)) is None  # fp32 needs a multiple of 4 only


def test_describe_shows_why_auto_skipped_xformers(capsys):
    assert main(["describe", str(ROOT / "configs" / "selective.yaml"), "--train"]) == 0
    assert "xformers: xformers kernels run on CUDA only" in capsys.readouterr().out


# --- inputs built for xformers, checked by xformers itself ------------------------------------------

fmha, _import_error = xf_module.load_xformers()
needs_xformers = pytest.mark.skipif(fmha is None, reason=f"xformers does not import: {_import_error}")
if fmha is not None:
    from xformers.attn_bias_utils import ref_attention
    from xformers.ops.fmha import cutlass


@needs_xformers
@pytest.mark.parametrize("built_with_cuda", [False, True])
def test_refuses_an_install_without_cuda_kernels(monkeypatch, built_with_cuda):
    """Seen on an H200: an xformers wheel built for another torch imports, then every call raised
    NotImplementedError ("xFormers wasn't build with CUDA support") and `auto` failed instead of falling back."""
    from xformers import _cpp_lib

    monkeypatch.setattr(_cpp_lib, "_built_with_cuda", built_with_cuda)
    monkeypatch.setattr(_cpp_lib, "_cpp_library_load_exception",
                        RuntimeError("xFormers was built for: PyTorch 2.10.0+cu128\n Please reinstall xformers"))
    reason = XF.refuse(call(dtype=torch.float32))
    if built_with_cuda:
        assert reason is None
        return
    assert "no CUDA kernels" in reason and "built for: PyTorch 2.10.0+cu128" in reason and "Please" not in reason
    chosen, skipped = choose("auto", call(dtype=torch.float32))
    assert chosen.name == "sdpa" and f"xformers: {reason}" in skipped


def gpu_independent(reasons):
    return [r for r in reasons if not r.startswith(CPU_ONLY_REASONS)]


CASES = [  # (B, H, Hkv, Nq, Nk, D): lengths that are no multiple of 8 test the padded bias rows
    (2, 4, 4, 21, 21, 16), (2, 4, 2, 21, 21, 16), (1, 4, 1, 21, 21, 16), (2, 4, 2, 5, 30, 16), (1, 2, 2, 1, 13, 8),
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def make(B, H, Hkv, Nq, Nk, D, dtype, bias_kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Nq, H, D, generator=g).to(dtype).transpose(1, 2).requires_grad_()  # as projected
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype).requires_grad_()
    residual = torch.randn(B, H, Nq, Nk, generator=g).requires_grad_()

    def bias():
        if bias_kind == "selective":
            F = selection_penalty(selection_logits(q.float(), k.float(), H - 1))
            return (-F).unsqueeze(1)  # compact head-shared -F
        return residual.to(dtype) if bias_kind == "per_head" else None

    return q, k, v, residual, bias


@needs_xformers
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}-Hkv{}-Nq{}-Nk{}-D{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_kind", ["none", "selective", "per_head"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_built_inputs_pass_xformers_checks(case, dtype, bias_kind, training):
    q, k, v, _, bias = make(*case, dtype, bias_kind)
    with torch.no_grad():
        b = bias()
        inputs = xf_module.build_inputs(q, k, v, b, causal=True, scale=0.3, training=training)
    inputs.validate_inputs()  # shapes, dtypes, devices, bias shape: raises on any mismatch
    assert gpu_independent(cutlass.FwOp.not_supported_reasons(inputs)) == []
    if training:  # xformers' own backward will run: the 5-D GQA layout must not be used
        assert inputs.query.ndim == 4
        assert gpu_independent(cutlass.BwOp.not_supported_reasons(inputs)) == []
    elif case[1] != case[2]:
        assert inputs.query.ndim == 5 and inputs.key.stride(3) == 0  # grouped, k/v never copied
    if isinstance(inputs.attn_bias, torch.Tensor):
        assert inputs.attn_bias.dtype == dtype
        if bias_kind == "selective":  # one (Nq, Nk) slice per batch element, read by every head
            one_slice_each = case[0] * case[3] * (case[4] + 8) * inputs.attn_bias.element_size()
            assert inputs.attn_bias.untyped_storage().nbytes() < 2 * one_slice_each


@needs_xformers
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}-Hkv{}-Nq{}-Nk{}-D{}".format(*c))
@pytest.mark.parametrize("bias_kind", ["none", "selective", "per_head"])
def test_bias_equals_what_math_adds(case, bias_kind):
    B, H, Hkv, Nq, Nk, D = case
    q, k, v, _, bias = make(*case, torch.float32, bias_kind)
    with torch.no_grad():
        b = bias()
        inputs = xf_module.build_inputs(q, k, v, b, causal=True, scale=0.3, training=True)
    hidden = torch.zeros(Nq, Nk).masked_fill(~causal_mask(Nq, Nk), float("-inf"))
    expected = (hidden if b is None else b + hidden).expand(B, H, Nq, Nk)
    ab = inputs.attn_bias
    got = ab if isinstance(ab, torch.Tensor) else ab.materialize((B, H, Nq, Nk), dtype=torch.float32)
    assert torch.equal(got, expected)


def reference_kernel(query, key, value, attn_bias, scale):
    """xformers' own CPU reference in place of the CUDA kernel (same layouts and bias types)."""
    return ref_attention(query, key, value, attn_bias, scale=scale).to(query.dtype)


@needs_xformers
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}-Hkv{}-Nq{}-Nk{}-D{}".format(*c))
@pytest.mark.parametrize("bias_kind", ["none", "selective", "per_head"])
def test_backend_matches_math_with_the_reference_kernel(monkeypatch, case, bias_kind):
    monkeypatch.setattr(xf_module, "memory_efficient_attention", reference_kernel)
    q, k, v, residual, bias = make(*case, torch.float32, bias_kind)
    tensors = [q, k, v] + ([residual] if bias_kind == "per_head" else [])
    results = []
    for backend in (XF, MATH):
        for t in tensors:
            t.grad = None
        out = backend.attention(q, k, v, bias=bias(), causal=True, scale=0.3)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        results.append([out.detach()] + [t.grad.clone() for t in tensors])
    for name, a, b in zip(["out", "dq", "dk", "dv", "dbias"], *results):
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


@needs_xformers
def test_auto_picks_xformers_for_cuda_calls_when_its_kernels_load(monkeypatch):
    if not torch.cuda.is_available():  # this CPU install has no CUDA kernels: pretend it has
        monkeypatch.setattr(xf_module, "missing_cuda_kernels", lambda: None)
    chosen, skipped = choose("auto", call(device="cuda", dtype=torch.float16, has_bias=True))
    if torch.cuda.is_available() and XF.refuse(call(device="cuda", dtype=torch.float16, has_bias=True)):
        pytest.skip("this GPU is refused by xformers")
    assert chosen.name == "xformers" and [s.split(":")[0] for s in skipped] == ["triton"]  # auto tries triton first
