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
    q, k, v = qkv()
    with pytest.raises(BackendRefused, match="backend 'xformers' refused: xformers kernels run on CUDA only"):
        functional.attention(q, k, v, backend="xformers")


def test_attend_building_blocks_rebuild_the_math_backend_with_gqa_and_a_cache():
    """causal_mask, grouped_logits and grouped_values (a custom `attend`'s parts) give softmax attention exactly as
    the math backend does: GQA (4 query heads on 2 kv heads) and more keys than queries (a cache's layout)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = functional.causal_mask(3, 7)
    assert mask.tolist() == [[j <= 4 + i for j in range(7)] for i in range(3)]  # bottom-right: queries at 4, 5, 6
    scores = functional.grouped_logits(q, k).masked_fill(~mask, float("-inf"))
    out = functional.grouped_values(scores.softmax(-1), v)
    torch.testing.assert_close(out, functional.attention(q, k, v, backend="math"))
    expanded = k.repeat_interleave(2, dim=1)  # query head h reads kv head h // 2
    torch.testing.assert_close(functional.grouped_logits(q, k, scale=1.0), q @ expanded.transpose(-1, -2))
    grouped = functional.group_queries(q, 2)
    assert grouped.shape == (2, 2, 2, 3, 8) and torch.equal(grouped[:, 1, 0], q[:, 2])  # a view: [h // G, h % G]
    assert functional.causal_mask(3, 1).tolist() == [[False], [False], [True]]  # more queries than keys


@pytest.mark.parametrize("call", [lambda: functional.group_queries(torch.zeros(1, 4, 2, 8), 3),
                                  lambda: functional.grouped_logits(torch.zeros(1, 4, 2, 8), torch.zeros(1, 3, 2, 8)),
                                  lambda: functional.grouped_values(torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 2, 8))])
def test_gqa_helpers_reject_heads_that_do_not_group(call):
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of kv heads \(3\)"):
        call()


def test_the_attend_helpers_name_what_is_wrong_with_their_inputs():
    """Wrong inputs got misleading messages (a 3-D q read N as heads) or einsum's own errors, and a batch of 1
    broadcast silently against another batch."""
    from attention_zoo import functional as f

    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8)
    cases = [(lambda: f.grouped_logits(q[0], k[0]), r"expected \(B, heads, N, width\) tensors of one batch size"),
             (lambda: f.grouped_logits(q, k[..., :4]), r"differ in head dim"),
             (lambda: f.grouped_values(torch.rand(2, 4, 5, 6), torch.randn(1, 2, 6, 8)), "of one batch size"),
             (lambda: f.grouped_values(torch.rand(2, 4, 5, 7), torch.randn(2, 2, 6, 8)), "have 7 keys, v .* has 6"),
             (lambda: f.causal_mask(-1, 3), r"lengths must be >= 0")]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_a_per_key_statistic_asked_for_in_another_shape_is_refused():
    from attention_zoo.cache import LayerCache

    cache = LayerCache()
    cache.extend(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4), torch.arange(3)[None])
    cache.stat("s", 2, "cpu", (4,))
    with pytest.raises(ValueError, match=r"per-key statistic 's' is \(2, 4, 3\), asked for \(2, 5, 3\)"):
        cache.stat("s", 2, "cpu", (5,))
