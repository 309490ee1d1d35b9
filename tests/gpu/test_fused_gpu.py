"""Every registered variant on the xformers, triton and flex backends against `math`, on a GPU (skipped
without CUDA). flex last: its first call per shape compiles (torch.compile), the slowest to run.

fp32, fp16 and bf16; logits and every parameter gradient; |difference| <= tol * max(1, largest |value|)
with tol 2e-3 (fp32: xformers' own fp32 kernels are checked at 9e-4 atol), 2e-2 (fp16), 6e-2 (bf16).
Run: `python -m pytest tests/test_triton.py tests/gpu -q` on a machine with CUDA, xformers and triton
(tests/test_triton.py then runs the compiled kernels, not the interpreter).
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from attention_zoo import build_model  # noqa: E402
from attention_zoo.backends import BACKENDS, AttentionCall, BackendRefused  # noqa: E402
from tests.cases import case_id, variant_cases  # noqa: E402

TOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}
# Each variant x dtype compiles flex's kernels anew (another shape, dtype or kind of bias): past dynamo's
# default of 8 recompiles of one function it would run flex eagerly and stop testing the compiled kernels.
torch._dynamo.config.recompile_limit = 1024
torch._dynamo.config.accumulated_recompile_limit = 8192
VARIANTS = variant_cases()  # the shared case table (tests/cases.py)
IDS = [case_id(name, params) for name, params in VARIANTS]


def refusal(backend: str, dtype) -> str | None:
    call = AttentionCall(device="cuda", dtype=dtype, heads=4, kv_heads=4, head_dim=16, q_len=40, k_len=40, has_bias=True,
                         bias_requires_grad=True, grad_enabled=True)
    return BACKENDS.get(backend).refuse(call)


def xformers_accepts(dtype) -> bool:
    return refusal("xformers", dtype) is None


def close(actual, expected, dtype, what):
    scale = max(1.0, expected.float().abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOL[dtype] * scale, rtol=0,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", ["xformers", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,params", VARIANTS, ids=IDS)
def test_variant_on_fused_backend_matches_math(name, params, dtype, backend):
    check_variant(name, params, dtype, backend)


def check_variant(name, params, dtype, backend):
    if refusal(backend, dtype):
        pytest.skip(f"{backend} refuses {dtype} here: {refusal(backend, dtype)}")
    torch.manual_seed(0)
    config = {"model": {"vocab_size": 64, "dim": 64, "depth": 2, "heads": 4, "max_seq_len": 64,
                        "attention": {"variant": name, **params}}}
    models = {b: build_model({**config, "backend": b}).to("cuda", dtype) for b in ("math", backend)}
    models[backend].load_state_dict(models["math"].state_dict())
    tokens = torch.randint(0, 64, (2, 40), device="cuda")  # 40: the bias rows need padding to 8
    logits, grads = {}, {}
    for b, model in models.items():
        try:
            out = model(tokens)
        except BackendRefused as refused:  # a stated capability limit (differential: v wider than q/k)
            pytest.skip(str(refused))
        out.float().logsumexp(-1).mean().backward()
        logits[b] = out.detach()
        grads[b] = {n: p.grad for n, p in model.named_parameters()}
    close(logits[backend], logits["math"], dtype, "logits")
    for pname, g in grads["math"].items():
        close(grads[backend][pname], g, dtype, pname)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_inference_uses_grouped_layout_and_matches_math(kv_heads):
    if not xformers_accepts(torch.float16):
        pytest.skip("xformers refuses float16 here")
    torch.manual_seed(0)
    q = torch.randn(2, 4, 300, 16, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(2, kv_heads, 300, 16, device="cuda", dtype=torch.float16) for _ in range(2))
    bias = torch.randn(2, 300, 300, device="cuda").unsqueeze(1).expand(2, 4, 300, 300)
    with torch.no_grad():
        out = BACKENDS.get("xformers").attention(q, k, v, bias=bias, causal=True, scale=0.25)
        ref = BACKENDS.get("math").attention(q.float(), k.float(), v.float(), bias=bias, causal=True, scale=0.25)
    close(out, ref, torch.float16, "out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,params", VARIANTS, ids=IDS)
def test_variant_on_flex_matches_math(name, params, dtype):
    """flex, last in the file (collected last): each new shape, dtype or kind of bias compiles, so its
    cases are the slowest and must not crowd out the others within .ci/gpu's time limit. fp32 and bf16
    (fp16 takes the same code path as bf16)."""
    check_variant(name, params, dtype, "flex")
