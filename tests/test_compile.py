"""torch.compile through the fused CPU kernel (ops/selection/cpu_fused.py): the kernel's forward and backward are
custom operators (`attention_zoo::cpu_forward`, `attention_zoo::cpu_backward`), so dynamo traces a model that
runs it in one graph, with no graph break at the kernel, and the compiled step computes what eager does.

Each model case runs the kernel: selective (and with GQA) through `selective_attention`, residual (RealFormer)
and differential attention through its plain `attention` (v of another width than q and k), cross-layer
selective in both modes. Accumulate is 9 layers deep, each a source: layer l attends with l + 1 selection
terms, and with a break at every kernel call the resumed frames (guarded on the number of terms) outran
dynamo's default recompile limit of 8 and fell back to eager.

Compiled with `aot_eager` (dynamo's graph, AOTAutograd's backward: what a graph break or a wrong fake
implementation breaks), once with inductor (which allocates from the fake implementation's strides). Models
run in eval mode (no dropout: compiled and eager RNG streams differ); fp32, |diff| <= 1e-5 * max(1, largest
|value|), outputs and every parameter gradient. Each test starts from `torch.compiler.reset()`: dynamo's
per-function cache (8 entries by default) would otherwise fill with earlier tests' models and run later
ones eagerly."""
from __future__ import annotations

import pytest
import torch

from attention_zoo import backends, build_model
from attention_zoo.ops.selection import cpu_fused
from tests.cpu_kernel import needs_cpu_kernel, require_kernel

pytestmark = needs_cpu_kernel

ATTENTIONS = {
    "selective": ({"variant": "selective"}, 2),
    "selective-gqa": ({"variant": "selective", "kv_heads": 2}, 2),
    "residual": ({"variant": "residual"}, 2),
    "differential": ({"variant": "differential"}, 2),
    "share": ({"variant": "cross_layer_selective", "mode": "share", "sources": [0, 2]}, 3),
    "accumulate": ({"variant": "cross_layer_selective", "mode": "accumulate", "sources": list(range(9)),
                    "decay": 0.5}, 9),
}
VOCAB, N = 32, 48


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    """An empty dynamo cache, and the backend-choice memo empty as in a training process (see
    test_execution.py's history: dynamo traced the memo lookup, at a cost growing with the memo)."""
    require_kernel()
    monkeypatch.setattr(backends, "_chosen", {})
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def model_for(attention: dict, depth: int, max_seq_len: int = N):
    torch.manual_seed(0)
    model = build_model({"backend": "sdpa", "model": {"vocab_size": VOCAB, "dim": 32, "depth": depth, "heads": 4,
                                                      "max_seq_len": max_seq_len, "attention": attention}})
    return model.eval()


def tokens(n: int = N):
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(3))


def step(model, x):
    """Logits and every parameter gradient of one step (a loss reading every logit)."""
    out = model(x)
    out.logsumexp(-1).mean().backward()
    return out, out.grad_fn


def assert_same_step(compiled_model, eager_model, out_compiled, out_eager):
    torch.testing.assert_close(out_compiled, out_eager, atol=1e-5 * max(1.0, out_eager.abs().max().item()), rtol=0)
    for (name, a), b in zip(compiled_model.named_parameters(), eager_model.parameters()):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5 * max(1.0, b.grad.abs().max().item()), rtol=0, msg=name)


@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_compiled_model_has_no_graph_break_and_matches_eager(name):
    eager, compiled = model_for(*ATTENTIONS[name]), model_for(*ATTENTIONS[name])
    x = tokens()
    out_eager, _ = step(eager, x)  # first, as train's warm-up: registries loaded, the kernel built
    explanation = torch._dynamo.explain(compiled)(x)
    reasons = [r.reason.splitlines()[0] for r in explanation.break_reasons]
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), reasons
    torch.compiler.reset()
    out_compiled, grad_fn = step(torch.compile(compiled, backend="aot_eager", fullgraph=True), x)
    assert "CompiledFunction" in type(grad_fn).__name__, type(grad_fn).__name__  # the compiled graph's output
    assert_same_step(compiled, eager, out_compiled, out_eager)


def test_inductor_compiled_selective_step_matches_eager():
    """Inductor runs the kernel as an extern call into buffers laid out from the fake implementation: a stride
    or shape the kernel does not produce would show here. One layer: inductor's compile is the slow part."""
    attention = ATTENTIONS["selective-gqa"][0]
    eager, compiled = model_for(attention, 1), model_for(attention, 1)
    x = tokens()
    out_eager, _ = step(eager, x)
    out_compiled, _ = step(torch.compile(compiled, fullgraph=True), x)  # a graph break raises
    assert_same_step(compiled, eager, out_compiled, out_eager)


@pytest.mark.parametrize("name", ["differential", "accumulate"])
def test_dynamic_shapes_trace_one_graph_for_two_lengths(name):
    """With dynamic shapes a module's float attribute (a layer's scale, a selection term's) can reach the kernel's
    autograd.Function symbolic; it is read as a Python float before the Function (dynamo failed on a first read
    inside it), and a Selection's sizes are compared, not hashed (which specialised them). One graph serves two
    sequence lengths, each step as eager's. Three layers, each an accumulate source."""
    graphs = []

    def counting(gm, example_inputs):  # a torch.compile backend: count the graphs, run them as traced
        graphs.append(gm)
        return gm.forward

    attention = {**ATTENTIONS[name][0], "sources": [0, 1, 2]} if name == "accumulate" else ATTENTIONS[name][0]
    eager, compiled = model_for(attention, 3, max_seq_len=64), model_for(attention, 3, max_seq_len=64)
    run = torch.compile(compiled, backend=counting, dynamic=True, fullgraph=True)
    for n in (48, 40):
        for model in (eager, compiled):
            model.zero_grad()
        out_eager, _ = step(eager, tokens(n))
        out_compiled, _ = step(run, tokens(n))
        assert_same_step(compiled, eager, out_compiled, out_eager)
    assert len(graphs) == 1, f"{len(graphs)} graphs"


# The ops on small problems of every shape the kernel takes: GQA (4 heads, 2 kv heads), 3 cached keys (Nq 5,
# Nk 8), v narrower than q/k, blocks of 2 rows (one partial), tiles of 3 keys; two selection terms (weights 1 and
# 0.5, BOS protected or not) or none (plain attention); q transposed in memory (the model hands views).
def op_inputs(terms: int, dtype):
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    B, H, Hkv, Nq, Nk, D, Dv, Ds = 2, 4, 2, 5, 8, 8, 6, 3
    q = make(B, Nq, H, D).transpose(1, 2)
    k, v = make(B, Hkv, Nk, D), make(B, Hkv, Nk, Dv)
    sel_q, sel_k = [make(B, Nq, Ds) for _ in range(terms)], [make(B, Nk, Ds) for _ in range(terms)]
    weights, protect = [1.0, 0.5][:terms], [True, False][:terms]
    start = make(B, Nk).abs() if terms else torch.zeros(B, Nk, dtype=dtype)
    return q, k, v, sel_q, sel_k, weights, protect, start


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("terms", [2, 0], ids=["two-terms", "no-selection"])
def test_ops_pass_opcheck(terms, dtype):
    """torch.library.opcheck: schema, fake implementation (shapes, dtypes, strides), AOT dispatch with dynamic
    shapes; the backward op on the forward's real outputs."""
    q, k, v, sel_q, sel_k, weights, protect, start = op_inputs(terms, dtype)
    forward_args = (q, k, v, sel_q, sel_k, weights, protect, start, True, 2, 3)
    torch.library.opcheck(cpu_fused.cpu_forward, forward_args)
    out, lse, G = cpu_fused.cpu_forward(*forward_args)
    assert (out.shape, lse.shape, G.shape) == ((2, 4, 5, 6), (2, 4, 5), (2, 3, 8))
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    delta = torch.linalg.vecdot(dout, out)
    backward_args = (q, k, v, dout, lse, delta, G, sel_q, sel_k, weights, protect, True, 2, 3)
    torch.library.opcheck(cpu_fused.cpu_backward, backward_args)
    grads = cpu_fused.cpu_backward(*backward_args)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, (2, 8), *(t.shape for t in (*sel_q, *sel_k))]


def test_fake_implementations_never_build_the_kernel(monkeypatch):
    """Shapes come from the fake implementations (meta tensors here, fake ones under torch.compile) without the
    kernel: a process that has not built it yet builds it only when a real call needs it."""
    def no_build():
        raise AssertionError("the kernel was built")

    monkeypatch.setattr(cpu_fused, "_state", {})
    monkeypatch.setattr(cpu_fused, "_build", no_build)
    q, k, v, sel_q, sel_k, weights, protect, start = (
        [t.to("meta") for t in x] if isinstance(x, list) and x and isinstance(x[0], torch.Tensor)
        else x.to("meta") if isinstance(x, torch.Tensor) else x for x in op_inputs(2, torch.float32))
    out, lse, G = cpu_fused.cpu_forward(q, k, v, sel_q, sel_k, weights, protect, start, True, 2, 3)
    assert (out.shape, lse.shape, G.shape, out.device.type) == ((2, 4, 5, 6), (2, 4, 5), (2, 3, 8), "meta")
    grads = cpu_fused.cpu_backward(q, k, v, out, lse, lse, G, sel_q, sel_k, weights, protect, True, 2, 3)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, (2, 8), *(t.shape for t in (*sel_q, *sel_k))]
    assert cpu_fused._state == {}


def test_a_fresh_process_compiles_a_model_built_from_a_config_in_one_graph():
    """No eager forward first (train and bench run one; a user's script may not): the backend registry's first
    load (entry points) and the auto backend's once-only log line were graph breaks at every layer's first call."""
    import subprocess
    import sys

    script = (
        "import torch, attention_zoo as az\n"
        "for variant in ('vanilla', 'selective'):\n"
        "    model = az.build_model({'model': {'vocab_size': 32, 'dim': 32, 'depth': 2, 'heads': 4, 'max_seq_len': 16,"
        " 'attention': {'variant': variant}}})\n"
        "    explained = torch._dynamo.explain(model)(torch.randint(0, 32, (1, 16)))\n"
        "    print(variant, explained.graph_count, explained.graph_break_count)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["vanilla 1 0", "selective 1 0"], result.stdout
