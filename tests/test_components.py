"""The stack's components (positions, norms, MLPs): registries, conventions, compatibility, init.

Their math is checked inside whole stacks against naive references in tests/test_reference.py; here are
the properties a stack-level comparison would not pinpoint.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attention_zoo import build_model, load_config
from attention_zoo.checkpoint import load_model
from attention_zoo.cli import main
from attention_zoo.components import MLPS, NORMS, POSITIONS, PositionalScheme, StackShape
from attention_zoo.components.positions import RotaryPositions
from attention_zoo.config import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = {"vocab_size": 32, "dim": 32, "depth": 2, "heads": 4, "max_seq_len": 8}


def test_a_checkpoint_from_before_the_components_loads_with_the_same_logits():
    """checkpoint_v0 was written by the code before this stack (learned positions, LayerNorm, GELU): its config
    has none of the new keys, so it must load as GPT-2's stack and reproduce the logits it was saved with."""
    model = load_model(FIXTURES / "checkpoint_v0")
    expected = load_file(FIXTURES / "checkpoint_v0" / "expected.safetensors")
    assert model.config["model"]["position"] == "learned" and model.config["model"]["mlp"] == "gelu"
    with torch.no_grad():
        logits = model(expected["tokens"])
    # fp32 rounding only (the project's 1e-5): selective's F is now summed over query blocks, in another order
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5 * max(1.0, expected["logits"].abs().max().item()), rtol=0)


def test_new_configs_default_to_rope_rmsnorm_swiglu():
    model = load_config({"model": SMALL})["model"]
    assert (model["position"], model["norm"], model["mlp"], model["rope_theta"], model["norm_eps"]) == \
        ("rope", "rmsnorm", "swiglu", 10000.0, 1e-5)


def test_rope_pairs_dimension_i_with_i_plus_half():
    """Rotate-half: a vector with only dimension 1 set moves into dimension 1 + D/2 (RoFormer's interleaved form
    would move it into dimension 0). Angle at position p: p * theta^(-2i/D)."""
    D, theta, p = 8, 100.0, 3
    rope = RotaryPositions(StackShape(dim=D, heads=1, head_dim=D, max_seq_len=16), rope_theta=theta)
    x = torch.zeros(1, 1, p + 1, D, dtype=torch.float64)
    x[..., 1] = 1.0
    index = torch.arange(p + 1)[None]
    q, _ = rope.prepare(index, torch.float64).rotate(x, x)
    angle = p * theta ** (-2 * 1 / D)
    expected = torch.zeros(D, dtype=torch.float64)
    expected[1], expected[1 + D // 2] = math.cos(angle), math.sin(angle)
    torch.testing.assert_close(q[0, 0, p], expected, atol=1e-12, rtol=0)
    assert torch.equal(q[0, 0, 0], x[0, 0, 0])  # position 0: no rotation


def test_rope_keeps_dot_products_relative():
    """q_m . k_n depends on m - n only: shifting both positions by 5 leaves the logits unchanged."""
    rope = RotaryPositions(StackShape(dim=16, heads=1, head_dim=16, max_seq_len=8))
    q, k = torch.randn(2, 1, 1, 6, 16, dtype=torch.float64).unbind(0)
    logits = []
    for start in (0, 5):
        positions = rope.prepare(torch.arange(start, start + 6)[None], torch.float64)
        rq, rk = positions.rotate(q, k)
        logits.append(rq @ rk.transpose(-1, -2))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-10, rtol=0)


@pytest.mark.parametrize("width", [8, 4])
def test_rope_rotates_a_narrower_head_as_a_head_of_that_width(width):
    """A variant attending with heads of width w dividing D (differential's halves) gets RoPE for width w: dimension
    1 of a width-w head turns by p * theta^(-2/w) into dimension 1 + w/2. Another width is a ValueError."""
    D, theta, p = 8, 100.0, 3
    rope = RotaryPositions(StackShape(dim=D, heads=1, head_dim=D, max_seq_len=16), rope_theta=theta)
    positions = rope.prepare(torch.arange(p + 1)[None], torch.float64)
    x = torch.zeros(1, 1, p + 1, width, dtype=torch.float64)
    x[..., 1] = 1.0
    q, _ = positions.rotate(x, x)
    angle = p * theta ** (-2 / width)
    expected = torch.zeros(width, dtype=torch.float64)
    expected[1], expected[1 + width // 2] = math.cos(angle), math.sin(angle)
    torch.testing.assert_close(q[0, 0, p], expected, atol=1e-12, rtol=0)
    for bad in (6, 3):
        with pytest.raises(ValueError, match=f"even width dividing it; got width {bad}"):
            positions.rotate(torch.zeros(1, 1, p + 1, bad), torch.zeros(1, 1, p + 1, bad))


def test_differential_attention_maps_are_each_relative_under_rope():
    """The paper rotates each half of a differential head as a head of width D/2, so Q1 K1^T and Q2 K2^T are each a
    function of the distance: shifting every position by 100 (a cache that has seen 100 tokens) leaves both maps,
    not only their sum, unchanged."""
    from attention_zoo import create_variant
    from attention_zoo.components.positions import Positions

    torch.manual_seed(0)
    layer = create_variant("differential", dim=32, heads=2, backend="math").double()
    rope = RotaryPositions(StackShape(dim=32, heads=2, head_dim=16, max_seq_len=8))
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    maps = []
    for start in (0, 100):
        positions: Positions = rope.prepare(torch.arange(start, start + 6)[None], torch.float64)
        q, k, _ = layer.project(x)
        q, k = layer.transform_qk(q, k, positions)
        maps.append([qs @ ks.transpose(-1, -2) for qs, ks in zip(q.chunk(2, -1), k.chunk(2, -1))])
    for before, after in zip(*maps):
        torch.testing.assert_close(before, after, atol=1e-10, rtol=0)


def test_differential_gives_a_plugin_positional_scheme_whole_heads(monkeypatch):
    """Only RoPE rotates heads narrower than head_dim: a plug-in scheme gets differential's q, k as every other
    variant's, (B, H, N, D) with the stack's head_dim (it got the halves as 2H heads of width D/2, which a scheme
    with a per-dimension table cannot take)."""
    seen = []

    @POSITIONS.register("zoo_per_dim_scale")
    class PerDimScale(PositionalScheme):
        def rotate(self, q, k, positions):
            seen.append((tuple(q.shape), tuple(k.shape)))
            scale = torch.arange(1, 9, dtype=q.dtype) / 8  # one factor per head dimension, (D,) = (8,)
            return q * scale, k * scale

    try:
        model = build_model({"model": {**SMALL, "position": "zoo_per_dim_scale",
                                       "attention": {"variant": "differential", "kv_heads": 2}}})
        model(torch.zeros(1, 5, dtype=torch.long))
        assert seen == [((1, 4, 5, 8), (1, 2, 5, 8))] * SMALL["depth"]
    finally:
        POSITIONS.registry._entries.pop("zoo_per_dim_scale", None)


def test_differential_under_rope_needs_even_halves(tmp_path, capsys):
    """head_dim 6 under rope: each half (width 3) cannot be rotated as a head. A message naming differential and
    head_dim, not rope's ValueError traceback from the first forward."""
    path = tmp_path / "d6.yaml"
    path.write_text("model: {vocab_size: 32, dim: 12, depth: 2, heads: 2, max_seq_len: 8, "
                    "attention: {variant: differential}}\n")
    assert main(["describe", str(path), "--device", "cpu"]) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert "differential" in out.err and "head_dim (6) must be a multiple of 4" in out.err
    # validate reports it as a config problem at the key that chose the variant, with the file
    assert main(["validate", str(path)]) == 2
    printed = capsys.readouterr().out
    assert f"{path}: model.attention.variant = 'differential': layer 0: differential attention" in printed
    for position in ("none", "learned"):  # no rotation: head_dim 6 is fine
        model = build_model({"model": {**SMALL, "dim": 12, "heads": 2, "position": position,
                                       "attention": {"variant": "differential"}}})
        model(torch.zeros(1, 5, dtype=torch.long))


def test_cos_and_sin_are_computed_once_per_forward(monkeypatch):
    calls = []
    original = RotaryPositions.prepare
    monkeypatch.setattr(RotaryPositions, "prepare", lambda self, *a: calls.append(1) or original(self, *a))
    model = build_model({"model": {**SMALL, "depth": 3}})
    model(torch.zeros(1, 5, dtype=torch.long))
    assert len(calls) == 1


@pytest.mark.parametrize("position", ["rope", "none"])
def test_rope_and_nope_run_past_max_seq_len_and_learned_does_not(position):
    model = build_model({"model": {**SMALL, "position": position}})
    assert model(torch.zeros(1, 3 * SMALL["max_seq_len"], dtype=torch.long)).shape == (1, 24, 32)
    learned = build_model({"model": {**SMALL, "position": "learned"}})
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=8"):
        learned(torch.zeros(1, 9, dtype=torch.long))


def test_mlp_hidden_rules_and_override():
    """gelu: mlp_ratio * dim; swiglu: 2/3 of that rounded up to a multiple of 8, so parameters match."""
    m = {**SMALL, "dim": 48}
    gelu = build_model({"model": {**m, "mlp": "gelu"}}).blocks[0].mlp
    swiglu = build_model({"model": {**m, "mlp": "swiglu"}}).blocks[0].mlp
    assert gelu.up.out_features == 192 and swiglu.gate.out_features == swiglu.up.out_features == 128
    assert sum(p.numel() for p in gelu.parameters()) == sum(p.numel() for p in swiglu.parameters())
    assert build_model({"model": {**m, "mlp_hidden": 40}}).blocks[0].mlp.up.out_features == 40


def test_residual_outputs_are_initialised_by_their_marker_not_their_name(isolated_registry):
    """A variant whose output projection has another name still gets GPT-2's depth-scaled init."""
    from attention_zoo import ProjectedAttention, register_variant
    from attention_zoo.initialization import residual_output

    @register_variant("zoo_renamed_output")
    class Renamed(ProjectedAttention):
        """Output projection under another name."""

        def __init__(self, shape, **base):
            super().__init__(shape, **base)
            self.to_out = residual_output(torch.nn.Linear(shape.dim, shape.dim, bias=False))
            del self.out_proj

        def output(self, out):
            return self.to_out(out.transpose(1, 2).flatten(2))

    depth, dim = 8, 256
    torch.manual_seed(0)
    model = build_model({"model": {"dim": dim, "depth": depth, "heads": 4, "attention": {"variant": "zoo_renamed_output"}}})
    deep = 0.02 / math.sqrt(2 * depth)
    for block in model.blocks:
        assert block.attention.to_out.weight.std().item() == pytest.approx(deep, rel=0.05)
        assert block.mlp.down.weight.std().item() == pytest.approx(deep, rel=0.05)
        assert block.attention.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_a_plugin_adds_a_positional_scheme_without_editing_the_stack(monkeypatch):
    """Registered by decorator, named in YAML, listed by `attention-zoo list`, applied by every layer."""
    seen = []

    @POSITIONS.register("zoo_halved")
    class Halved(PositionalScheme):
        """Scales q by one half (a stand-in for a real scheme)."""

        def rotate(self, q, k, positions):
            seen.append(positions.index.shape)
            return q * 0.5, k

    try:
        model = build_model({"model": {**SMALL, "position": "zoo_halved"}})
        model(torch.zeros(2, 5, dtype=torch.long))
        assert seen == [(2, 5)] * SMALL["depth"]
        assert main(["list"]) == 0
    finally:
        POSITIONS.registry._entries.pop("zoo_halved", None)  # Registry has no public unregister


@pytest.mark.parametrize("key,value,valid", [
    ("position", "rotary", "valid: learned, none, rope"),
    ("norm", "rms", "valid: layernorm, rmsnorm"),
    ("mlp", "geglu", "valid: gelu, gelu_tanh, swiglu"),
])
def test_a_bad_component_name_names_file_key_value_and_choices(tmp_path, capsys, key, value, valid):
    path = tmp_path / "bad.yaml"
    path.write_text(f"model:\n  {key}: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"{path}: model.{key} = '{value}'" in message and valid in message
    assert main(["validate", str(path)]) == 2
    out = capsys.readouterr()
    assert valid in out.out + out.err and "Traceback" not in out.out + out.err


def test_component_parameters_are_validated_before_building():
    with pytest.raises(ConfigError) as info:
        load_config({"model": {**SMALL, "rope_theta": 0.5, "norm_eps": -1.0, "mlp_hidden": 0}})
    message = str(info.value)
    assert "model.rope_theta = 0.5: must be > 1" in message
    assert "model.norm_eps = -1.0: must be in (0, 1)" in message
    assert "model.mlp_hidden = 0: must be >= 1" in message


def test_rope_needs_an_even_head_dim():
    with pytest.raises(ConfigError, match=r"model.position = 'rope': rope rotates pairs of dimensions: head_dim \(5\)"):
        load_config({"model": {**SMALL, "dim": 20, "heads": 4}})


def test_every_kind_lists_its_builtins():
    assert set(POSITIONS.names()) >= {"rope", "learned", "none"}
    assert set(NORMS.names()) >= {"rmsnorm", "layernorm"}
    assert set(MLPS.names()) >= {"swiglu", "gelu", "gelu_tanh"}


def test_streaming_evaluation_runs_past_max_seq_len_under_rope():
    """Streaming (token by token through the cache, pruned or not) is not capped by the training length with
    rope: unpruned it equals the full forward's loss over 3x max_seq_len, and a budget-pruned cache stays at
    its budget."""
    from attention_zoo.data import Batch
    from attention_zoo.inference import BudgetPolicy, Pruner, streaming_loss

    torch.manual_seed(0)
    model = build_model({"model": {**SMALL, "attention": {"variant": "selective"}}}).eval()
    tokens = torch.randint(0, 32, (2, 3 * SMALL["max_seq_len"] + 1))
    batch = Batch(tokens[:, :-1], tokens[:, 1:])
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(model(batch.inputs).flatten(0, 1), batch.targets.flatten()).item()
    assert streaming_loss(model, [batch], prefill=1).loss == pytest.approx(full, abs=1e-5)
    pruned = streaming_loss(model, [batch], Pruner(model, BudgetPolicy([4, 4])), prefill=1)
    assert pruned.peak_kept == [4, 4] and math.isfinite(pruned.loss)


def test_rms_norm_gradients_match_finite_differences_and_low_precision_keeps_float32_statistics():
    """rms_norm's hand-written backward (float64 gradcheck), and bf16 inputs within bf16 rounding of the
    float64 result: the mean of squares is taken in float32, not bf16."""
    from attention_zoo.ops.rms_norm import rms_norm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, generator=gen).requires_grad_()
    weight = torch.randn(16, dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, weight))
    exact = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * weight  # Zhang & Sennrich 2019, eq. 4
    low = rms_norm(x.detach().bfloat16(), weight.detach().bfloat16(), 1e-5)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), exact.detach(), rtol=2**-7, atol=2**-7)  # bf16 has 8 mantissa bits
    # At a real width the order matters bit for bit: Llama's (normalise in float32, cast, then scale). Statistics
    # taken in bf16 change ~29% of these outputs (by up to 1.4%); the float32 ones match all but rounding flips.
    x = 3 * torch.randn(4, 16, 256, generator=gen).bfloat16()
    weight = (1 + 0.1 * torch.randn(256, generator=gen)).bfloat16()
    llama = weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert (rms_norm(x, weight, 1e-5) != llama).float().mean() < 0.01


def test_rms_norm_keeps_one_input_sized_tensor_for_the_backward():
    from attention_zoo.ops.rms_norm import rms_norm

    x = torch.randn(4, 8, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        rms_norm(x * 1.0, torch.ones(32, requires_grad=True), 1e-5)
    assert saved.count(x.numel()) == 1, saved


def test_swiglu_gradients_match_finite_differences_and_it_keeps_two_hidden_sized_tensors():
    from attention_zoo.components.mlps import swiglu

    gen = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(3, 5, 12, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(swiglu, (gate, up))
    torch.testing.assert_close(swiglu(gate, up), gate * torch.sigmoid(gate) * up, rtol=0, atol=1e-15)  # Shazeer 2020
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        swiglu(gate * 1.0, up * 1.0)
    assert saved == [gate.numel()] * 2


@pytest.mark.parametrize("bad,row,col", [(SMALL["vocab_size"], 1, 2), (-1, 0, 4)])
def test_a_token_id_outside_the_vocabulary_is_named(bad, row, col):
    """torch's embedding said only `IndexError: index out of range in self`: which id, which position, what is valid."""
    model = build_model({"model": SMALL})
    tokens = torch.zeros(2, 5, dtype=torch.long)
    tokens[row, col] = bad
    tokens[1, 3] = bad  # a later one: the first is named, with how many there are
    message = (f"token id {bad} at position ({row}, {col}) of tokens (2, 5) is outside the vocabulary: "
               f"ids are 0..{SMALL['vocab_size'] - 1} (model.vocab_size = {SMALL['vocab_size']}); 2 ids are outside")
    with pytest.raises(ValueError) as info:
        model(tokens)
    assert str(info.value) == message
