"""Activation checkpointing and torch.compile change how a step runs, never what it computes."""
from __future__ import annotations

import pytest
import torch

from attention_zoo import backends, build_model, load_config
from attention_zoo.inference.memory_loss import selective_memory_loss
from attention_zoo.train import train
from attention_zoo.train.execution import enable_activation_checkpointing
from attention_zoo.train.metrics import read_jsonl

ATTENTIONS = {
    "selective": {"variant": "selective"},
    "accumulate": {"variant": "cross_layer_selective", "mode": "accumulate", "sources": [0, 1], "decay": 0.5},
    "share-residual-mqa": {"variant": "cross_layer_selective", "sources": [0], "residual": True, "kv_heads": 1},
    "selective-residual": {"variant": "selective", "residual": True},
}


def model_for(attention, seed=0):
    torch.manual_seed(seed)
    return build_model({"backend": "sdpa", "model": {"vocab_size": 32, "dim": 32, "depth": 3, "heads": 4,
                                                      "max_seq_len": 48, "dropout": 0.1, "attention": attention}})


def step_grads(model, tokens, aux: bool):
    """One training step with dropout (seeded) and, with `aux`, the memory loss reading every layer's F."""
    torch.manual_seed(5)
    model.train()
    logits, per_layer = model(tokens, return_state=True)
    loss = logits.logsumexp(-1).mean()
    if aux:
        loss = loss + selective_memory_loss(per_layer, tau=1.0, eps=0.1)
    loss.backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("aux", [False, True], ids=["lm", "lm+memory-loss"])
@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_checkpointing_recomputes_each_block_and_gives_the_same_gradients(name, aux):
    tokens = torch.randint(0, 32, (2, 48), generator=torch.Generator().manual_seed(1))
    plain = step_grads(model_for(ATTENTIONS[name]), tokens, aux)
    model = enable_activation_checkpointing(model_for(ATTENTIONS[name]))
    calls = []
    for block in model.blocks:
        block.attention.register_forward_hook(lambda *args: calls.append(1))
    checkpointed = step_grads(model, tokens, aux)
    assert len(calls) == 2 * len(model.blocks), "each block runs once forward and once more in the backward"
    for a, b in zip(checkpointed, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_checkpointing_leaves_inference_and_the_cache_alone():
    model = enable_activation_checkpointing(model_for(ATTENTIONS["selective"])).eval()
    tokens = torch.randint(0, 32, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        chunks = [model(tokens[:, :7], cache=cache), model(tokens[:, 7:8], cache=cache), model(tokens[:, 8:], cache=cache)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-4, rtol=0)


def test_train_runs_with_activation_checkpointing(tmp_path):
    base = {"model": {"dim": 32, "depth": 2, "heads": 2, "max_seq_len": 32, "attention": {"variant": "selective"}},
            "data": {"name": "shakespeare"},
            "train": {"steps": 3, "batch_size": 2, "seq_len": 32, "warmup": 1, "eval_every": 0, "eval_batches": 1,
                      "checkpoint_every": 0, "log_every": 1, "device": "cpu"}}
    losses = {}
    for flag in (False, True):
        config = load_config({**base, "train": {**base["train"], "activation_checkpointing": flag}})
        train(config, tmp_path / str(flag), progress=False)
        losses[flag] = [r["loss"] for r in read_jsonl(tmp_path / str(flag) / "metrics.jsonl") if r["kind"] == "train"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)


def test_compiled_selective_training_step_matches_eager(monkeypatch):
    """A selective training step under torch.compile on CPU: logits and every gradient as in eager (fp32, 1e-5).

    Compiled with the `aot_eager` backend: dynamo captures the forward graph and AOTAutograd the backward,
    which is what private-API tricks (negated views, stride tricks) break; inductor's CPU code generation on
    top adds ~3 minutes to the suite and tests torch, not us (`train.compile` itself uses the default).

    The backend-choice memo starts empty, as in the training process `train.compile` runs in: dynamo traces the
    memo lookup in `dispatch`, at a cost that grows with the memo, and a test worker's memo holds every attention
    shape its earlier tests used (hundreds: the trace took 20 s in a fresh process and over 10 minutes in the suite)."""
    monkeypatch.setattr(backends, "_chosen", {})
    attention = {"variant": "selective", "kv_heads": 2}
    eager, compiled = model_for(attention), model_for(attention)
    tokens = torch.randint(0, 32, (2, 48), generator=torch.Generator().manual_seed(3))
    eager.eval(), compiled.eval()  # no dropout: compiled and eager RNG streams differ
    out_eager = eager(tokens)
    out_eager.logsumexp(-1).mean().backward()
    out_compiled = torch.compile(compiled, backend="aot_eager")(tokens)
    out_compiled.logsumexp(-1).mean().backward()
    torch.testing.assert_close(out_compiled, out_eager, atol=1e-5, rtol=0)
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5 * max(1.0, b.grad.abs().max().item()), rtol=0, msg=name)
