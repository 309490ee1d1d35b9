"""The flex backend (PyTorch FlexAttention) on CPU: its forward, eager and unfused here, against the math
backend for every bias layout, GQA and causal offset; how it reads a shared bias; its refusals; and that
`auto` never picks it. Its backward exists on CUDA only: tests/gpu/test_fused_gpu.py checks it (every
variant, fp32/fp16/bf16, all gradients) and its self-check guards it at run time.
Tolerance: fp32, 1e-5 relative to the largest |value|.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from attention_zoo.backends import AUTO_ORDER, BACKENDS, AttentionCall, choose
from attention_zoo.backends import flex as flex_module
from attention_zoo.backends.math import math_attention

FLEX = BACKENDS.get("flex")
pytestmark = pytest.mark.skipif(flex_module.flex_api() is None, reason="this torch has no FlexAttention")

CASES = [  # (B, H, Hkv, Nq, Nk, D)
    (2, 4, 4, 37, 37, 16),
    (2, 4, 2, 37, 37, 16),  # GQA
    (1, 4, 1, 40, 40, 32),  # MQA
    (2, 4, 2, 19, 50, 16),  # a cached chunk: queries at the end
]


def bias_of(kind: str, B: int, H: int, Nq: int, Nk: int, gen: torch.Generator):
    if kind == "none":
        return None
    if kind == "head_shared":  # selective's -F: (B, 1, Nq, Nk) expanded over heads, a stride-0 view
        return torch.randn(B, 1, Nq, Nk, generator=gen).expand(B, H, Nq, Nk)
    if kind == "head_shared_no_source":  # stride 0 over heads, built without an expand to find
        base = torch.randn(B, 1, Nq, Nk, generator=gen)
        return base.as_strided((B, H, Nq, Nk), (Nq * Nk, 0, Nk, 1))
    if kind == "per_head":  # residual scores
        return torch.randn(B, H, Nq, Nk, generator=gen)
    if kind == "batch_shared":
        return torch.randn(1, H, Nq, Nk, generator=gen)
    raise ValueError(kind)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kind", ["none", "head_shared", "head_shared_no_source", "per_head",
                                  "batch_shared"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}-Hkv{}-Nq{}-Nk{}-D{}".format(*c))
def test_forward_matches_math(case, kind, causal):
    B, H, Hkv, Nq, Nk, D = case
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Nq, D, generator=gen)
    k, v = (torch.randn(B, Hkv, Nk, D, generator=gen) for _ in range(2))
    bias = bias_of(kind, B, H, Nq, Nk, gen)
    with torch.no_grad():
        got = FLEX.attention(q, k, v, bias=bias, causal=causal, scale=D ** -0.5)
        want = math_attention(q, k, v, bias=bias, causal=causal, scale=D ** -0.5)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5 * max(1.0, want.abs().max().item()), rtol=0)


def test_a_shared_bias_is_read_from_its_source_once_per_head():
    """The score_mod indexes the (B, 1, Nq, Nk) tensor the head broadcast was expanded from (so its
    gradient is summed over heads, never made per head); broadcast batch and head dims become size 1."""
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16)
    source = torch.randn(2, 1, 9, 9)
    read = flex_module.read_once(source.expand(2, 4, 9, 9), q, k)
    assert read.shape == (2, 1, 9, 9) and read.data_ptr() == source.data_ptr()
    strided = source.as_strided((2, 4, 9, 9), (81, 0, 9, 1))
    assert flex_module.read_once(strided, q, k).shape == (2, 1, 9, 9)
    assert flex_module.read_once(torch.randn(1, 4, 9, 9).expand(2, 4, 9, 9), q, k).shape == (1, 4, 9, 9)
    per_head = torch.randn(2, 4, 9, 9)
    assert flex_module.read_once(per_head, q, k) is per_head


def call(**overrides) -> AttentionCall:
    fields = dict(device="cpu", dtype=torch.float32, heads=4, kv_heads=2, head_dim=16, q_len=32, k_len=32,
                  has_bias=True, bias_requires_grad=False, grad_enabled=False)
    return AttentionCall(**{**fields, **overrides})


def test_refusals_name_the_reason(monkeypatch):
    assert FLEX.refuse(call()) is None  # forward on CPU: eager
    assert "no FlexAttention backward on CPU" in FLEX.refuse(call(grad_enabled=True, bias_requires_grad=True))
    assert "head dim 8 is below 16" in FLEX.refuse(call(head_dim=8))
    assert "float64" in FLEX.refuse(call(dtype=torch.float64))
    assert "runs on CUDA" in FLEX.refuse(call(device="mps"))
    monkeypatch.setattr(flex_module, "flex_api", lambda: None)
    assert "has no FlexAttention (torch 2.5 or later)" in FLEX.refuse(call())


def test_auto_never_picks_it_but_it_can_be_named():
    assert "flex" not in AUTO_ORDER
    training = call(device="cuda", grad_enabled=True, bias_requires_grad=True)
    backend, _ = choose("auto", call())
    assert backend.name != "flex"
    assert "until a GPU benchmark" in FLEX.defer(training)
    assert choose("flex", call())[0] is FLEX


def test_self_check_catches_wrong_kernels(monkeypatch):
    """The check the backend runs on a GPU before first use, here against a forward-only stand-in that
    is wrong: it must name what disagrees. (Its real run needs a backward, which CPU lacks.)"""
    def wrong(q, k, v, *, bias, causal, scale):
        return math_attention(q, k, v, bias=bias * 1.01, causal=causal, scale=scale)

    monkeypatch.setattr(flex_module, "flex_attention_call", wrong)
    reason = flex_module.self_check.__wrapped__("cpu", torch.float32, 16)
    assert "FlexAttention kernels disagree" in reason and "flex attention" in reason
    monkeypatch.setattr(flex_module, "flex_attention_call", lambda *a, **k: 1 / 0)
    assert "ZeroDivisionError" in flex_module.self_check.__wrapped__("cpu", torch.float32, 16)


def test_a_model_names_it_in_its_config():
    from attention_zoo import build_model

    model = build_model({"backend": "flex", "model": {"vocab_size": 32, "dim": 64, "depth": 2, "heads": 4,
                                                      "max_seq_len": 16, "attention": {"variant": "selective"}}})
    with torch.no_grad():
        assert model(torch.randint(0, 32, (2, 12))).shape == (2, 12, 32)


@pytest.mark.skipif(not any(shutil.which(cxx) for cxx in ("g++", "clang++", "c++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_the_compiled_call_traces_once_and_matches_math():
    """The function CUDA runs, compiled whole by torch.compile, here through inductor's CPU code
    (forward only): it agrees with math, and a second call with another bias of the same shape reuses
    the compiled graph (the bias is a graph input, not a closure dynamo would guard and recompile on)."""
    import torch._dynamo

    B, H, Hkv, N, D = 1, 4, 2, 128, 16
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, N, D, generator=gen)
    k, v = (torch.randn(B, Hkv, N, D, generator=gen) for _ in range(2))
    block_mask = flex_module.causal_block_mask(N, N, "cpu")
    compiled = flex_module._compiled()
    with torch.no_grad():
        for call in range(2):
            source = torch.randn(B, 1, N, N, generator=gen)
            bias = flex_module.read_once(source.expand(B, H, N, N), q, k)
            # the second call must reuse the first one's graph (config.patch restores the setting; monkeypatch's
            # undo deleted it from dynamo's config module, breaking every later compile in the process)
            with torch._dynamo.config.patch(error_on_recompile=call > 0):
                got = compiled(q, k, v, bias, block_mask, D ** -0.5, True, False, False)
            want = math_attention(q, k, v, bias=source.expand(B, H, N, N), causal=True, scale=D ** -0.5)
            torch.testing.assert_close(got, want, atol=1e-5 * max(1.0, want.abs().max().item()), rtol=0)
