"""Context pruning: policies, shared decisions for linked layers, exactness of eviction, streaming
evaluation, and the auxiliary memory loss."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from attention_zoo import build_model
from attention_zoo.data import Batch
from attention_zoo.inference import (
    BudgetPolicy,
    Pruner,
    PruningError,
    ThresholdPolicy,
    WindowPolicy,
    key_groups,
    next_query_penalties,
    parse_prune_spec,
    streaming_loss,
)
from attention_zoo.inference.memory_loss import memory_needed, selective_memory_loss
from attention_zoo.inference.pruning import MIN_BUDGET, keep_lowest
from attention_zoo.ops.selection import penalty_tensor
from attention_zoo.train.aux_losses import get_aux_loss
from attention_zoo.variants.selective import ACCUMULATOR

DEPTH = 4



def make_model(attention: dict, layers: list | None = None, seed: int = 0, scale: float = 15.0):
    torch.manual_seed(seed)
    model = build_model({"backend": "math", "model": {"dim": 32, "depth": DEPTH, "heads": 4, "max_seq_len": 64,
                                                       "attention": attention, "layers": layers or []}}).eval()
    with torch.no_grad():  # O(1) selection scores, so F reaches typical thresholds within a few tokens
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "kv_proj.weight")):
                p.mul_(scale)
    return model


def tokens(B: int = 3, N: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (B, N), generator=torch.Generator().manual_seed(seed))


SELECTIVE = {"variant": "selective"}
SHARE = {"variant": "cross_layer_selective", "mode": "share", "sources": [0]}
SHARE_TWO = {"variant": "cross_layer_selective", "mode": "share", "sources": [0, 2]}
ACCUMULATE = {"variant": "cross_layer_selective", "mode": "accumulate", "sources": [0, 2], "decay": 0.5}
SELECTIVE_RESIDUAL_GQA = {"variant": "selective", "kv_heads": 2, "residual": True}


# --------------------------------------------------------------------------- parsing


def test_parse_prune_spec():
    assert parse_prune_spec("threshold:1.5") == ThresholdPolicy(1.5)
    assert parse_prune_spec("budget:32") == BudgetPolicy(32)
    assert parse_prune_spec("budget:32,16,none,8") == BudgetPolicy([32, 16, None, 8])
    assert parse_prune_spec("window:8") == WindowPolicy(8)
    for bad, words in [("thresh:1", "unknown policy"), ("budget", "POLICY:VALUE"), ("threshold:x", "not a number"),
                       ("threshold:0", "> 0"), ("budget:1", "below 2"), ("budget:3.5", "whole number"),
                       ("window:none", "whole number"), ("window:-1", "window '-1' is not a whole number"),
                       # str.isdigit() holds for '²', which int() refuses: a ValueError traceback from the CLI
                       ("budget:²", "budget '²' is not a whole number"), ("window:8,²", "window '²'")]:
        with pytest.raises(PruningError, match=words) as info:
            parse_prune_spec(bad)
        assert repr(bad) in str(info.value) and "valid forms" in str(info.value)


def test_keep_lowest_keeps_sorted_indices_and_prefers_newer_keys_on_ties():
    value = torch.tensor([[0.0, 5.0, 0.0, 1.0, 0.0]])
    assert keep_lowest(value, 3).tolist() == [[0, 2, 4]]
    assert keep_lowest(value, 2).tolist() == [[2, 4]]


# --------------------------------------------------------------------------- groups and penalties


def test_key_groups_follow_key_indexed_state():
    assert [g.layers for g in key_groups(make_model(SELECTIVE))] == [(0,), (1,), (2,), (3,)]
    share = key_groups(make_model(SHARE))
    assert [g.layers for g in share] == [(0, 1, 2, 3)] and share[0].linked_by == ("selection_penalty",)
    assert [g.layers for g in key_groups(make_model(SELECTIVE_RESIDUAL_GQA))] == [(0, 1, 2, 3)]
    # a vanilla layer between two residual layers does not read their state: it stays on its own
    mixed = make_model({"variant": "residual"}, [{"at": [1], "attention": {"variant": "vanilla"}}])
    assert [g.layers for g in key_groups(mixed)] == [(0, 2, 3), (1,)]


@torch.no_grad()
def test_next_query_penalties_replay_the_state_flow():
    decay0 = [{"at": [1], "attention": {**ACCUMULATE, "decay": 0.0}}]  # F_1 = 0 (no source), F_2 = own_2 + 0.5 * 0
    for attention, layers in ((SHARE_TWO, None), (ACCUMULATE, None), (ACCUMULATE, decay0)):
        model = make_model(attention, layers)
        x = tokens(2, 12)
        _, updates = model(x, return_state=True)
        cache = model.new_cache()
        model(x[:, :11], cache=cache)
        penalties = next_query_penalties(model, cache)
        latest = None
        for layer in range(DEPTH):  # F of query 11 in the full pass, as each layer attended with it
            latest = penalty_tensor(updates[layer].get("selection_penalty", latest))
            torch.testing.assert_close(penalties[layer], latest[:, 11, :11], atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------- policies


@torch.no_grad()
def run(model, pruner, x, check=None):
    cache = model.new_cache()
    logits = []
    for i in range(x.shape[1]):
        logits.append(model(x[:, i:i + 1], cache=cache))
        if pruner is not None:
            pruner(cache)
        if check is not None:
            check(cache, i)
    return torch.cat(logits, 1), cache


def test_budget_keeps_k_per_row_never_bos_or_newest_and_frees_memory():
    model = make_model(SELECTIVE)
    x = tokens(3, 30)
    full_bytes = run(model, None, x)[1].nbytes()

    def check(cache, i):
        for layer in cache.layers:
            assert layer.length == min(i + 1, 6)
            assert (layer.positions[:, 0] == 0).all() and (layer.positions[:, -1] == i).all()
            assert (layer.positions.diff(dim=1) > 0).all()  # kept in order, no duplicates

    _, cache = run(model, Pruner(model, BudgetPolicy(6)), x, check)
    assert cache.nbytes() * 5 == full_bytes  # 6 of 30 keys, every per-key tensor compacted
    rows = [set(cache.layers[1].positions[b].tolist()) for b in range(3)]
    assert rows[0] != rows[1] or rows[1] != rows[2]  # rows decide on their own


def test_budget_evicts_the_largest_penalty():
    model = make_model(SELECTIVE)
    cache = model.new_cache()
    with torch.no_grad():
        model(tokens(2, 12), cache=cache)
    before = [(layer.positions.clone(), layer.per_key[ACCUMULATOR].clone()) for layer in cache.layers]
    Pruner(model, BudgetPolicy(9))(cache)
    for (positions, acc), layer in zip(before, cache.layers):
        for b in range(2):
            gone = sorted(set(positions[b].tolist()) - set(layer.positions[b].tolist()))
            candidates = acc[b, 1:-1]  # BOS and the newest are never candidates
            assert len(gone) == 3
            assert sorted(acc[b, gone].tolist()) == sorted(candidates.topk(3).values.tolist())


def test_a_linked_group_evicts_by_its_layers_smallest_penalty():
    """Layers linked by key-indexed state (residual scores here: all four) keep one set of keys, ranked by
    the smallest F any of them gives a key: a key goes only if every layer of the group would drop it."""
    model = make_model(SELECTIVE_RESIDUAL_GQA)
    cache = model.new_cache()
    with torch.no_grad():
        model(tokens(2, 12), cache=cache)
    per_layer = torch.stack(next_query_penalties(model, cache))  # (layers, B, T)
    smallest, largest = per_layer.amin(0), per_layer.amax(0)
    positions = cache.layers[0].positions.clone()
    Pruner(model, BudgetPolicy(9))(cache)
    assert all(torch.equal(layer.positions, cache.layers[0].positions) for layer in cache.layers)
    for b in range(2):
        gone = sorted(set(positions[b].tolist()) - set(cache.layers[0].positions[b].tolist()))
        assert len(gone) == 3
        assert sorted(smallest[b, gone].tolist()) == sorted(smallest[b, 1:-1].topk(3).values.tolist())
    # the test can tell the group's minimum from its maximum: they pick other keys here
    assert any(set(smallest[b, 1:-1].topk(3).indices.tolist()) != set(largest[b, 1:-1].topk(3).indices.tolist())
               for b in range(2))


def test_threshold_evicts_a_penalty_equal_to_tau():
    """The rule is F >= tau (a key is dropped at tau, not only over it); BOS and the newest key stay."""
    policy = ThresholdPolicy(1.0)
    penalty = torch.tensor([[2.0, 1.0, 0.5, 1.0 - 1e-6, 2.0]])
    assert policy.keep(penalty, torch.arange(5)[None], None).tolist() == [[0, 2, 3, 4]]


def test_threshold_drops_exactly_the_keys_at_or_over_tau():
    model = make_model(SELECTIVE)

    def check(cache, i):
        for F_next, layer in zip(next_query_penalties(model, cache), cache.layers):
            assert ((F_next[:, 1:-1] < 0.5)).all()  # with one row, no masked key survives
            assert layer.positions[0, 0] == 0

    x = tokens(1, 30)
    _, pruned = run(model, Pruner(model, ThresholdPolicy(0.5)), x, check)
    assert sum(pruned.lengths()) < 4 * 30


@torch.no_grad()
def test_threshold_with_batch_keeps_the_largest_count():
    model = make_model(SELECTIVE)
    x = tokens(3, 25)
    pruner = Pruner(model, ThresholdPolicy(0.5))
    cache = model.new_cache()
    uneven = 0
    for i in range(x.shape[1]):
        model(x[:, i:i + 1], cache=cache)
        before = [(layer.positions.clone(), F_next) for layer, F_next in zip(cache.layers, next_query_penalties(model, cache))]
        pruner(cache)
        for (positions, F_next), layer in zip(before, cache.layers):
            unmasked = F_next < 0.5
            unmasked[:, 0] = unmasked[:, -1] = True
            counts = unmasked.sum(-1)
            assert layer.length == counts.max()  # every row keeps as many keys as the row that keeps the most
            uneven += int(counts.min() < counts.max())
            for b in range(3):  # and no row loses a key it has not masked
                assert set(positions[b, unmasked[b]].tolist()) <= set(layer.positions[b].tolist())
    assert uneven > 0, "rows should disagree somewhere in this setting"


def test_window_keeps_bos_and_the_most_recent_keys():
    model = make_model({"variant": "vanilla"})
    _, cache = run(model, Pruner(model, WindowPolicy(5)), tokens(2, 20))
    assert all(layer.positions.tolist() == [[0, 16, 17, 18, 19]] * 2 for layer in cache.layers)


def test_share_takes_one_decision_per_source():
    # share with one source: its F drives every layer; with sources [0, 2]: layers 0-1 follow source 0's F
    # and layers 2-3 source 2's (each layer's keys are ranked by the F it attends with)
    for attention, groups in ((SHARE, [(0, 1, 2, 3)]), (SHARE_TWO, [(0, 1), (2, 3)])):
        model = make_model(attention)
        pruner = Pruner(model, BudgetPolicy(7))
        assert [g.layers for g in pruner.groups] == groups
        _, cache = run(model, pruner, tokens(2, 25))
        for group in groups:
            assert all(torch.equal(cache.layers[i].positions, cache.layers[group[0]].positions) for i in group)
        assert cache.lengths() == [7] * DEPTH
    assert not torch.equal(cache.layers[0].positions, cache.layers[2].positions)


@pytest.mark.parametrize("attention,spec", [
    (SELECTIVE, "budget:6"), (SELECTIVE, "threshold:0.5"), (SHARE, "budget:5"), (SHARE_TWO, "threshold:1.0"),
    (ACCUMULATE, "budget:6"), (SELECTIVE_RESIDUAL_GQA, "threshold:0.5"), (SELECTIVE_RESIDUAL_GQA, "budget:4"),
])
def test_eviction_equals_masking_the_key_forever(attention, spec):
    """Dropping a key must be exactly the same as giving it an infinite penalty from then on: a second,
    unpruned cache whose evicted keys get accumulator 1e9 (weight exp(-1e9) = 0) must give the same
    logits at every step. This checks the compaction (k, v, positions, accumulators), the masks after
    non-contiguous positions, and the shared decisions of linked layers."""
    model = make_model(attention)
    x = tokens(3, 30)
    pruner = Pruner(model, parse_prune_spec(spec))
    real, masked = model.new_cache(), model.new_cache()
    dropped = 0
    with torch.no_grad():
        for i in range(x.shape[1]):
            a = model(x[:, i:i + 1], cache=real)
            pruner(real)
            b = model(x[:, i:i + 1], cache=masked)
            assert (a - b).abs().max() < 1e-4, f"step {i}"
            for kept, layer in zip(real.layers, masked.layers):
                if ACCUMULATOR in layer.per_key:
                    gone = ~(layer.positions[:, :, None] == kept.positions[:, None, :]).any(-1)
                    layer.per_key[ACCUMULATOR] = layer.per_key[ACCUMULATOR].masked_fill(gone, 1e9)
            dropped = max(dropped, masked.layers[-1].length - real.layers[-1].length)
    assert dropped > 5, "the policy should have dropped keys in this setting"


def test_pruning_changes_nothing_when_nothing_is_masked():
    model = make_model(SHARE)
    x = tokens(2, 20)
    full = model(x).detach()
    logits, cache = run(model, Pruner(model, ThresholdPolicy(1e6)), x)
    assert (logits - full).abs().max() < 1e-4 and cache.lengths() == [20] * DEPTH


# --------------------------------------------------------------------------- refusals


def test_policies_that_cannot_apply_are_refused_clearly():
    with pytest.raises(PruningError, match="no layer of this model has a selection penalty.*window:K"):
        Pruner(make_model({"variant": "residual"}), BudgetPolicy(8))
    Pruner(make_model({"variant": "residual"}), WindowPolicy(8))  # the window needs no F
    with pytest.raises(PruningError, match=r"layers 0, 1, 2, 3 \(linked by residual_scores\).*"
                                           r"one budget"):
        Pruner(make_model(SELECTIVE_RESIDUAL_GQA), BudgetPolicy([8, 8, 4, 8]))
    mixed = make_model(SELECTIVE, [{"at": [1], "attention": {"variant": "vanilla"}}])
    with pytest.raises(PruningError, match="layer 1 has no selection penalty F.*'none'"):
        Pruner(mixed, BudgetPolicy([8, 8, 8, 8]))
    with pytest.raises(PruningError, match="3 budgets for 4 layers"):
        Pruner(mixed, BudgetPolicy([8, 8, 8]))
    pruner = Pruner(mixed, BudgetPolicy(8))  # one number: every layer that has an F
    assert pruner.layer_budgets(64) == [8, 64, 8, 8]
    _, cache = run(mixed, pruner, tokens(1, 12))
    assert cache.lengths() == [8, 12, 8, 8]


@pytest.mark.parametrize("policy,args", [
    (BudgetPolicy, (1,)), (BudgetPolicy, (0,)), (BudgetPolicy, (-2,)), (BudgetPolicy, (2.5,)), (BudgetPolicy, (True,)),
    (BudgetPolicy, (None,)), (BudgetPolicy, ([],)), (BudgetPolicy, ([8, 1, 8, 8],)), (WindowPolicy, (1,)),
    (ThresholdPolicy, (float("nan"),)), (ThresholdPolicy, (float("inf"),)), (ThresholdPolicy, (-1.0,)),
    (ThresholdPolicy, (0,)), (ThresholdPolicy, ("1",)),
])
def test_policies_built_from_python_check_their_values(policy, args):
    """parse_prune_spec checked the text, but the classes took anything: BudgetPolicy(1) dropped BOS (only the
    newest key left), BudgetPolicy(0) emptied every cache and generation ran on, each token seeing only itself,
    ThresholdPolicy(nan) silently pruned nothing."""
    with pytest.raises(PruningError, match=re.escape(f"{policy.__name__}(")) as info:
        policy(*args)
    assert repr(args[0]) in str(info.value)


def test_the_smallest_budget_keeps_bos_and_the_newest_key():
    model = make_model(SELECTIVE)
    x = tokens(2, 12)
    for policy in (BudgetPolicy(MIN_BUDGET), WindowPolicy(MIN_BUDGET), BudgetPolicy([MIN_BUDGET, None, 3, 4])):
        _, cache = run(model, Pruner(model, policy), x)
        for layer in cache.layers:
            assert (layer.positions[:, 0] == 0).all() and (layer.positions[:, -1] == x.shape[1] - 1).all()


# --------------------------------------------------------------------------- streaming evaluation


def batch_of(x: torch.Tensor) -> Batch:
    targets = x[:, 1:].clone()
    targets[0, :3] = -100  # some unscored positions
    return Batch(x[:, :-1], targets)


def test_unpruned_streaming_loss_equals_full_forward_loss():
    model = make_model(ACCUMULATE)
    batches = [batch_of(tokens(2, 21, seed=s)) for s in range(2)]
    with torch.no_grad():
        total = sum(F.cross_entropy(model(b.inputs).flatten(0, 1), b.targets.flatten(), reduction="sum") for b in batches)
    count = sum(int((b.targets != -100).sum()) for b in batches)
    streamed = streaming_loss(model, batches, prefill=1)  # strictly one token at a time
    assert streamed.tokens == count
    assert abs(streamed.loss - total.item() / count) < 1e-5
    pruned = streaming_loss(model, batches, Pruner(model, BudgetPolicy(64)), prefill=1)
    assert pruned.loss == pytest.approx(streamed.loss, abs=1e-5)


@pytest.mark.parametrize("prefill", [0, -3, 2.5])
def test_streaming_refuses_a_prefill_below_one(prefill):
    """prefill=0 was read as "unset": without a pruner it raised AttributeError ('NoneType' object has no attribute
    'safe_prefill'), with one it silently took the default; a negative one silently became 1."""
    model = make_model(SELECTIVE)
    for pruner in (None, Pruner(model, BudgetPolicy(4))):
        with pytest.raises(ValueError, match=f"prefill {prefill!r}: must be a whole number >= 1"):
            streaming_loss(model, [batch_of(tokens(2, 10))], pruner, prefill=prefill)


def test_streaming_prefill_shortcut_is_exact_for_budgets():
    model = make_model(SELECTIVE)
    batches = [batch_of(tokens(2, 25))]
    pruner = Pruner(model, BudgetPolicy(6))
    slow = streaming_loss(model, batches, pruner, prefill=1)
    fast = streaming_loss(model, batches, pruner)  # prefills min budget = 6 tokens at once
    assert pruner.safe_prefill() == 6 and fast.loss == pytest.approx(slow.loss, abs=1e-5)
    assert slow.peak_kept == [6] * DEPTH
    assert abs(slow.loss - streaming_loss(model, batches).loss) > 1e-3  # pruning this hard does change the loss


# --------------------------------------------------------------------------- memory loss


def test_memory_needed_counts_unmasked_keys():
    Fpen = torch.zeros(1, 4, 4)
    Fpen[0, 3, :2] = torch.tensor([2.0, 0.5])  # row 3: key 0 fully masked (capped at tau), key 1 half
    assert memory_needed(Fpen, tau=1.0).tolist() == [[0.0, 1.0, 2.0, 1.5]]


def test_selective_memory_loss_matches_the_formula_and_trains_the_selection():
    model = make_model(SHARE_TWO, scale=1.0)
    model.train()
    x = tokens(2, 16)
    _, updates = model(x, return_state=True)
    written = [penalty_tensor(u["selection_penalty"]) for u in updates if "selection_penalty" in u]
    assert len(written) == 2  # share: only the two sources write F
    N = x.shape[1]
    expected = 0.1 * sum((torch.arange(N) - Fl.clamp(max=1.0).sum(-1)).amax(-1).mean() for Fl in written) / (2 * N)
    loss = selective_memory_loss(updates, tau=1.0, eps=0.1)
    torch.testing.assert_close(loss, expected)
    spec = get_aux_loss("selective_memory")
    torch.testing.assert_close(spec.fn(updates, {"tau": 1.0, "eps": 0.1}, model), loss)
    loss.backward()
    q = model.blocks[0].attention.q_proj.weight.grad
    assert q is not None and q.abs().sum() > 0  # it pushes the selection head to mask more
    with pytest.raises(Exception, match="no layer of this model writes a selection penalty"):
        selective_memory_loss([{}, {}])


def test_selective_memory_is_a_train_config_option():
    from attention_zoo import load_config
    from attention_zoo.config import ConfigError

    config = load_config({"model": {"attention": SELECTIVE}, "train": {"aux_losses": {"selective_memory": {"eps": 0.02}}}})
    assert config["train"]["aux_losses"] == {"selective_memory": {"tau": 1.0, "eps": 0.02}}
    assert load_config({"model": {"attention": SELECTIVE}})["train"]["aux_losses"] == {}  # off by default
    with pytest.raises(ConfigError, match="train.aux_losses.selective_memory.tau = -1.*must be > 0"):
        load_config({"train": {"aux_losses": {"selective_memory": {"tau": -1}}}})


def test_a_per_head_next_query_penalty_ranks_keys_by_its_smallest_head(monkeypatch):
    """A variant whose F is per head, (B, H, T), crashed budget and threshold pruning with a size mismatch; a
    key's F is now its smallest over the heads (it goes only if every head would drop it). Another shape is
    one ValueError naming the layer."""
    from attention_zoo.variants.selective import Selective

    model = make_model(SELECTIVE)
    cache = model.new_cache()
    with torch.no_grad():
        model(tokens(2, 12), cache=cache)
    per_head = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(Selective, "next_query_penalty", lambda self, cache, previous: per_head, raising=False)
    assert all(torch.equal(f, per_head.amin(1)) for f in next_query_penalties(model, cache))
    positions = cache.layers[0].positions.clone()
    Pruner(model, BudgetPolicy(9))(cache)
    smallest = per_head.amin(1)
    for b in range(2):
        gone = sorted(set(positions[b].tolist()) - set(cache.layers[0].positions[b].tolist()))
        assert sorted(smallest[b, gone].tolist()) == sorted(smallest[b, 1:-1].topk(3).values.tolist())
    monkeypatch.setattr(Selective, "next_query_penalty", lambda self, cache, previous: torch.zeros(2, 5),
                        raising=False)
    with pytest.raises(ValueError, match=r"layer 0 \(Selective\): its next-query penalty has shape \(2, 5\); "
                                         r"pruning needs one value per kept key, \(B, T\) = \(2, 9\)"):
        next_query_penalties(model, cache)


def test_a_penalty_rule_that_gives_none_is_an_error_naming_the_variant(monkeypatch):
    """A plug-in rule returning None at run time left its layers unpruned while layer_budgets (the memory figure of
    calibrate and generate) counted them at their budget. The pruner now refuses, naming the layer, its variant and
    what a rule must return; a layer with no rule at all is still simply not pruned, and None stays fine for a
    layer whose group another layer's F ranks (cross-layer accumulate below its first source)."""
    from attention_zoo.variants.selective import Selective

    model = make_model(SELECTIVE)
    monkeypatch.setattr(Selective, "next_query_penalty", lambda self, cache, previous: None, raising=False)
    for policy in (BudgetPolicy(4), ThresholdPolicy(1.0)):
        pruner = Pruner(model, policy, "--prune 'x'")
        with pytest.raises(PruningError, match=r"^--prune 'x': layer 0 \(Selective, variant 'selective'\) gave no "
                                               r"selection penalty F for the 1 key held: .*returned None.*"
                                               r"must return F for every kept key, \(B, T\) or per head"):
            run(model, pruner, tokens(1, 6))
    monkeypatch.undo()

    mixed = make_model(SELECTIVE, [{"at": [1], "attention": {"variant": "vanilla"}}])  # layer 1: no rule
    _, cache = run(mixed, Pruner(mixed, BudgetPolicy(4)), tokens(1, 8))
    assert cache.lengths() == [4, 8, 4, 4]
    late = make_model({**ACCUMULATE, "sources": [2]})  # layers 0 and 1 give None; layer 2's F ranks the group
    _, cache = run(late, Pruner(late, BudgetPolicy(4)), tokens(1, 8))
    assert cache.lengths() == [4, 4, 4, 4]


def test_cross_layer_accumulate_without_sources_has_no_f_and_is_not_pruned_by_it():
    """accumulate with `sources: []` attends like vanilla in every layer (docs/variants.md: below the first source,
    no F). A budget raised the PruningError meant for a broken plug-in rule at the first token; the layers are now
    what they are, layers without F: not pruned by budget or threshold (a model with no other F is refused up
    front, naming them), and window:K still prunes them."""
    none = {**ACCUMULATE, "sources": []}
    alone = make_model(none)
    for policy in (BudgetPolicy(4), ThresholdPolicy(1.0)):
        with pytest.raises(PruningError, match=r"no layer of this model has a selection penalty F.*"
                                               r"layers 0, 1, 2, 3 \(CrossLayerSelective\) have none: below their "
                                               r"first source layer.*window:K"):
            Pruner(alone, policy)
    _, cache = run(alone, Pruner(alone, WindowPolicy(4)), tokens(1, 8))
    assert cache.lengths() == [4, 4, 4, 4]

    mixed = make_model(none, [{"at": [3], "attention": SELECTIVE}])  # layer 3 has F; layers 0-2 do not
    pruner = Pruner(mixed, BudgetPolicy(4))
    assert pruner.describe() == ("layers 0, 1, 2 (linked by selection_penalty): not pruned (no F); "
                                 "layer 3: budget 4")
    assert pruner.layer_budgets(8) == [8, 8, 8, 4]
    _, cache = run(mixed, pruner, tokens(1, 8))
    assert cache.lengths() == [8, 8, 8, 4]
    with pytest.raises(PruningError, match=r"layers 0, 1, 2 \(linked by selection_penalty\) has no selection "
                                           r"penalty F.*'none'"):
        Pruner(mixed, BudgetPolicy([4, 4, 4, 4]))
    Pruner(mixed, BudgetPolicy([None, None, None, 4]))


def test_a_thresholds_spec_is_exact():
    """spec() printed 6 significant digits: threshold:0.5000004 read as threshold:0.5, so calibrate --measure of the
    two gave the second the first's journaled measurement. Short where exact, the round-trip form where not."""
    from attention_zoo.inference import ThresholdPolicy, parse_prune_spec

    assert ThresholdPolicy(1.0).spec() == "threshold:1" and ThresholdPolicy(0.25).spec() == "threshold:0.25"
    for tau in (0.5000004, 1e-9 + 1, 123456.7):
        spec = ThresholdPolicy(tau).spec()
        assert spec != ThresholdPolicy(0.5).spec() and parse_prune_spec(spec).tau == tau, spec
