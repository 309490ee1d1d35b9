"""What `attention_zoo.functional` raises for inputs it cannot take, as its docstrings say."""
from __future__ import annotations

import pytest
import torch

from attention_zoo import functional
from attention_zoo.backends import BackendRefused


def qkv(H=4, Hkv=2, N=6, D=8):
    return torch.randn(1, H, N, D), torch.randn(1, Hkv, N, D), torch.randn(1, Hkv, N, D)


@pytest.mark.parametrize("shapes,message", [
    (((1, 4, 6, 8), (1, 2, 6, 8), (1, 2, 6)), "expected 4-D"),
    (((1, 4, 6, 8), (1, 2, 6, 8), (1, 2, 5, 8)), "incompatible shapes"),
    (((1, 4, 6, 8), (1, 3, 6, 8), (1, 3, 6, 8)), "multiple of kv heads"),
])
def test_attention_rejects_a_bad_layout(shapes, message):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        functional.attention(q, k, v)
    with pytest.raises(ValueError, match=message):
        functional.selective_attention(q, k, v)


@pytest.mark.parametrize("head", [-1, 4])
def test_a_selection_head_outside_the_heads_is_a_value_error(head):
    q, k, v = qkv()
    for call in (lambda: functional.selection_logits(q, k, head),
                 lambda: functional.selective_attention(q, k, v, selection_head=head)):
        with pytest.raises(ValueError, match=rf"selection_head must be in \[0, 4\), got {head}"):
            call()


def test_a_named_backend_that_refuses_raises_backend_refused():
    q, k, v = (t.half().requires_grad_() for t in qkv())
    with pytest.raises(BackendRefused, match="backend 'sdpa' refused: fp16 backward on CPU"):
        functional.attention(q, k, v, backend="sdpa")
