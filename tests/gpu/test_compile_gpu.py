"""torch.compile of models whose attention runs on the triton backend, on a GPU (skipped without CUDA).

On CPU the fused C++ kernel is a custom operator and a model compiles to one graph (tests/test_compile.py). The
Triton kernels are launched from autograd.Functions in Python (backends/triton.py, ops/selection/triton_fused.py);
whether dynamo traces those launches without a graph break, and whether the compiled step computes what eager
does, can only be seen on a GPU. Each case: `torch._dynamo.explain` on the model (the test fails naming every
break's reason), then an aot_eager compile with fullgraph=True whose logits and parameter gradients must equal
eager's, bf16, |difference| <= 2e-2 * max(1, largest |value|) (both run the same kernels; only the order of
a few reductions may differ).
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from attention_zoo import build_model  # noqa: E402

CASES = {
    "vanilla": ({"variant": "vanilla"}, 2),
    "selective": ({"variant": "selective"}, 2),
    "selective-gqa": ({"variant": "selective", "kv_heads": 2}, 2),
    "accumulate": ({"variant": "cross_layer_selective", "mode": "accumulate", "sources": [0, 1, 2]}, 3),
}
VOCAB, N, TOL = 64, 128, 2e-2


def model_for(attention: dict, depth: int):
    torch.manual_seed(0)
    model = build_model({"backend": "triton", "model": {"vocab_size": VOCAB, "dim": 64, "depth": depth, "heads": 4,
                                                        "max_seq_len": N, "attention": attention}})
    return model.to("cuda", torch.bfloat16).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_a_triton_model_compiles_to_one_graph_and_computes_what_eager_does(case):
    attention, depth = CASES[case]
    model = model_for(attention, depth)
    tokens = torch.randint(0, VOCAB, (2, N), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    model(tokens)  # eager first, as train's warm-up: the kernels' own first-use work is not what is traced
    torch.compiler.reset()
    explained = torch._dynamo.explain(model)(tokens)
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, f"{explained.graph_break_count} graph breaks: {reasons}"

    def step(run):
        model.zero_grad(set_to_none=True)
        logits = run(tokens)
        logits.float().square().mean().backward()
        return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.compiler.reset()
    eager_logits, eager_grads = step(model)
    compiled_logits, compiled_grads = step(torch.compile(model, backend="aot_eager", fullgraph=True))
    for name, actual, expected in [("logits", compiled_logits, eager_logits),
                                   *((n, compiled_grads[n], g) for n, g in eager_grads.items())]:
        scale = max(1.0, expected.float().abs().max().item())
        torch.testing.assert_close(actual.float(), expected.float(), atol=TOL * scale, rtol=0,
                                   msg=lambda m, name=name: f"{case}, {name}: {m}")
