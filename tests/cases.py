"""The one table of test cases the contract, cache, reference and GPU tests loop over.

VARIANT_CASES: registered variant -> the parameter sets worth covering (a variant not listed runs with its
declared defaults, `[{}]`, unless a parameter is required, plus the sets its class lists in `examples`, the hook a
plug-in uses; one with a required parameter and no examples must be listed: `variant_config` says so).
STACKS: the component stacks every case runs on: Llama's (the default), GPT-2's, and NoPE.
"""
from __future__ import annotations

import pytest
import torch

from attention_zoo import list_variants
from attention_zoo.variant_registry import get_variant

VARIANT_CASES: dict[str, list[dict]] = {
    "vanilla": [{}, {"qk_norm": True}],
    "gqa": [{"kv_heads": 2}, {"kv_heads": 1}],
    "residual": [{}, {"kv_heads": 2}],
    "selective": [{}, {"kv_heads": 2}, {"kv_heads": 1}, {"residual": True}, {"selection_head": 3, "protect_bos": False},
                  {"qk_norm": True, "kv_heads": 2}],
    "cross_layer_selective": [
        {"mode": "share", "sources": [0, 2]},
        {"mode": "accumulate", "sources": [1], "decay": 0.5},
        {"mode": "share", "sources": [0], "kv_heads": 2, "residual": True},
    ],
    "differential": [{}, {"kv_heads": 2, "qk_norm": True}],
}

STACKS: dict[str, dict] = {
    "rope": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"},
    "learned": {"position": "learned", "norm": "layernorm", "mlp": "gelu"},
    "none": {"position": "none", "norm": "rmsnorm", "mlp": "gelu_tanh"},
}


def variant_cases() -> list[tuple[str, dict]]:
    """(variant, params) for every registered variant: its VARIANT_CASES rows, or its defaults (unless a parameter
    is required) and the parameter sets its class lists in `examples`; each set once."""
    cases = []
    for name in list_variants():
        cls = get_variant(name)
        examples = [dict(e) for e in getattr(cls, "examples", None) or []]
        required = any(p.required for p in cls.params.values())
        rows = VARIANT_CASES.get(name) or ([] if required and examples else [{}])
        for params in [*rows, *examples]:
            if (name, params) not in cases:
                cases.append((name, params))
    return cases


def case_id(name: str, params: dict) -> str:
    return f"{name}-{'-'.join(f'{k}={v}' for k, v in params.items()) or 'defaults'}"


def variant_config(name: str, params: dict, backend: str = "math", stack: str = "rope", **model) -> dict:
    """A config of `model` sizes whose every layer runs variant `name` with `params`, on component stack `stack`."""
    required = [k for k, p in get_variant(name).params.items() if p.required and k not in params]
    if required:
        pytest.fail(f"variant {name!r} has required parameters {required}: list parameter sets that give them in "
                    f"its class's `examples` (e.g. examples = [{{{required[0]!r}: ...}}]; docs/adding-a-variant.md, "
                    f"Testing), or, for a built-in, add an entry for it to VARIANT_CASES in tests/cases.py, so the "
                    f"contract tests can build it")
    return {"backend": backend, "model": {**STACKS[stack], **model, "attention": {"variant": name, **params}}}


def randomized(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Weights far larger than the GPT-2 init, so a leak or a wrong term shows up well above rounding: N(0, std)
    everywhere, norm gains (1-D) around 1; differential's lambda vectors stay small, as exp(lq . lk) would
    blow up around 1. In place; returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = p.dim() == 1 and "lambda_" not in name
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std + (1.0 if gain else 0.0))
    return model
