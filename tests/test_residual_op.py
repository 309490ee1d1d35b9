"""Residual attention (RealFormer, He et al. 2021) on q and k concatenated over layers (ops/residual.py).

R_l = sum over m <= l of scale q_m k_m^T (- F_m with selective) is attention with a q/k head dim of (l + 1) D:
no (B, H, N, N) tensor within the backend's head-dim limit, and exactly the dense carry's results (fp32
1e-5 relative, logits and every gradient); past the limit a layer carries R dense and says why.
"""
from __future__ import annotations

import logging

import pytest
import torch

from attention_zoo import backends, build_model
from attention_zoo.backends.sdpa import SDPABackend
from attention_zoo.ops.residual import ResidualScores
from tests.cpu_kernel import needs_cpu_kernel, require_kernel
from tests.spies import LargestTensor

B, N, HEADS = 2, 1024, 2


def model_for(attention, n=N, depth=3, backend="sdpa"):
    torch.manual_seed(0)
    return build_model({"backend": backend, "model": {"vocab_size": 32, "dim": 32, "depth": depth, "heads": HEADS,
                                                       "max_seq_len": n, "attention": attention}})


@pytest.mark.parametrize("attention", [{"variant": "residual"}, {"variant": "residual", "kv_heads": 1},
                                       {"variant": "selective", "residual": True}],
                         ids=["residual", "residual-mqa", "selective-residual"])
def test_training_step_makes_no_B_H_N_N_storage(attention):
    model = model_for(attention)
    tokens = torch.randint(0, 32, (B, N), generator=torch.Generator().manual_seed(1))
    spy = LargestTensor()
    with spy:
        logits, per_layer = model(tokens, return_state=True)
        logits.logsumexp(-1).mean().backward()
    assert all(isinstance(u["residual_scores"], ResidualScores) for u in per_layer)
    limit = B * N * N // 4 if attention["variant"] == "selective" else B * HEADS * N * N // 4
    assert spy.largest < limit, f"an op wrote {spy.largest} elements"


def grads_of(model, tokens):
    logits = model(tokens)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(4))
    (logits * weights).sum().backward()
    return [logits.detach()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("attention", [{"variant": "residual", "kv_heads": 1}, {"variant": "selective", "residual": True},
                                       {"variant": "cross_layer_selective", "sources": [0], "residual": True}],
                         ids=["residual-mqa", "selective-residual", "share-residual"])
def test_past_the_head_dim_limit_the_layer_falls_back_exactly_and_says_why(attention, monkeypatch, caplog):
    tokens = torch.randint(0, 32, (2, 40), generator=torch.Generator().manual_seed(2))
    structured = grads_of(model_for(attention, n=40), tokens)
    monkeypatch.setattr(SDPABackend, "head_dim_limit", lambda self, device: 16)  # one layer's q/k: 16
    monkeypatch.setattr("attention_zoo.ops.residual._logged", set())
    with caplog.at_level(logging.INFO, logger="attention_zoo.ops.residual"):
        model = model_for(attention, n=40)
        _, per_layer = model(tokens, return_state=True)
        dense = grads_of(model, tokens)
    assert isinstance(per_layer[0]["residual_scores"], ResidualScores)  # layer 0: 16 fits
    assert all(isinstance(u["residual_scores"], torch.Tensor) for u in per_layer[1:])
    assert "concatenated head dim 32 is above the backend's limit 16" in caplog.text
    for a, b in zip(structured, dense):
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=0)


@needs_cpu_kernel
@pytest.mark.parametrize("attention", [{"variant": "residual"}, {"variant": "residual", "kv_heads": 1},
                                       {"variant": "selective", "residual": True}],
                         ids=["residual", "residual-mqa", "selective-residual"])
def test_on_cpu_values_go_unpadded_and_results_match_the_padded_path(attention, monkeypatch):
    """Where the fused CPU kernel builds, layer l attends with q/k of (l + 1) D and its own v of D (recorded
    calls), with the padded path's logits and gradients (fp32, 1e-5 relative to the largest value)."""
    require_kernel()
    tokens = torch.randint(0, 32, (2, 40), generator=torch.Generator().manual_seed(2))
    with backends.recording_calls() as calls:
        unpadded = grads_of(model_for(attention, n=40), tokens)
    head_dim = 32 // HEADS
    assert [c.value_dim for c in calls] == [None, head_dim, head_dim]  # layer 0: q/k as wide as v
    assert [c.head_dim for c in calls] == [head_dim, 2 * head_dim, 3 * head_dim]
    monkeypatch.setattr(SDPABackend, "fuses_unequal_value_dim", lambda self, device: False)
    with backends.recording_calls() as calls:
        padded = grads_of(model_for(attention, n=40), tokens)
    assert all(c.value_dim is None for c in calls)
    for a, b in zip(unpadded, padded):
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=0)


def test_layers_of_different_scales_carry_the_exact_sum_of_their_scores():
    """R_2 = s_1 q_1 k_1^T + s_2 q_2 k_2^T when the layers' softmax scales differ (a plug-in or an imported model
    may set its own): the concatenation carries one scale, so the earlier q is rescaled by s_1 / s_2. Every
    built-in layer of a model shares one scale, so this ratio was never exercised (mutation audit)."""
    from attention_zoo.backends.math import math_attention
    from attention_zoo.ops import residual

    gen = torch.Generator().manual_seed(0)
    q1, q2 = (torch.randn(2, 4, 9, 8, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2))
    k1, k2 = (torch.randn(2, 2, 9, 8, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 2, 9, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    first, _ = residual.carry(None, q1, k1, None, 0.3, None)
    second, dense = residual.carry(first, q2, k2, None, 0.7, None)
    assert isinstance(second, ResidualScores) and dense is None
    repeat = lambda k: k.repeat_interleave(2, dim=1)  # noqa: E731  (GQA: 4 query heads over 2 kv heads)
    expected = 0.3 * q1 @ repeat(k1).transpose(-1, -2) + 0.7 * q2 @ repeat(k2).transpose(-1, -2)
    torch.testing.assert_close(second.dense(), expected, rtol=0, atol=1e-12)
    out = residual.attend(second, v, lambda q, k, v_, bias: math_attention(q, k, v_, bias=bias, causal=True,
                                                                         scale=second.scale))
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    reference = torch.softmax(expected.masked_fill(~causal, float("-inf")), dim=-1) @ repeat(v)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)
    inputs = (q1, q2, k1, k2, v)
    weights = torch.randn(reference.shape, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad((out * weights).sum(), inputs)
    want = torch.autograd.grad((reference * weights).sum(), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


def test_nested_collectors_each_keep_receiving_until_their_own_block_ends():
    """recording.collecting removes its own list when its block ends, not the first list equal to it: an inner
    block that ended while both lists were equal (both empty) took the outer one's place, so the outer block
    missed every later report and its own exit raised ValueError (or removed the wrong list)."""
    from attention_zoo.recording import collecting

    listeners: list[list[str]] = []
    with collecting(listeners) as outer:
        with collecting(listeners) as inner:
            pass
        for items in listeners:  # what a reporter does: append to every live collector
            items.append("after the inner block")
        assert outer == ["after the inner block"] and inner == []
    assert listeners == []
