"""The contract every registered variant keeps, tested by looping over the registry.

A newly registered variant is covered without new test code: it runs with its declared defaults. A
variant with a required parameter must be given one in CASES (the test fails and says so otherwise);
CASES also lists the combinations worth covering (selective + GQA, selective + residual, ...).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import attention_zoo.config as config_module
from attention_zoo import build_model, load_config
from attention_zoo.backends import BackendRefused, recording_calls
from attention_zoo.config import build_attentions
from attention_zoo.state import CHANNELS, fresh_view, merge
from tests.cases import STACKS, case_id, randomized, variant_cases, variant_config
from tests.conftest import ROOT

DEPTH, DIM, HEADS, VOCAB, N, B = 3, 32, 4, 32, 10, 2
CONTRACT = variant_cases()
IDS = [case_id(name, params) for name, params in CONTRACT]
# The checks that depend on the stack run on every stack; the rest on the default one.
WITH_STACKS = [(name, params, stack) for name, params in CONTRACT for stack in STACKS]
STACK_IDS = [f"{case_id(name, params)}-{stack}" for name, params, stack in WITH_STACKS]


def case_config(name: str, params: dict, backend: str = "math", stack: str = "rope", **model) -> dict:
    sizes = {"vocab_size": VOCAB, "dim": DIM, "depth": DEPTH, "heads": HEADS, "max_seq_len": 16, **model}
    return variant_config(name, params, backend, stack, **sizes)


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, N), generator=torch.Generator().manual_seed(seed))


def state_below(per_layer: list[dict], layer: int) -> dict:
    """What the stack hands layer `layer`: the latest write of every channel below it."""
    state: dict = {}
    for updates in per_layer[:layer]:
        state.update(updates)
    return state


@pytest.mark.parametrize("name,params", CONTRACT, ids=IDS)
def test_shapes_and_declared_state(name, params):
    model = build_model(case_config(name, params))
    logits, per_layer = model(tokens(), return_state=True)
    assert logits.shape == (B, N, VOCAB)
    assert torch.isfinite(logits).all()
    for layer, (block, updates) in enumerate(zip(model.blocks, per_layer)):
        attention = block.attention
        sizes = {"B": B, "H": HEADS, "Hkv": attention.kv_heads, "Nq": N, "Nk": N, "D": attention.head_dim}
        for channel, value in updates.items():  # the layer checked its writes too; these are the test's own sizes
            CHANNELS[channel].check(value, sizes, torch.float32, f"layer {layer}")  # declared layout and dtype
        # called directly, not through the stack, whose merge would raise on an undeclared write first
        y, direct = block.attention(torch.randn(B, N, DIM), fresh_view(state_below(per_layer, layer)))
        assert y.shape == (B, N, DIM)
        assert set(direct) <= set(block.attention.writes), f"layer {layer} wrote undeclared state {sorted(direct)}"


@pytest.mark.parametrize("name,params,stack", WITH_STACKS, ids=STACK_IDS)
def test_causal(name, params, stack):
    """Changing token t never changes the logits before t (and does change those at t)."""
    model = randomized(build_model(case_config(name, params, backend="auto", stack=stack)))
    x = tokens()
    with torch.no_grad():
        base = model(x)
        for t in range(1, N):
            changed = x.clone()
            changed[:, t] = (changed[:, t] + 1) % VOCAB
            out = model(changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0, msg=f"changing token {t} leaked backwards")
            assert (out[:, t] - base[:, t]).abs().max() > 1e-3


@pytest.mark.parametrize("name,params,stack", WITH_STACKS, ids=STACK_IDS)
def test_gradients_reach_every_parameter(name, params, stack):
    model = build_model(case_config(name, params, backend="auto", stack=stack))  # the real init
    logits = model(tokens())
    (logits * torch.randn_like(logits)).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {pname}"


# Triton rows run in Triton's interpreter (4-10 s each on CPU), so a case whose backend calls take the path of
# another triton row's is not run on triton again: qk_norm acts on q and k before the backend (transform_qk);
# selection_head picks the selection q and k before the backend too, and protect_bos reaches the fused kernels as
# a per-term int32 tensor, data and not a constexpr (tests/test_triton.py runs them with protect_bos off); a
# kv_heads=1 row differs from its kv_heads=2 row, and residual's kv_heads=2 row from its default row, only by
# GQA's GROUP, a run-time integer the kernels read as `h // GROUP` and loop over (the same code; the gqa, selective
# and cross-layer kv_heads=2 triton rows keep GROUP > 1 at model level, residual's structured carry included, and
# tests/test_triton.py runs every kernel with Hkv = 1 and 2). Those cases keep their sdpa rows on every stack and
# their flex and float64 gradcheck rows; a new variant or case gets a triton row.
TRITON_SAME_CALLS_AS = {  # case -> the triton row whose backend calls take the same path
    "vanilla-qk_norm=True": "vanilla-defaults",
    "gqa-kv_heads=1": "gqa-kv_heads=2",
    "selective-kv_heads=1": "selective-kv_heads=2",
    "selective-qk_norm=True-kv_heads=2": "selective-kv_heads=2",
    "selective-selection_head=3-protect_bos=False": "selective-defaults",
    "residual-kv_heads=2": "residual-defaults",
}
FUSED = [(name, params, stack, "sdpa") for name, params, stack in WITH_STACKS] + [
    (name, params, "rope", "triton") for name, params in CONTRACT
    if case_id(name, params) not in TRITON_SAME_CALLS_AS]


@pytest.mark.parametrize("name,params,stack,fast", FUSED, ids=[f"{case_id(n, p)}-{s}-{f}" for n, p, s, f in FUSED])
def test_fused_backends_agree_with_math(name, params, stack, fast, request):
    """fp32 outputs and every parameter's gradient agree to 1e-5 (absolute, relative to the largest value).
    triton runs in Triton's interpreter without a GPU (the `triton_backend` fixture), once per path through
    the backend (TRITON_SAME_CALLS_AS)."""
    if fast == "triton":
        if torch.cuda.is_available():
            pytest.skip("these models are on CPU; on CUDA tests/gpu/test_fused_gpu.py runs every variant on triton")
        request.getfixturevalue("triton_backend")
    models = {b: build_model(case_config(name, params, backend=b, stack=stack)) for b in ("math", fast)}
    randomized(models["math"], std=0.1)  # larger weights amplify fp32 rounding past 1e-5 in deep gradients
    models[fast].load_state_dict(models["math"].state_dict())
    x = tokens()
    weights = torch.randn(B, N, VOCAB, generator=torch.Generator().manual_seed(2))
    logits, grads = {}, {}
    for b, model in models.items():
        try:
            with recording_calls() as calls:
                logits[b] = model(x)
        except BackendRefused as refused:  # a capability limit the backend states (e.g. v wider than q/k)
            pytest.skip(str(refused))
        if not calls:  # it would pass comparing math with itself
            pytest.skip(f"{name} computes attention in its own attend(): no backend call to compare")
        (logits[b] * weights).sum().backward()
        grads[b] = {n: p.grad for n, p in model.named_parameters()}
    scale = logits["math"].abs().max().item()
    torch.testing.assert_close(logits[fast], logits["math"], atol=1e-5 * max(1.0, scale), rtol=0)
    for pname, g in grads["math"].items():
        gscale = g.abs().max().item()
        torch.testing.assert_close(grads[fast][pname], g, atol=1e-5 * max(1.0, gscale), rtol=0,
                                   msg=lambda m, pname=pname: f"{pname}: {m}")


def test_triton_rows_left_out_have_the_row_they_name():
    """Each case left without a triton row names a case that has one."""
    triton_rows = {case_id(name, params) for name, params, _, fast in FUSED if fast == "triton"}
    assert set(TRITON_SAME_CALLS_AS.values()) <= triton_rows
    assert set(TRITON_SAME_CALLS_AS) <= set(IDS)


@pytest.mark.parametrize("name,params", CONTRACT, ids=IDS)
def test_flex_forward_agrees_with_math(name, params):
    """backend: flex, forward only: torch has no FlexAttention backward on CPU (on CUDA,
    tests/gpu/test_fused_gpu.py runs every variant on flex, gradients included). Head dim 16, its minimum."""
    if torch.cuda.is_available():
        pytest.skip("these models are on CPU; on CUDA tests/gpu/test_fused_gpu.py runs every variant on flex")
    models = {b: build_model(case_config(name, params, backend=b, dim=64)) for b in ("math", "flex")}
    randomized(models["math"], std=0.1)
    models["flex"].load_state_dict(models["math"].state_dict())
    try:
        with torch.no_grad(), recording_calls() as calls:
            logits = {b: model(tokens()) for b, model in models.items()}
    except BackendRefused as refused:  # a capability limit the backend states (e.g. v wider than q/k)
        pytest.skip(str(refused))
    if not calls:  # it would pass comparing math with itself
        pytest.skip(f"{name} computes attention in its own attend(): no backend call to compare")
    scale = logits["math"].abs().max().item()
    torch.testing.assert_close(logits["flex"], logits["math"], atol=1e-5 * max(1.0, scale), rtol=0)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("name,params", CONTRACT, ids=IDS)
def test_float64_gradcheck_through_the_layers(name, params, backend):
    """torch.autograd.gradcheck through a stack of the variant's layers, state passing included."""
    config = load_config(case_config(name, params, backend=backend, dim=16))
    torch.manual_seed(0)
    layers = [layer.double() for layer in build_attentions(config["model"], backend)]

    def stack(x):
        state: dict = {}
        for i, layer in enumerate(layers):
            y, updates = layer(x, fresh_view(state))
            state = merge(state, updates, layer.writes, f"layer {i}")
            x = x + y
        return x

    x = torch.randn(1, 5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(stack, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,params", CONTRACT, ids=IDS)
def test_validation_builds_on_meta(name, params, monkeypatch):
    """load_config checks the state flow with layers built on the meta device: no weight is allocated."""
    devices = []

    def spy(model, backend="auto"):
        attentions = build_attentions(model, backend)
        devices.extend(p.device.type for a in attentions for p in a.parameters())
        return attentions

    monkeypatch.setattr(config_module, "build_attentions", spy)
    load_config(case_config(name, params))
    assert devices and set(devices) == {"meta"}


def test_missing_required_parameter_fails_loudly(isolated_registry):
    """A new variant with a required parameter and no CASES entry fails the contract with instructions."""
    from attention_zoo import Param, ProjectedAttention, register_variant

    @register_variant("zoo_needs_width")
    class NeedsWidth(ProjectedAttention):
        """Needs a parameter."""

        params = {"width": Param(int, required=True)}

        def __init__(self, shape, *, width, **base):
            super().__init__(shape, **base)

    with pytest.raises(pytest.fail.Exception, match=r"list parameter sets that give them in its class's `examples`"):
        case_config("zoo_needs_width", {})


REQUIRED_PLUGIN = '''
from attention_zoo import Param, ProjectedAttention, register_variant


@register_variant("zoo_req_temp")
class ReqTemp(ProjectedAttention):
    """Plain attention at a temperature that must be given."""

    params = {**ProjectedAttention.params, "temp": Param(float, required=True, doc="softmax temperature")}
    examples = [{"temp": 2.0}, {"temp": 0.5, "kv_heads": 2}]

    def __init__(self, shape, *, temp, **base):
        super().__init__(shape, **base)
        self.scale = self.scale / temp
'''


def test_a_variants_examples_are_its_contract_cases_and_cover_its_required_parameters(isolated_registry, tmp_path,
                                                                                      monkeypatch):
    """A plug-in lists parameter sets in its class's `examples`: the contract tests build it with them (and with
    its defaults unless a parameter is required), with no entry in tests/cases.py."""
    from attention_zoo import ProjectedAttention, register_variant

    (tmp_path / "zoo_req_plugin.py").write_text(REQUIRED_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    import zoo_req_plugin  # noqa: F401

    @register_variant("zoo_with_examples")
    class WithExamples(ProjectedAttention):
        """Defaults and one example."""

        examples = [{"qk_norm": True}, {}]

    cases = variant_cases()
    assert [p for n, p in cases if n == "zoo_req_temp"] == [{"temp": 2.0}, {"temp": 0.5, "kv_heads": 2}]
    assert [p for n, p in cases if n == "zoo_with_examples"] == [{}, {"qk_norm": True}]  # defaults once
    for params in ({"temp": 2.0}, {"temp": 0.5, "kv_heads": 2}):
        build_model(case_config("zoo_req_temp", params))


def test_the_contract_tests_run_a_plugin_with_a_required_parameter_from_its_examples(tmp_path):
    """As a plug-in author runs them: ATTENTION_ZOO_TEST_PLUGINS=module, tests/cases.py untouched."""
    (tmp_path / "zoo_req_plugin.py").write_text(REQUIRED_PLUGIN)
    env = {**os.environ, "ATTENTION_ZOO_TEST_PLUGINS": "zoo_req_plugin",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n0", "-p", "no:cacheprovider",
                             "tests/test_contract.py", "-k", "zoo_req_temp and (causal or shape)"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    tail = (result.stdout + result.stderr)[-3000:]
    assert result.returncode == 0 and re.search(r"\b\d+ passed", result.stdout), tail
    assert "temp=2.0" in subprocess.run([sys.executable, "-m", "pytest", "-q", "-n0", "-p", "no:cacheprovider",
                                         "--collect-only", "tests/test_contract.py", "-k", "zoo_req_temp"], cwd=ROOT,
                                        env=env, capture_output=True, text=True, timeout=600).stdout
