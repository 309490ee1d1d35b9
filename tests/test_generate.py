"""Generation: sampling options, the cached loop (same tokens as recomputing from scratch), pruning
during generation, the max_seq_len stop, and the `attention-zoo generate` command."""
from __future__ import annotations

import re

import pytest
import torch

from attention_zoo import build_model
from attention_zoo.checkpoint import save_checkpoint
from attention_zoo.cli import main
from attention_zoo.errors import UserError
from attention_zoo.inference import Pruner, Sampler, generate, parse_prune_spec


def tiny_model(attention: dict | None = None, max_seq_len: int = 48, seed: int = 0, position: str = "learned"):
    torch.manual_seed(seed)
    return build_model({"model": {"dim": 32, "depth": 2, "heads": 2, "max_seq_len": max_seq_len, "position": position,
                                  "attention": attention or {"variant": "selective"}}}).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Learned positions, so the position limit can be tested (rope's run past max_seq_len)."""
    return save_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint", tiny_model())  # a run folder's layout


# --------------------------------------------------------------------------- sampling


def test_sampler_options():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert Sampler(temperature=0)(logits).item() == 1
    top2 = {Sampler(top_k=2, seed=s)(logits).item() for s in range(60)}
    assert top2 == {1, 3}
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, 0.03 (sorted): top_p 0.7 keeps the two largest
    assert probs.sort(descending=True).values[0] < 0.7 < probs.sort(descending=True).values[:2].sum()
    assert {Sampler(top_p=0.7, seed=s)(logits).item() for s in range(60)} == {1, 3}
    assert {Sampler(top_p=0.01, seed=s)(logits).item() for s in range(10)} == {1}  # the top token always stays
    draws = [Sampler(seed=7)(logits.repeat(5, 1)).flatten().tolist() for _ in range(2)]
    assert draws[0] == draws[1]  # seeded: reproducible
    Sampler(seed=2**64 - 1)  # torch's largest seed
    for bad in ({"temperature": -1}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(UserError):
            Sampler(**bad)
    # from Python these raised torch's TypeError / RuntimeError when sampling, or (temperature inf) sampled uniformly
    for bad in ({"top_k": 2.5}, {"top_k": True}, {"seed": 1.5}, {"seed": -1}, {"temperature": float("inf")},
                {"temperature": "1"}):
        (name, value), = bad.items()
        with pytest.raises(UserError, match=re.escape(f"--{name.replace('_', '-')} {value}: must be")):
            Sampler(**bad)


def test_a_tiny_temperature_is_greedy_not_a_crash(checkpoint, capsys):
    """logits / 1e-40 overflowed to inf, softmax gave NaN and torch.multinomial raised a RuntimeError (a
    traceback from `generate --temperature 1e-40`, a finite value the CLI accepts)."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 1.0, -2.0, float("-inf")]])
    for temperature in (1e-40, 1e-45):
        assert Sampler(temperature=temperature, seed=0)(logits).flatten().tolist() == [1, 0]
        assert Sampler(temperature=temperature, top_p=0.5, top_k=2, seed=0)(logits).flatten().tolist() == [1, 0]
    assert main(["generate", str(checkpoint), "--prompt", "ab", "--max-tokens", "3", "--temperature", "1e-40"]) == 0
    assert "generated 3 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_logits_that_are_not_numbers_are_named_not_sampled(temperature, bad):
    """NaN or +inf logits (a checkpoint holding NaN weights, an overflow): sampling raised torch's "probability
    tensor contains either inf, nan or element < 0", and greedy decoding silently picked the NaN's index."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [1.0, 0.0, bad, 2.0]])
    with pytest.raises(UserError, match=r"row 1 of the model's logits holds (nan|inf)"):
        Sampler(temperature=temperature, seed=0)(logits)
    with pytest.raises(UserError, match=r"row 0 of the model's logits is -inf everywhere"):
        Sampler(temperature=temperature, seed=0)(torch.full((1, 4), float("-inf")))


# --------------------------------------------------------------------------- the loop


@torch.no_grad()
def test_cached_generation_equals_recomputing_from_scratch():
    model = tiny_model({"variant": "cross_layer_selective", "mode": "accumulate", "residual": True})
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    result = generate(model, prompt, 12, Sampler(temperature=0), prefill_chunk=2)
    seq = prompt
    for _ in range(12):  # no cache: the whole sequence every step
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(result.tokens, seq)
    assert result.generated == 12 and result.stopped == "max_tokens" and result.cache.seen == 5 + 11


def test_generation_stops_once_every_row_has_sampled_a_stop_token():
    """An end-of-sequence id ends generation when every row has sampled one (a row that ended first is sampled on,
    as a batch must be); the stop token is the last one kept. Greedy, so the run without stops says where."""
    model = tiny_model()
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    free = generate(model, prompt, 12, Sampler(temperature=0)).tokens[:, 5:]
    row0, row1 = free.tolist()
    stops = {row0[3], row1[1]}
    first = [next(i for i, t in enumerate(row) if t in stops) for row in (row0, row1)]
    result = generate(model, prompt, 12, Sampler(temperature=0), stop_tokens=stops)
    assert result.stopped == "end_of_sequence" and result.generated == max(first) + 1 < 12
    assert torch.equal(result.tokens[:, 5:], free[:, : max(first) + 1])
    alone = generate(model, prompt[:1], 12, Sampler(temperature=0), stop_tokens=stops)
    assert alone.stopped == "end_of_sequence" and alone.tokens[0, 5:].tolist() == row0[: first[0] + 1]
    assert generate(model, prompt, 12, Sampler(temperature=0), stop_tokens=[]).stopped == "max_tokens"


def test_generation_with_pruning_keeps_the_budget():
    model = tiny_model()
    seen = []
    result = generate(model, torch.randint(0, 256, (1, 6)), 20, Sampler(seed=0),
                      pruner=Pruner(model, parse_prune_spec("budget:8")), on_token=seen.append)
    assert result.cache.lengths() == [8, 8] and len(seen) == 20
    assert torch.equal(torch.cat(seen, 1), result.tokens[:, 6:])


def test_generation_stops_at_max_seq_len():
    model = tiny_model(max_seq_len=10)
    result = generate(model, torch.zeros(1, 4, dtype=torch.long), 50, Sampler(seed=0))
    # positions 0..9 can be fed; the token sampled after position 9 is kept but cannot be fed back
    assert result.stopped == "max_seq_len" and result.tokens.shape[1] == 11 and result.cache.seen == 10
    with pytest.raises(UserError, match="max_seq_len=10"):
        generate(model, torch.zeros(1, 11, dtype=torch.long), 1, Sampler())
    with pytest.raises(UserError, match="empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 1, Sampler())
    with pytest.raises(UserError, match="--prefill-chunk 0: must be >= 1"):  # 0 is not "unset" (None)
        generate(model, torch.zeros(1, 4, dtype=torch.long), 1, Sampler(), prefill_chunk=0)


@pytest.mark.parametrize("prompt,max_tokens,message", [
    (torch.tensor([1, 2, 3]), 2, r"prompt \(3,\): expected a \(batch, tokens\) tensor"),
    ([[1, 2]], 2, "prompt list: expected a \\(batch, tokens\\) tensor"),
    (torch.tensor([[1.0, 2.0]]), 2, "prompt of dtype torch.float32: token ids must be integers"),
    (torch.tensor([[1, 256]]), 2, r"prompt token 256 \(row 0, position 1\) is outside .* \[0, 256\)"),
    (torch.tensor([[1, 2], [3, -1]]), 2, r"prompt token -1 \(row 1, position 1\) is outside"),
    (torch.tensor([[1, 2]]), 2.5, "max_tokens 2.5: must be a whole number >= 0"),
    (torch.tensor([[1, 2]]), None, "max_tokens None: must be a whole number >= 0"),
])
def test_generate_names_a_prompt_or_max_tokens_it_cannot_take(prompt, max_tokens, message):
    """From Python these failed deep in the model: "not enough values to unpack", "index out of range in self",
    "Expected tensor for argument #1 'indices' to have one of the following scalar types", a TypeError."""
    with pytest.raises(UserError, match=message):
        generate(tiny_model(), prompt, max_tokens, Sampler(seed=0))


@pytest.mark.parametrize("position", ["rope", "none"])
def test_generation_runs_past_max_seq_len_without_learned_positions(position):
    model = tiny_model(max_seq_len=10, position=position)
    result = generate(model, torch.zeros(1, 12, dtype=torch.long), 30, Sampler(seed=0))
    assert result.stopped == "max_tokens" and result.tokens.shape[1] == 42 and result.cache.seen == 41


# --------------------------------------------------------------------------- the command


def test_generate_command(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt", "Où est", "--max-tokens", "9", "--seed", "3",
                 "--temperature", "0.8", "--top-k", "20", "--top-p", "0.95", "--prune", "budget:5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Où est")
    assert re.search(r"prompt 7 tokens .*generated 9 tokens in [\d.]+ s \([\d.]+ tokens/s\)", out)
    assert re.search(r"cache: [\d,]+ bytes; kept keys per layer: 5, 5 \(of 15 tokens seen\)", out)
    assert "pruning budget:5" in out
    again = main(["generate", str(checkpoint.parent), "--prompt", "Où est", "--max-tokens", "9", "--seed", "3",
                  "--temperature", "0.8", "--top-k", "20", "--top-p", "0.95", "--prune", "budget:5"])
    assert again == 0 and capsys.readouterr().out.splitlines()[0] == out.splitlines()[0]  # same seed, same text


def test_generate_command_stops_at_the_position_limit(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt", "x" * 40, "--max-tokens", "100", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "generated 9 tokens" in out and "stopped: the model's learned positions end at model.max_seq_len=48" in out


@pytest.mark.parametrize("args,message", [
    (["--prune", "budget:x"], "--prune 'budget:x'"),
    (["--top-p", "2"], "--top-p 2.0: must be in (0, 1]"),
    (["--max-tokens", "-1"], "--max-tokens -1: must be >= 0"),
    # torch's manual_seed takes 64-bit integers: a larger seed raised "Overflow when unpacking long long"
    (["--seed", str(2**64)], f"--seed {2**64}: must be an integer from 0 to 2**64 - 1"),
    (["--seed", str(-(2**63) - 1)], f"--seed {-(2**63) - 1}: must be an integer from 0 to 2**64 - 1"),
    # torch reads a negative seed modulo 2**64: --seed -1 was the run of --seed 18446744073709551615
    (["--seed", "-1"], f"--seed -1: must be an integer from 0 to 2**64 - 1: torch would read -1 as {2**64 - 1}"),
    (["--prompt", "y" * 60], "model.max_seq_len=48"),
    # a policy that cannot apply to this model is named by the flag that gave it (it said only "budget:3,4,5: ...")
    (["--prune", "budget:3,4,5"], "--prune 'budget:3,4,5': 3 budgets for 2 layers"),
    (["--device", "cuda:0"], "CUDA is not available"),
    (["--device", "meta"], "--device 'meta': expected auto, cpu, cuda or cuda:N (or mps"),
    # an empty policy (an unset shell variable: --prune "$POLICY") was taken for no pruning, silently unpruned
    (["--prune", ""], "--prune '': expected POLICY:VALUE"),
    # a window's error said "budget 1 is below 2"
    (["--prune", "window:1"], "--prune 'window:1': window 1 is below 2"),
    # an unknown backend was "1 problem in config: override (on <dict>): backend = 'x'", not naming the flag
    (["--backend", "nosuch"], "--backend 'nosuch': unknown attention backend; valid: auto, "),
])
def test_generate_command_errors(checkpoint, capsys, args, message):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    argv = ["generate", str(checkpoint), "--prompt", "hi", "--max-tokens", "2", *args]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert captured.out == ""  # nothing on stdout, not even the prompt, when generation is refused


def test_generate_names_the_weights_file_that_holds_nan(tmp_path, capsys):
    """The logits check said "non-finite weights in the checkpoint" without naming which: now the file and tensor."""
    model = tiny_model()
    with torch.no_grad():
        model.blocks[1].mlp.down.weight[0, 0] = float("inf")
    save_checkpoint(tmp_path / "checkpoint", model)
    assert main(["generate", str(tmp_path / "checkpoint"), "--prompt", "hi", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: 1 weight tensor(s) hold NaN or infinite values (blocks.1.mlp.down.weight" in err


def test_generate_command_on_a_missing_checkpoint(tmp_path, run_cli):
    result = run_cli("generate", str(tmp_path / "nope"), "--prompt", "hi")
    assert result.returncode == 2 and "not a checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_generate_names_the_window_policy_in_each_layer(checkpoint, capsys):
    """window:K is not the budget policy: the per-layer summary says `window K`, not `budget K`."""
    assert main(["generate", str(checkpoint), "--prompt", "hi", "--max-tokens", "2", "--prune", "window:4"]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("-- pruning"))
    assert line == "-- pruning window:4: layer 0: window 4; layer 1: window 4"


def test_generate_takes_device_auto(checkpoint, capsys):
    """The same --device words as eval: auto is this machine's cuda, else cpu (the prompt goes there too)."""
    assert main(["generate", str(checkpoint), "--prompt", "hi", "--max-tokens", "2", "--device", "auto"]) == 0
    assert "generated 2 tokens" in capsys.readouterr().out
