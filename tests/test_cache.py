"""The KV cache gives exactly what one full forward pass gives, for every variant and combination.

Prefill in chunks of 1, 3, 5 tokens or the whole prompt, then one token at a time: the concatenated
logits must equal the full pass (float32, max abs difference < 1e-4), on the math and sdpa backends.
"""
from __future__ import annotations

import pytest
import torch

from attention_zoo import build_model, list_variants
from attention_zoo.backends.base import causal_mask
from attention_zoo.functional import selection_logits, selection_scores
from attention_zoo.inference.key_scores import next_query_penalties
from attention_zoo.ops.selection import penalty_tensor
from attention_zoo.variants.selective import ACCUMULATOR
from tests.cases import STACKS, case_id, variant_cases

DEPTH, SEQ, PROMPT = 4, 14, 8


# Mixed stacks: state passing through layers of other variants.
MIXED = {
    "selective-with-vanilla-layer": ({"variant": "selective"}, [{"at": [1], "attention": {"variant": "vanilla"}}]),
    "cross-share-with-residual-layer": ({"variant": "cross_layer_selective", "sources": [0], "residual": True},
                                        [{"at": [2], "attention": {"variant": "residual"}}]),
    "differential-under-selective": ({"variant": "selective", "kv_heads": 2},
                                     [{"at": [1, 3], "attention": {"variant": "differential"}}]),
}
CASES = {case_id(name, params): ({"variant": name, **params}, None) for name, params in variant_cases()}
ALL = {**CASES, **MIXED}
SELECTIVE = {"variant": "selective"}


def make_model(attention: dict, layers: list | None = None, backend: str = "math", seed: int = 0, stack: str = "rope",
               max_seq_len: int = 32):
    torch.manual_seed(seed)
    config = {"backend": backend, "model": {"dim": 32, "depth": DEPTH, "heads": 4, "max_seq_len": max_seq_len,
                                             **STACKS[stack], "attention": attention, "layers": layers or []}}
    model = build_model(config).eval()
    with torch.no_grad():  # larger q/k so selection scores are O(1) and F really changes the output
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "kv_proj.weight")):
                p.mul_(15)
    return model


def cached_logits(model, tokens: torch.Tensor, chunk: int) -> torch.Tensor:
    """Prefill tokens[:, :PROMPT] in chunks of `chunk`, then feed the rest one token at a time."""
    cache = model.new_cache()
    out = [model(tokens[:, i:min(i + chunk, PROMPT)], cache=cache) for i in range(0, PROMPT, chunk)]
    out += [model(tokens[:, i:i + 1], cache=cache) for i in range(PROMPT, tokens.shape[1])]
    assert cache.seen == tokens.shape[1] and cache.lengths() == [tokens.shape[1]] * DEPTH
    return torch.cat(out, dim=1)


def test_every_variant_is_covered():
    covered = {attention["variant"] for attention, _ in ALL.values()}
    assert set(list_variants()) <= covered, f"add a row for {set(list_variants()) - covered}"


# Every case on every stack with math, and every case on sdpa with the default stack: a backend sees only the
# q, k, v and bias the variant hands it (rope rotates q/k before the cache and the backend), so the stack x backend
# product would repeat the same backend calls on differently valued inputs.
GRID = [(name, "math", stack) for name in ALL for stack in STACKS] + [(name, "sdpa", "rope") for name in ALL]


@pytest.mark.parametrize("name,backend,stack", GRID, ids=[f"{n}-{b}-{s}" for n, b, s in GRID])
@torch.no_grad()
def test_cached_decoding_equals_full_forward(name, backend, stack):
    attention, layers = ALL[name]
    model = make_model(attention, layers, backend, stack=stack)
    tokens = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    for chunk in (1, 3, 5, PROMPT):
        diff = (cached_logits(model, tokens, chunk) - full).abs().max().item()
        assert diff < 1e-4, f"{name} on {backend}, prefill chunk {chunk}: max abs diff {diff}"


@torch.no_grad()
def test_cache_changes_the_output_where_it_should():
    # Guard against a vacuous equality: a cache that drops the selective accumulator must fail.
    model = make_model(SELECTIVE)
    tokens = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(2))
    full = model(tokens)
    cache = model.new_cache()
    model(tokens[:, :PROMPT], cache=cache)
    for layer in cache.layers:
        layer.per_key[ACCUMULATOR].zero_()
    wrong = model(tokens[:, PROMPT:PROMPT + 1], cache=cache)
    assert (wrong - full[:, PROMPT:PROMPT + 1]).abs().max() > 1e-3


@torch.no_grad()
def test_selective_accumulator_is_column_sums_of_S():
    model = make_model({"variant": "selective", "kv_heads": 1, "selection_head": 3})
    tokens = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))
    _, updates = model(tokens, return_state=True)
    cache = model.new_cache()
    for begin, end in ((0, 5), (5, 6), (6, 11)):
        model(tokens[:, begin:end], cache=cache)
        for layer in range(DEPTH):
            F_full = penalty_tensor(updates[layer]["selection_penalty"])  # (B, N, N): F[i, j] = sum over k < i of S[k, j]
            acc = cache.layers[layer].per_key[ACCUMULATOR]  # (B, end)
            # a = column sums of S over the processed queries 0..end-1 = F of the next query (row `end`)
            assert acc.shape == (2, end)
            torch.testing.assert_close(acc, F_full[:, end, :end], atol=1e-4, rtol=1e-5)
        # The penalty the pruner ranks keys by is that accumulator (own F for selective layers).
        assert all(p is cache.layers[i].per_key[ACCUMULATOR] for i, p in enumerate(next_query_penalties(model, cache)))


def test_selection_scores_after_a_cache_are_bottom_right_aligned():
    # 2 new queries after 3 cached keys: query 0 is at position 3, query 1 at 4.
    logits = torch.ones(1, 2, 5)
    S = selection_scores(logits, protect_bos=True)
    assert S[0].tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 1, 0]]  # strictly earlier keys, never BOS, never itself
    assert causal_mask(2, 5).tolist() == [[True, True, True, True, False], [True] * 5]
    assert selection_logits(torch.randn(1, 4, 2, 8), torch.randn(1, 2, 5, 8), 3).shape == (1, 2, 5)


@torch.no_grad()
def test_sdpa_needs_bottom_right_mask_for_chunks_after_a_cache():
    # SDPA's own is_causal is top-left aligned: with 3 cached keys it would hide keys the new queries may see.
    import torch.nn.functional as F

    from attention_zoo.backends import BACKENDS

    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    ours = BACKENDS.get("sdpa").attention(q, k, v, bias=None, causal=True, scale=8 ** -0.5)
    reference = BACKENDS.get("math").attention(q, k, v, bias=None, causal=True, scale=8 ** -0.5)
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert (top_left - reference).abs().max() > 1e-3


def test_cache_nbytes_counts_keys_values_and_stats():
    model = make_model({"variant": "selective", "kv_heads": 2, "residual": True})
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 256, (3, 5)), cache=cache)
    layer = cache.layers[0]
    # k and v (B, Hkv, T, D) float32, positions (B, T) int64, accumulator (B, T) float32
    assert layer.nbytes() == 2 * 3 * 2 * 5 * 8 * 4 + 3 * 5 * 8 + 3 * 5 * 4
    index = torch.tensor([[0, 3, 4]] * 3)
    layer.keep(index)
    assert layer.length == 3 and layer.positions[0].tolist() == [0, 3, 4]
    assert layer.nbytes() == 2 * 3 * 2 * 3 * 8 * 4 + 3 * 3 * 8 + 3 * 3 * 4


def held_bytes(cache) -> int:
    """Bytes of the distinct storages the cache's tensors keep alive: what it really holds in memory."""
    storages = {}
    for layer in cache.layers:
        for t in (layer.k, layer.v, layer.positions, *layer.per_key.values(), *layer.running.values()):
            if t is not None:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("stack", list(STACKS))
@pytest.mark.parametrize("name", ["vanilla-defaults", "gqa-kv_heads=2", "selective-kv_heads=2", "differential-defaults"])
@torch.no_grad()
def test_cache_nbytes_is_the_memory_it_holds(name, stack):
    """After a prefill the cache kept views: v of the projection that holds k and v together (rope rotates k into a
    tensor of its own, so the k half was dead memory held, 1.5x what nbytes said), and positions expanded over the
    batch (counted B times, stored once). nbytes must be what the cache really keeps alive, after the prefill and
    after a decoding step."""
    model = make_model(ALL[name][0], stack=stack)
    cache = model.new_cache()
    tokens = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(0))
    model(tokens[:, :8], cache=cache)
    assert held_bytes(cache) == cache.nbytes()
    model(tokens[:, 8:], cache=cache)
    assert held_bytes(cache) == cache.nbytes()


def test_per_key_statistics_of_any_shape_follow_their_keys():
    """A (B, T) and a per-head (B, H, T) statistic grow with extend and are gathered with their keys by keep;
    `running` state is kept as it is and counted. (A (B, H, T) statistic crashed the next extend.)"""
    from attention_zoo.cache import LayerCache

    B, Hkv, H, D = 2, 1, 3, 4
    cache = LayerCache()
    cache.extend(torch.randn(B, Hkv, 4, D), torch.randn(B, Hkv, 4, D), torch.arange(4)[None])
    flat, per_head = cache.stat("flat", B, "cpu"), cache.stat("per_head", B, "cpu", (H,))
    assert flat.shape == (B, 4) and per_head.shape == (B, H, 4)
    ids = torch.arange(4.0)  # each key's statistic names its position, so where it lands shows what moved
    cache.per_key["flat"] = flat + ids
    cache.per_key["per_head"] = per_head + ids + 10 * torch.arange(H)[:, None]
    cache.running["total"] = torch.ones(B, H)
    cache.extend(torch.randn(B, Hkv, 2, D), torch.randn(B, Hkv, 2, D), torch.arange(4, 6)[None])
    assert cache.per_key["per_head"].shape == (B, H, 6) and cache.per_key["flat"][:, 4:].eq(0).all()
    index = torch.tensor([[0, 2, 3], [1, 3, 5]])
    cache.keep(index)
    assert cache.per_key["flat"].tolist() == [[0, 2, 3], [1, 3, 0]]
    assert cache.per_key["per_head"][1].tolist() == [[1, 3, 0], [11, 13, 0], [21, 23, 0]]
    assert cache.positions.tolist() == [[0, 2, 3], [1, 3, 5]] and cache.running["total"].shape == (B, H)
    kv = 2 * B * Hkv * 3 * D * 4
    assert cache.nbytes() == kv + B * 3 * 8 + B * 3 * 4 + B * H * 3 * 4 + B * H * 4
    cache.keep(torch.tensor([[1, 2], [1, 2]]))  # older keys evicted; the newest stays (pruning never evicts it)
    assert cache.length == 2 and cache.next_position() == 4  # after the newest kept key, not the number of keys


@pytest.mark.parametrize("stack", ["rope", "none"])
@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_decoding_runs_past_max_seq_len_without_learned_positions(name, stack):
    """max_seq_len is the training length, not a cap, with rope and none: 3x past it the cache still equals
    one full forward (which itself runs past it)."""
    model = make_model(CASES[name][0], stack=stack, max_seq_len=8)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    full = model(tokens)
    cache = model.new_cache()
    steps = [model(tokens[:, :5], cache=cache)] + [model(tokens[:, i:i + 1], cache=cache) for i in range(5, 24)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4


def test_learned_positions_stop_at_max_seq_len_with_a_clear_error():
    model = make_model(SELECTIVE, stack="learned", max_seq_len=8)
    cache = model.new_cache()
    model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"exceeds model.max_seq_len=8 \(learned positions"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
