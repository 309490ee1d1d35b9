"""attention_zoo.hf and the import-hf / export-hf commands against transformers itself.

Nothing is downloaded: every transformers model is built from a config with random weights (tiny: hidden 32,
2 layers, vocab 64) and, where a folder is needed, saved to a temporary one. Logits are compared in float32
with a max absolute difference of 1e-4 (the issue's bar; differences seen are ~1e-7).
"""
from __future__ import annotations

import contextlib
import io
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from attention_zoo import build_model  # noqa: E402
from attention_zoo.checkpoint import load_model  # noqa: E402
from attention_zoo.cli import main  # noqa: E402
from attention_zoo.errors import UserError  # noqa: E402
from attention_zoo.hf import ConversionError, from_hf, pool_kv_heads, register, to_hf  # noqa: E402

TOL = 1e-4
VOCAB = 64


def tiny(family: str, **overrides):
    """A tiny transformers causal LM with random weights (seeded). initializer_range 0.1 (not 0.02) so attention
    logits are large enough for selective attention to change the output measurably. Weights transformers
    initialises to a constant (norm scales 1, biases 0) are made random too: with them constant, a norm or bias
    mapped to the wrong place (a block's two norms swapped, a bias dropped) gave the same logits."""
    return _randomise_constants(_tiny(family, **overrides))


def _randomise_constants(model):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.numel() > 1 and bool((parameter == parameter.flatten()[0]).all()):
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model


def _tiny(family: str, **overrides):
    torch.manual_seed(0)
    llama_like = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.1)
    if family == "llama":
        config = transformers.LlamaConfig(**{"num_key_value_heads": 4, **llama_like, **overrides})
        return transformers.LlamaForCausalLM(config).eval()
    if family == "llama_gqa":
        config = transformers.LlamaConfig(**{"num_key_value_heads": 2, **llama_like, **overrides})
        return transformers.LlamaForCausalLM(config).eval()
    if family == "mistral":
        config = transformers.MistralConfig(**{"num_key_value_heads": 2, "sliding_window": None, **llama_like, **overrides})
        return transformers.MistralForCausalLM(config).eval()
    if family == "qwen2":
        config = transformers.Qwen2Config(**{"num_key_value_heads": 2, "tie_word_embeddings": True, **llama_like,
                                             **overrides})
        return transformers.Qwen2ForCausalLM(config).eval()
    if family == "gpt2":
        config = transformers.GPT2Config(**{"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB,
                                            "n_positions": 64, "initializer_range": 0.1, "bos_token_id": 0,
                                            "eos_token_id": 0, **overrides})
        return transformers.GPT2LMHeadModel(config).eval()
    raise ValueError(family)


FAMILIES = ["llama", "llama_gqa", "mistral", "qwen2", "gpt2"]


def tokens(n: int = 12, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_in_memory_and_from_a_folder(family, tmp_path):
    hf = tiny(family)
    x = tokens()
    expected = logits(hf, x)
    assert expected.std() > 0.05  # a real, non-degenerate model
    hf.save_pretrained(tmp_path / "hf")
    for source in (hf, tmp_path / "hf", str(tmp_path / "hf")):
        zoo = from_hf(source)
        assert max_diff(logits(zoo, x), expected) < TOL, source
    tied = hf.config.tie_word_embeddings
    assert (zoo.lm_head.weight is zoo.token_embedding.weight) == tied
    assert zoo.config["model"]["tie_embeddings"] == tied
    assert zoo.num_parameters() == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_checkpoint_whose_config_ties_embeddings_its_weights_do_not_imports_what_transformers_runs(family, tmp_path):
    """config.json says tie_word_embeddings: true but the file holds an lm_head.weight other than the embedding:
    transformers (5.x) then keeps them apart (a warning our CLI silences) and uses that lm_head. The import tied
    them from the config and dropped the lm_head, a silently different model (max |diff| ~3)."""
    import json

    untied = tiny(family, tie_word_embeddings=False)
    untied.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    x = tokens()
    assert max_diff(logits(hf, x), logits(untied, x)) == 0  # transformers runs the untied model
    for source in (tmp_path / "hf", hf):
        zoo = from_hf(source)
        assert max_diff(logits(zoo, x), logits(hf, x)) < TOL
        assert zoo.config["model"]["tie_embeddings"] is False and zoo.lm_head.weight is not zoo.token_embedding.weight
    assert from_hf(tiny(family, tie_word_embeddings=True)).config["model"]["tie_embeddings"] is True


def test_gqa_checkpoint_becomes_gqa_and_llama_attention_bias_covers_the_output():
    assert from_hf(tiny("llama_gqa")).config["model"]["attention"] == {"variant": "gqa", "kv_heads": 2}
    hf = tiny("llama", attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    zoo = from_hf(hf)
    assert zoo.config["model"]["attention"] == {"variant": "vanilla", "qkv_bias": True, "out_bias": True}
    assert zoo.blocks[0].attention.out_proj.bias is not None and zoo.blocks[0].mlp.up.bias is not None
    x = tokens()
    assert max_diff(logits(zoo, x), logits(hf, x)) < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_to_hf_round_trip(family):
    hf = tiny(family)
    back = to_hf(from_hf(hf))
    expected_class = {"mistral": "LlamaForCausalLM"}.get(family, type(hf).__name__)
    assert type(back).__name__ == expected_class
    x = tokens()
    assert max_diff(logits(back, x), logits(hf, x)) < TOL
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings


def test_a_qwen2_with_its_own_head_dim_exports_and_loads_back(tmp_path):
    """transformers' Qwen2 reads config.head_dim (here 16 where hidden / heads is 8): the import reproduced it, but
    the export refused it ("Qwen2 needs head_dim * heads == dim"), so such a checkpoint could not go back."""
    hf = tiny("qwen2", head_dim=16)
    zoo = from_hf(hf)
    assert zoo.config["model"]["head_dim"] == 16
    to_hf(zoo).save_pretrained(tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", local_files_only=True).eval()
    assert type(back).__name__ == "Qwen2ForCausalLM" and back.config.head_dim == 16
    x = tokens()
    assert max_diff(logits(back, x), logits(hf, x)) < TOL


def test_export_hf_folder_loads_with_from_pretrained(tmp_path, capsys):
    hf = tiny("qwen2")
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "zoo")]) == 0
    assert main(["export-hf", str(tmp_path / "zoo"), "--out", str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", local_files_only=True).eval()
    assert type(back).__name__ == "Qwen2ForCausalLM"
    x = tokens()
    assert max_diff(logits(back, x), logits(hf, x)) < TOL


def test_export_keeps_the_checkpoints_special_tokens_and_invents_none(tmp_path, capsys):
    """config.json got the config class's defaults (Llama bos 1 / eos 2, GPT-2 50256: outside a 256-token vocabulary,
    a warning on every load; transformers' generate stopped at token 2) instead of the imported checkpoint's ids."""
    hf = tiny("llama", bos_token_id=5, eos_token_id=[7, 9], pad_token_id=3)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "zoo")]) == 0
    assert main(["export-hf", str(tmp_path / "zoo"), "--out", str(tmp_path / "back")]) == 0
    back = transformers.AutoConfig.from_pretrained(tmp_path / "back", local_files_only=True)
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (5, [7, 9], 3)
    gpt2_stack = {"position": "learned", "norm": "layernorm", "mlp": "gelu_tanh", "mlp_bias": True,
                  "attention": {"variant": "vanilla", "qkv_bias": True, "out_bias": True}}
    for stack in ({}, gpt2_stack):  # a zoo model knows no special tokens
        exported = to_hf(build_model({"model": {"dim": 32, "depth": 1, "heads": 2, **stack}}))
        assert (exported.config.bos_token_id, exported.config.eos_token_id) == (None, None), stack
        assert exported.generation_config.eos_token_id is None


def test_special_tokens_of_a_checkpoint_without_generation_config_survive_import_and_export(tmp_path, capsys):
    """A folder saved before transformers wrote generation_config.json keeps bos / eos / pad in config.json alone
    (transformers derives its generation config from them). The import copied no generation file, so `generate`
    never stopped at the end-of-sequence token and the export wrote eos_token_id null."""
    from attention_zoo.hf.files import end_of_sequence_ids

    tiny("llama", bos_token_id=5, eos_token_id=7).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").unlink()
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").generation_config.eos_token_id == 7
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "zoo")]) == 0
    assert "generation_config.json (written from config.json's special tokens)" in capsys.readouterr().out
    assert end_of_sequence_ids(tmp_path / "zoo") == [7]
    assert main(["export-hf", str(tmp_path / "zoo"), "--out", str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", local_files_only=True)
    assert (back.config.bos_token_id, back.config.eos_token_id) == (5, 7)
    assert back.generation_config.eos_token_id == 7
    tiny("llama", bos_token_id=None, eos_token_id=None).save_pretrained(tmp_path / "none")
    (tmp_path / "none" / "generation_config.json").unlink()
    assert main(["import-hf", str(tmp_path / "none"), "--out", str(tmp_path / "zoo2")]) == 0
    assert not (tmp_path / "zoo2" / "generation_config.json").exists()  # none invented


def test_export_hf_refuses_an_out_it_would_destroy_and_writes_atomically(tmp_path, capsys, monkeypatch):
    """--out may be new, empty or (with --overwrite) an earlier export, replaced whole; a zoo checkpoint or run (the source itself
    included), a folder with other files or a file is refused before any work; a failed export leaves nothing."""
    from attention_zoo.checkpoint import save_checkpoint

    zoo = save_checkpoint(tmp_path / "run" / "checkpoint", from_hf(tiny("llama")))
    weights = (zoo / "model.safetensors").read_bytes()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    for out, message in ((zoo, "is a zoo checkpoint or run folder"), (tmp_path / "run", "is a zoo checkpoint or run"),
                         (tmp_path / "other", "is not an earlier export (it holds notes.txt)"),
                         (tmp_path / "file", "is a file")):
        code = main(["export-hf", str(tmp_path / "run"), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"attention-zoo export-hf: error: --out {out}: "), err
        assert message in err and err.count("error:") == 1, err
    assert (zoo / "model.safetensors").read_bytes() == weights and sorted(p.name for p in zoo.iterdir()) == [
        "config.yaml", "model.safetensors"]
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me" and (tmp_path / "file").read_text() == "x"

    out = tmp_path / "exported"
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(out)]) == 0
    first = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(out)]) == 2  # a transformers model: kept
    err = capsys.readouterr().err
    assert "holds a transformers model" in err and "add --overwrite to replace it" in err
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(out), "--overwrite"]) == 0  # replaced when asked
    assert (out / "model.safetensors").read_bytes() == first

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("attention_zoo.hf.files.copy_tokenizer_files", broken)
    with pytest.raises(OSError, match="disk full"):
        main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "half")])
    with pytest.raises(OSError, match="disk full"):
        main(["export-hf", str(tmp_path / "run"), "--out", str(out), "--overwrite"])
    assert not (tmp_path / "half").exists() and (out / "model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "file", "other", "run"]  # no temp folders


def test_import_hf_writes_a_checkpoint_load_model_reads(tmp_path, capsys):
    hf = tiny("llama_gqa")
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")  # tokenizer files travel with the checkpoint
    code = main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "zoo")])
    assert code == 0
    assert (tmp_path / "zoo" / "tokenizer_config.json").is_file()
    zoo = load_model(tmp_path / "zoo")
    x = tokens()
    assert max_diff(logits(zoo, x), logits(hf, x)) < TOL


def test_import_hf_replaces_only_an_earlier_import_and_never_a_training_run(tmp_path, capsys):
    """An import would replace --out whole: a run's checkpoint (its state.pt: --resume would start over) is
    refused even with --overwrite; an earlier import only with --overwrite; the refused folders are untouched."""
    tiny("llama").save_pretrained(tmp_path / "hf")
    zoo = tmp_path / "zoo"
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(zoo)]) == 0
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(zoo)]) == 2
    assert "holds a zoo checkpoint (an earlier import); add --overwrite" in capsys.readouterr().err
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(zoo), "--overwrite"]) == 0
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    for name in ("config.yaml", "model.safetensors", "state.pt"):
        (run / "checkpoint" / name).write_text("kept")
    for target in (run, run / "checkpoint"):
        capsys.readouterr()
        assert main(["import-hf", str(tmp_path / "hf"), "--out", str(target), "--overwrite"]) == 2
        assert "holds a training run or its checkpoint (state.pt)" in capsys.readouterr().err
    assert {p.read_text() for p in (run / "checkpoint").iterdir()} == {"kept"}


def test_an_interrupted_import_leaves_nothing(tmp_path, capsys, monkeypatch):
    """The tokenizer files were copied after the checkpoint was in place: an interrupt between left a checkpoint
    without them (and a config.yaml not naming them). Now the whole folder appears at once or not at all."""
    import attention_zoo.checkpoint as checkpoint

    tiny("llama").save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")

    def interrupted(folder, model, training_state=None):
        assert (folder / "tokenizer_config.json").is_file()  # copied into the staging folder first
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_checkpoint", interrupted)
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "zoo")]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_gpt2_weights_saved_with_its_mask_buffers_import(tmp_path, capsys):
    """Older transformers saved GPT-2's attn.bias / attn.masked_bias buffers with the weights; today's class
    rebuilds them, so the load lists them as unexpected: not weights, so no refusal (there was one)."""
    from safetensors.torch import load_file, save_file

    hf = tiny("gpt2")
    hf.save_pretrained(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    for layer in range(2):
        weights[f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "zoo")]) == 0, capsys.readouterr().err
    x = tokens()
    assert max_diff(logits(load_model(tmp_path / "zoo"), x), logits(hf, x)) < TOL


def test_import_hf_never_replaces_a_link_or_a_runs_checkpoint_that_lost_its_state(tmp_path, capsys):
    tiny("llama").save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "zoo")]) == 0
    (tmp_path / "link").symlink_to(tmp_path / "zoo")
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "link"), "--overwrite"]) == 2
    assert "a symbolic link; give the folder it points to" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    for name in ("config.yaml", "model.safetensors"):  # state.pt lost: it still belongs to a run
        (run / "checkpoint" / name).write_text("kept")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(run / "checkpoint"), "--overwrite"]) == 2
    assert "holds a training run or its checkpoint" in capsys.readouterr().err
    assert (tmp_path / "link").is_symlink() and (run / "checkpoint" / "config.yaml").read_text() == "kept"


def test_a_truncated_or_corrupt_weight_file_is_named(tmp_path, capsys):
    """An interrupted download leaves one shard truncated: the message named the folder and safetensors' "incomplete
    metadata, file not fully covered", not which of the shards (or the index) to fetch again."""
    tiny("llama").save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].write_bytes(shards[1].read_bytes()[:-100])
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "zoo")]) == 2
    err = capsys.readouterr().err
    assert f"{shards[1]}: cannot be read (SafetensorError: " in err and "file not fully covered" in err, err
    assert err.count("error:") == 1 and not (tmp_path / "zoo").exists()
    index = tmp_path / "hf" / "model.safetensors.index.json"
    index.write_text("{")
    with pytest.raises(ConversionError, match=re.escape(f"{index}: cannot be read (JSONDecodeError: ")):
        from_hf(tmp_path / "hf")
    (tmp_path / "bin").mkdir()
    tiny("llama").config.save_pretrained(tmp_path / "bin")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ConversionError, match=re.escape(f"{tmp_path / 'bin' / 'pytorch_model.bin'}: cannot be read (")):
        from_hf(tmp_path / "bin")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"garbage")  # torch's first line: "re-run with weights_only=False"
    with pytest.raises(ConversionError, match=re.escape("pytorch_model.bin: cannot be read (not a file of tensors "
                                                        "torch.load(weights_only=True) reads: Unsupported operand")):
        from_hf(tmp_path / "bin")


def test_weights_holding_nan_or_inf_are_refused_by_name(tmp_path, capsys):
    """A damaged checkpoint whose weights hold NaN (transformers loads it as it is) imported without a word: every
    logit NaN, and a fine-tune starting from it."""
    from safetensors.torch import load_file, save_file

    tiny("llama").save_pretrained(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][0, :3] = float("nan")
    weights["model.norm.weight"][0] = float("inf")
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "zoo")]) == 2
    err = capsys.readouterr().err
    assert ("2 weights hold NaN or infinite values (model.layers.1.mlp.up_proj.weight (3 values), model.norm.weight "
            "(1 value))") in err, err
    assert err.count("error:") == 1 and not (tmp_path / "zoo").exists()


@pytest.mark.parametrize("family, change, message", [
    ("llama", {"num_hidden_layers": 3}, "9 weights missing from the checkpoint (layer 2)"),
    ("llama", {"num_hidden_layers": None}, "weights missing from the checkpoint (layers 2-31)"),  # the default 32
    ("llama", {"num_hidden_layers": 1}, "9 weights in the checkpoint that config.json has no place for (layer 1)"),
    ("llama", {"hidden_size": 48}, "weights of another shape (lm_head.weight (64, 32) where config.json makes (64, 48), "),
    # transformers itself leaves c_attn.bias out of GPT-2's unexpected keys (its "attn.bias" pattern matches it): 11
    ("gpt2", {"n_layer": 1}, "weights in the checkpoint that config.json has no place for (layer 1)"),
])
def test_import_hf_refuses_weights_that_do_not_match_config_json(tmp_path, capsys, family, change, message):
    """transformers fills what config.json asks for and the weights lack with random values (and drops or
    re-initialises the rest) after a warning we silence: the import refuses instead of keeping them."""
    import json

    tiny(family).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key, value in change.items():
        config.pop(key) if value is None else config.__setitem__(key, value)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "zoo")]) == 2
    err = capsys.readouterr().err
    assert "the weights do not match config.json" in err and message in err, err
    assert not (tmp_path / "zoo").exists()


def test_only_the_mask_buffers_old_checkpoints_hold_are_left_out_of_the_unexpected_weights():
    """The buffers were matched by suffix alone: GPT-2's q/k/v bias c_attn.bias ends in "attn.bias" too, so an
    unexpected c_attn.bias was not reported (and alone, not at all)."""
    from attention_zoo.hf.convert import weight_problems

    saved_buffers = ["transformer.h.0.attn.bias", "transformer.h.0.attn.masked_bias",
                     "model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert weight_problems({"unexpected_keys": saved_buffers}) == []
    assert weight_problems({"unexpected_keys": ["transformer.h.2.attn.c_attn.bias", *saved_buffers]}) == [
        "1 weights in the checkpoint that config.json has no place for (layer 2)"]


def test_selective_conversion_same_parameters_new_logits_and_cached_decoding_matches():
    hf = tiny("llama")
    x = tokens(16)
    vanilla, selective = from_hf(hf), from_hf(hf, variant="selective")
    assert selective.config["model"]["attention"]["variant"] == "selective"
    assert selective.num_parameters() == vanilla.num_parameters()
    full = logits(selective, x)
    assert max_diff(full, logits(vanilla, x)) > 1e-2  # the penalty changes what the model computes
    # the zoo's cache carries selective's accumulator: prefill 5 tokens, then one token at a time
    cache = selective.new_cache()
    with torch.no_grad():
        steps = [selective(x[:, :5], cache=cache)] + [selective(x[:, i:i + 1], cache=cache) for i in range(5, 16)]
    assert max_diff(torch.cat(steps, dim=1), full) < TOL


@pytest.mark.parametrize("variant", ["vanilla", "selective", "residual", "differential", "cross_layer_selective"])
def test_every_variant_with_defaults_runs_on_the_checkpoints_weights(variant):
    hf = tiny("llama")
    zoo = from_hf(hf, variant=variant)
    reference = from_hf(hf)
    own = {k: v for k, v in reference.state_dict().items()}
    for key, value in zoo.state_dict().items():
        if key in own:
            assert torch.equal(value, own[key]), key  # the checkpoint's weights, unchanged
    assert torch.isfinite(logits(zoo, tokens())).all()


def test_variant_params_reach_the_variant_and_bad_ones_are_named():
    zoo = from_hf(tiny("llama"), variant="selective", selection_head=2)
    assert zoo.blocks[0].attention.selection_head == 2
    with pytest.raises(ValueError, match="selection_head"):
        from_hf(tiny("llama"), variant="selective", selection_head=9)


def _hand_pooled_llama(hf, groups: int, bias: bool):
    """A transformers Llama with `groups` kv heads whose k/v weights (and biases) are the means of consecutive
    groups of `hf`'s kv heads, pooled here by hand with plain reshapes."""
    config = hf.config.to_dict()
    config.update(num_key_value_heads=groups)
    pooled = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    state = hf.state_dict()
    heads, head_dim = hf.config.num_key_value_heads, hf.config.hidden_size // hf.config.num_attention_heads
    for key, value in state.items():
        if ".k_proj." in key or ".v_proj." in key:
            state[key] = value.reshape(groups, heads // groups, head_dim, *value.shape[1:]).mean(dim=1).reshape(
                groups * head_dim, *value.shape[1:])
    pooled.load_state_dict(state)
    return pooled


@pytest.mark.parametrize("bias", [False, True])
def test_kv_head_pooling_equals_a_hand_pooled_transformers_model(bias):
    hf = tiny("llama", attention_bias=bias)  # 4 kv heads
    x = tokens()
    for groups in (2, 1):
        zoo = from_hf(hf, kv_heads=groups)
        assert zoo.config["model"]["attention"]["kv_heads"] == groups
        assert zoo.config["model"]["attention"]["variant"] == "gqa"
        assert max_diff(logits(zoo, x), logits(_hand_pooled_llama(hf, groups, bias), x)) < TOL
    assert max_diff(logits(from_hf(hf, kv_heads=2), x), logits(hf, x)) > 1e-3  # pooling is a real change


def test_pool_kv_heads_order():
    w = torch.arange(4.0).repeat_interleave(3)[:, None]  # 4 heads of head_dim 3, head i all i
    assert pool_kv_heads(w, 4, 2).flatten().tolist() == [0.5] * 3 + [2.5] * 3


def test_kv_heads_selective_and_gqa_together():
    zoo = from_hf(tiny("llama_gqa"), variant="selective", kv_heads=1)
    assert zoo.config["model"]["attention"] == {"variant": "selective", "kv_heads": 1}


@pytest.mark.parametrize("make,match", [
    (lambda: tiny("mistral", sliding_window=16), re.escape("MistralConfig.sliding_window = 16: sliding-window "
                                                           "attention is not implemented (up to 16 tokens it is full "
                                                           "attention: with sliding_window null in config.json")),
    (lambda: tiny("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1),
     re.escape("Qwen2Config.layer_types = ['full_attention', 'sliding_attention']: layer 1 runs 'sliding_attention' "
               "(sliding_window 8); only full attention is implemented")),
    (lambda: tiny("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope_type"),
    (lambda: tiny("llama", hidden_act="gelu"), "hidden_act"),
    (lambda: transformers.LlamaModel(tiny("llama").config),  # was "expected weight 'model.embed_tokens.weight' is missing"
     re.escape("LlamaModel: not a causal language model with its head; from_hf takes a LlamaForCausalLM")),
    (lambda: transformers.GPT2Model(tiny("gpt2").config), "GPT2Model: not a causal language model.*GPT2LMHeadModel"),
    (lambda: tiny("gpt2", activation_function="relu"), "activation_function"),
    (lambda: tiny("gpt2", scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (lambda: transformers.OPTForCausalLM(transformers.OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                                                num_attention_heads=2, vocab_size=VOCAB,
                                                                word_embed_proj_dim=16)), "unsupported architecture"),
])
def test_what_the_zoo_cannot_reproduce_is_refused_by_name(make, match):
    with pytest.raises(ConversionError, match=match):
        from_hf(make())


def test_a_qwen2_sliding_window_no_layer_uses_is_no_reason_to_refuse():
    """Qwen2 slides only from layer max_window_layers on (its layer_types): with use_sliding_window true and
    max_window_layers >= num_hidden_layers transformers runs full attention everywhere, the same logits as without
    a window; the import refused it ('sliding-window attention is not implemented')."""
    hf = tiny("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert hf.config.sliding_window == 8 and set(hf.config.layer_types) == {"full_attention"}
    x = tokens(24)  # longer than the window
    assert max_diff(logits(from_hf(hf), x), logits(hf, x)) < TOL
    assert max_diff(logits(hf, x), logits(tiny("qwen2"), x)) == 0  # the window changes nothing in transformers


def test_kv_heads_must_divide_the_checkpoints():
    with pytest.raises(ConversionError, match="kv_heads = 3.*valid: 1, 2, 4"):
        from_hf(tiny("llama"), kv_heads=3)
    with pytest.raises(ConversionError, match="valid: 1, 2"):
        from_hf(tiny("llama_gqa"), kv_heads=4)  # pooling cannot add heads


def test_to_hf_refuses_what_transformers_cannot_run():
    with pytest.raises(ConversionError, match="variant 'selective'"):
        to_hf(from_hf(tiny("llama"), variant="selective"))
    with pytest.raises(ConversionError, match="qk_norm"):
        to_hf(from_hf(tiny("llama"), qk_norm=True))


@pytest.mark.parametrize("biases, message", [
    ({"mlp_bias": True}, "this model has none where model.attention.qkv_bias and model.attention.out_bias are false"),
    ({"attention": {"variant": "vanilla", "qkv_bias": True, "out_bias": True}},
     "this model has none where model.mlp_bias is false"),
    ({}, "where model.attention.qkv_bias and model.attention.out_bias and model.mlp_bias are false")])
def test_a_gpt2_stack_without_its_biases_names_the_keys_that_are_false(biases, message):
    """(The message asked for mlp_bias on a model that had it, and named no key path.)"""
    model = build_model({"model": {"dim": 32, "depth": 1, "heads": 2, "position": "learned", "norm": "layernorm",
                                   "mlp": "gelu", **biases}})
    with pytest.raises(ConversionError, match=re.escape(message)):
        to_hf(model)


# -- register(): zoo attention inside stock transformers models ---------------------------------------------

@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny("llama_gqa").save_pretrained(path)
    return path


def stock(path, implementation: str):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=implementation,
                                                             local_files_only=True).eval()


def test_register_names_the_single_layer_variants():
    names = register()
    assert {"zoo_vanilla", "zoo_gqa", "zoo_selective"} <= set(names)
    assert not {"zoo_residual", "zoo_cross_layer_selective", "zoo_differential"} & set(names)  # cross-layer / own params


def test_a_bias_made_from_the_layer_input_is_not_offered_to_transformers(isolated_registry):
    """transformers' attention call has no layer input and no zoo positions: a variant whose attention_bias
    names them was offered as zoo_<name> and failed at its first call (TypeError)."""
    from attention_zoo import ProjectedAttention, register_variant
    from attention_zoo.hf.interface import runs_inside_transformers

    @register_variant("zoo_test_position_bias")
    class PositionBias(ProjectedAttention):
        params = {**ProjectedAttention.params}

        def attention_bias(self, q, k, state, cache, positions):
            return None, {}

    assert not runs_inside_transformers("zoo_test_position_bias") and runs_inside_transformers("vanilla")


def test_registered_vanilla_gives_transformers_logits_and_selective_the_zoo_models(llama_folder):
    register()
    x = tokens(16)
    reference = logits(stock(llama_folder, "eager"), x)
    assert max_diff(logits(stock(llama_folder, "zoo_vanilla"), x), reference) < TOL
    selective = logits(stock(llama_folder, "zoo_selective"), x)
    assert max_diff(selective, logits(from_hf(llama_folder, variant="selective"), x)) < TOL
    assert max_diff(selective, reference) > 1e-2


def test_registered_attention_reads_zoo_attention_when_it_changes(llama_folder):
    """config.zoo_attention set after the first forward was ignored (the layer was built once, with what it held
    then), and an invalid value set then was accepted silently."""
    from attention_zoo.hf.errors import ConversionError

    register()
    x = tokens(16)
    model = stock(llama_folder, "zoo_selective")
    logits(model, x)
    model.config.zoo_attention = {"selection_head": 1}
    assert max_diff(logits(model, x), logits(from_hf(llama_folder, variant="selective", selection_head=1), x)) < TOL
    model.config.zoo_attention = {"selection_head": 99}
    with pytest.raises(ConversionError, match="selection_head = 99"):
        logits(model, x)


def test_registered_attention_refuses_to_train_without_the_models_attention_dropout(tmp_path):
    """GPT-2 (attn_pdrop 0.1 by default) loaded with a zoo attention trained silently without attention dropout
    (transformers passes it in training mode only; the zoo's backends have none)."""
    register()
    tiny("gpt2").save_pretrained(tmp_path / "gpt2")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", attn_implementation="zoo_vanilla",
                                                              local_files_only=True)
    assert model.config.attn_pdrop == 0.1
    x = tokens()
    model.train()
    with pytest.raises(ConversionError, match=re.escape("attn_implementation='zoo_vanilla' applies no attention "
                                                        "dropout, and this model asks for 0.1 in training mode")):
        model(x, labels=x)
    model.eval()
    assert max_diff(logits(model, x), logits(tiny("gpt2"), x)) < TOL
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", attn_implementation="zoo_vanilla",
                                                              attn_pdrop=0.0, local_files_only=True).train()
    assert torch.isfinite(model(x, labels=x).loss)


def test_from_hf_of_a_model_running_registered_attention_converts_what_it_computes(llama_folder):
    """from_hf(model) of a model loaded with attn_implementation="zoo_selective" returned a vanilla zoo model:
    silently other logits than the model passed in (max |diff| ~1)."""
    register()
    x = tokens(16)
    model = stock(llama_folder, "zoo_selective")
    model.config.zoo_attention = {"selection_head": 1}
    zoo = from_hf(model)
    assert zoo.config["model"]["attention"] == {"variant": "selective", "kv_heads": 2, "selection_head": 1}
    assert max_diff(logits(zoo, x), logits(model, x)) < TOL
    assert from_hf(model, variant="selective", selection_head=0).blocks[0].attention.selection_head == 0
    vanilla = from_hf(model, variant="vanilla")  # another variant, asked for: as asked
    assert max_diff(logits(vanilla, x), logits(stock(llama_folder, "eager"), x)) < TOL


@pytest.mark.parametrize("implementation", ["zoo_vanilla", "zoo_selective"])
def test_registered_attention_is_causal(llama_folder, implementation):
    register()
    model = stock(llama_folder, implementation)
    x = tokens(16)
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % VOCAB
    a, b = logits(model, x), logits(model, changed)
    assert max_diff(a[:, :10], b[:, :10]) == 0.0  # earlier positions never see later tokens
    assert max_diff(a[:, 10:], b[:, 10:]) > 1e-3


def test_registered_attention_honours_padding(llama_folder):
    register()
    model = stock(llama_folder, "zoo_vanilla")
    x = tokens(8, batch=1)
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), x), dim=1)
    mask = torch.cat((torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)), dim=1)
    position_ids = torch.cat((torch.zeros(1, 3, dtype=torch.long), torch.arange(8)[None]), dim=1)
    with torch.no_grad():
        out = model(padded, attention_mask=mask, position_ids=position_ids).logits[:, 3:]
    assert max_diff(out, logits(model, x)) < TOL


def test_generating_with_registered_selective_points_to_the_zoo_cache(llama_folder):
    register()
    model = stock(llama_folder, "zoo_selective")
    with pytest.raises(NotImplementedError, match="from_hf"):
        model.generate(tokens(4, batch=1), max_new_tokens=3, do_sample=False)
    register()
    vanilla = stock(llama_folder, "zoo_vanilla")  # vanilla needs no accumulator: HF's cache serves it
    out = vanilla.generate(tokens(4, batch=1), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


# -- train.init_from ---------------------------------------------------------------------------------------

def test_train_init_from_starts_from_the_imported_weights(tmp_path, capsys):
    hf = tiny("llama", vocab_size=256)  # the byte-level Shakespeare corpus has 256 tokens
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "zoo"), "--variant", "selective"]) == 0
    config = str(tmp_path / "zoo" / "config.yaml")
    tiny_run = ["train.steps=1", "train.seq_len=16", "train.batch_size=2", "train.eval_batches=1", "train.warmup=0",
                "--no-progress"]
    # lr 0: the one step changes nothing, so the run's checkpoint holds exactly the imported weights
    assert main(["train", config, "--out", str(tmp_path / "run"), f"train.init_from={tmp_path / 'zoo'}",
                 "train.lr=0", *tiny_run]) == 0
    assert f"weights from {tmp_path / 'zoo'}" in capsys.readouterr().out  # the run's header says where it starts
    trained, imported = load_model(tmp_path / "run" / "checkpoint"), load_model(tmp_path / "zoo")
    x = tokens()
    assert max_diff(logits(trained, x), logits(imported, x)) == 0.0
    code = main(["train", config, "--out", str(tmp_path / "bad"), f"train.init_from={tmp_path / 'zoo'}",
                 "model.attention.variant=vanilla", "model.depth=3", *tiny_run])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.attention.variant: checkpoint 'selective', config 'vanilla'" in err
    assert "model.depth: checkpoint 2, config 3" in err
    code = main(["train", config, "--out", str(tmp_path / "bad2"), f"train.init_from={tmp_path / 'nothing'}", *tiny_run])
    assert code == 2 and "not a checkpoint folder" in capsys.readouterr().err


# -- CLI errors: one message, exit 2, no traceback ---------------------------------------------------------

def test_cli_errors_exit_2_with_one_message(tmp_path, capsys, monkeypatch):
    """In-process through cli.main (an exception escaping it would fail the test), then one subprocess run
    for the exit code and the absence of a traceback as a user sees them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                                             num_attention_heads=2, vocab_size=VOCAB,
                                                             word_embed_proj_dim=16))
    opt.save_pretrained(tmp_path / "opt")
    tiny("llama").save_pretrained(tmp_path / "llama")
    assert main(["import-hf", "llama", "--out", "sel", "--variant", "selective"]) == 0
    cases = [(("import-hf", "missing", "--out", "z"), "missing: no such folder"),
             (("import-hf", "llama/config.json", "--out", "z"), "llama/config.json: a file; give the transformers "
              "checkpoint folder that holds config.json and the weights (llama?)"),
             (("import-hf", "empty", "--out", "z"), "empty: not a transformers checkpoint folder: no config.json (it holds "
              "nothing)"),
             (("import-hf", "sel", "--out", "z"), "sel: a zoo checkpoint (config.yaml), not a transformers folder"),
             (("import-hf", "opt", "--out", "z"), "unsupported architecture OPTForCausalLM"),
             (("import-hf", "llama", "--out", "z", "--kv-heads", "3"), "kv_heads = 3"),
             (("import-hf", "llama", "--out", "z", "--variant", "nope"), "unknown variant"),
             (("export-hf", "missing", "--out", "h"), "missing: not a checkpoint"),
             (("eval", "llama"), "llama: not a checkpoint or run folder (expected config.yaml and model.safetensors, or "
              "a checkpoint/ folder holding them); it holds a transformers model (config.json): convert it first, "
              "attention-zoo import-hf llama --out FOLDER"),
             (("export-hf", "llama", "--out", "h"), "it holds a transformers model (config.json): convert it first"),
             (("export-hf", "sel", "--out", "h"), "variant 'selective'"),
             (("import-hf", "llama", "--out", "opt"), "exists and is not an earlier import")]
    capsys.readouterr()
    for argv, message in cases:
        code = main(list(argv))
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert message in err and err.startswith(f"attention-zoo {argv[0]}: error: ") and err.count("error:") == 1, err
    assert not (tmp_path / "z").exists() and not (tmp_path / "h").exists()
    result = subprocess.run([sys.executable, "-m", "attention_zoo", "import-hf", "opt", "--out", "z"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "unsupported architecture OPTForCausalLM" in result.stderr
    assert "Traceback" not in result.stderr


# -- docs/hf.md runs as written (tiny budgets), up to the section on users' own checkpoints --------------------

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["train.steps=2", "train.seq_len=32", "train.batch_size=4", "train.eval_batches=1", "train.eval_every=0",
              "train.checkpoint_every=0", "train.warmup=0", "--no-progress"]


def doc_steps() -> list[tuple[str, object]]:
    """('python', code) for heredoc scripts and python blocks, ('cli', argv) for attention-zoo lines, in order."""
    text = (ROOT / "docs" / "hf.md").read_text().split("## Your own checkpoint")[0]
    steps: list[tuple[str, object]] = []
    for lang, block in re.findall(r"```(bash|python)\n(.*?)```", text, flags=re.S):
        if lang == "python":
            steps.append(("python", block))
            continue
        lines = block.splitlines()
        while lines:
            line = lines.pop(0).split(" #")[0].strip()
            if line.startswith("python - <<'EOF'"):
                end = lines.index("EOF")
                steps.append(("python", "\n".join(lines[:end])))
                lines = lines[end + 1:]
            elif line.startswith("attention-zoo "):
                steps.append(("cli", shlex.split(line)[1:]))
            elif line:
                raise AssertionError(f"docs/hf.md: unexpected shell line {line!r}")
    return steps


def test_hf_doc_runs_as_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    steps, printed = doc_steps(), ""
    assert [s for kind, s in steps if kind == "cli" and s[0] in ("import-hf", "train", "eval", "export-hf")]
    for kind, step in steps:
        if kind == "python":  # in-process (a subprocess would import torch and transformers again)
            output = io.StringIO()
            with contextlib.redirect_stdout(output):
                exec(compile(step, "docs/hf.md", "exec"), {"__name__": "hf_doc"})
            printed += output.getvalue()
            continue
        argv = list(step)
        if argv[0] == "train":
            argv += TINY_TRAIN
        elif argv[0] == "eval":
            argv += ["--batches", "1"]
        assert main(argv) == 0, f"docs/hf.md: `attention-zoo {' '.join(step)}` failed:\n{capsys.readouterr().err}"
    difference = re.search(r"LlamaForCausalLM max \|logits difference\|: (\S+)", printed)
    assert difference and float(difference.group(1)) < TOL  # the exported folder computes what the run computes


# -- data.tokenizer: corpora tokenized with a local transformers tokenizer -------------------------------------

@pytest.fixture(scope="module")
def tokenized_llama(tmp_path_factory):
    """A folder with a byte-level BPE tokenizer (300 tokens, trained here on a slice of Hamlet) and a tiny Llama of
    that vocabulary, plus `small.txt`, 40 kB of Hamlet for data.text."""
    from attention_zoo.data.corpus import shakespeare_works
    from tests.tiny_tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tokenized")
    text = shakespeare_works()["hamlet"][:40_000]
    (path / "small.txt").write_bytes(text)
    tokenizer = train_bpe(text.decode(), bos_token="<s>")
    tokenizer.save_pretrained(path / "llm")
    tiny("llama", vocab_size=len(tokenizer)).save_pretrained(path / "llm")
    return path


def test_tokenized_corpus_round_trips_and_caches_its_tokens(tokenized_llama, tmp_path, monkeypatch):
    from attention_zoo.data import build_dataset, tokenized

    spec = {"text": str(tokenized_llama / "small.txt"), "tokenizer": str(tokenized_llama / "llm")}
    plain = build_dataset({"text": spec["text"]})
    data = build_dataset(spec, cache_dir=tmp_path / "tokens")
    assert data.vocab_size == 300 and data.data["train"].dtype == torch.int32
    for split in ("train", "val"):
        text = bytes(plain.data[split].numpy().tobytes())
        assert data.decode(data.data[split]).encode() == text  # byte-level BPE: lossless
        assert data.bytes_per_token[split] == pytest.approx(len(text) / data.data[split].numel())
        assert data.bytes_per_token[split] > 1.3  # a real tokenization, not bytes
    assert len(list((tmp_path / "tokens").glob("*.pt"))) == 3
    monkeypatch.setattr(tokenized, "tokenize", lambda *a: pytest.fail("cached token files were not reused"))
    again = build_dataset(spec, cache_dir=tmp_path / "tokens")
    assert torch.equal(again.data["val"], data.data["val"])


def test_bits_per_byte_counts_the_bytes_a_token_stands_for(tokenized_llama):
    """A model with uniform logits loses ln(V) nats per token: that is log2(V) / (bytes per token) bits per byte,
    and 8 bits per byte on the byte-level corpus (V = 256, one byte per token)."""
    from attention_zoo.data import build_dataset
    from attention_zoo.train.metrics import evaluate

    class Uniform(torch.nn.Module):
        def __init__(self, vocab):
            super().__init__()
            self.vocab = vocab

        def forward(self, tokens):
            return torch.zeros(*tokens.shape, self.vocab)

    text = str(tokenized_llama / "small.txt")
    data = build_dataset({"text": text, "tokenizer": str(tokenized_llama / "llm")})
    metrics = evaluate(Uniform(300), data, "val", 2, 32, 2, torch.device("cpu"))
    assert metrics["bpb"] == pytest.approx(math.log2(300) / data.bytes_per_token["val"], rel=1e-6)
    assert evaluate(Uniform(256), build_dataset({"text": text}), "val", 2, 32, 2, torch.device("cpu"))["bpb"] == \
        pytest.approx(8.0, rel=1e-6)


def test_import_hf_brings_its_tokenizer_to_train_eval_and_generate(tokenized_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["import-hf", str(tokenized_llama / "llm"), "--out", "zoo", "--variant", "selective"]) == 0
    assert "data.tokenizer" in capsys.readouterr().out
    zoo = load_model("zoo")
    assert Path(zoo.config["data"]["tokenizer"]) == (tmp_path / "zoo").resolve()
    text = str(tokenized_llama / "small.txt")
    assert main(["train", "zoo", "--out", "run", "train.init_from=zoo", "data.name=text", f"data.text={text}",
                 *TINY_TRAIN]) == 0
    assert "(zoo tokens)" in capsys.readouterr().out
    cached = sorted((tmp_path / "run" / "tokens").glob("*.pt"))
    assert len(cached) == 3
    stamps = [f.stat().st_mtime_ns for f in cached]
    assert main(["eval", "run", "--batches", "1"]) == 0
    assert "bpb" in capsys.readouterr().out
    assert [f.stat().st_mtime_ns for f in cached] == stamps  # eval reused the run's token files
    prompt = "And the king"
    assert main(["generate", "run", "--prompt", prompt, "--max-tokens", "5", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    prompt_tokens = len(transformers.AutoTokenizer.from_pretrained(tokenized_llama / "llm")(prompt)["input_ids"])
    assert out.startswith(prompt) and f"prompt {prompt_tokens} tokens" in out and "generated 5 tokens" in out
    assert prompt_tokens < len(prompt)  # the prompt went in as the tokenizer's tokens, not bytes


def test_export_hf_of_a_fine_tuned_run_brings_its_tokenizer_from_any_folder(tokenized_llama, tmp_path, capsys,
                                                                             monkeypatch):
    """A run keeps train.init_from as typed (relative to where it was trained): exported from another folder, the
    export found no tokenizer and wrote the model without one. data.tokenizer (absolute) says where it is."""
    monkeypatch.chdir(tmp_path)
    assert main(["import-hf", str(tokenized_llama / "llm"), "--out", "zoo"]) == 0
    text = str(tokenized_llama / "small.txt")
    assert main(["train", "zoo", "--out", "run", "train.init_from=zoo", "data.name=text", f"data.text={text}",
                 *TINY_TRAIN]) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["export-hf", str(tmp_path / "run"), "--out", "exported"]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    exported = tmp_path / "elsewhere" / "exported"
    assert (exported / "tokenizer.json").read_bytes() == (tokenized_llama / "llm" / "tokenizer.json").read_bytes()
    assert len(transformers.AutoTokenizer.from_pretrained(exported)) == 300


def test_generate_with_a_tokenizer_calls_an_empty_prompt_empty(tokenized_llama, tmp_path, capsys):
    """A tokenizer that adds no BOS gives "" no tokens: that was reported as "its tokens do not fit the model's
    vocabulary (300 tokens)", which sends the user after the wrong problem."""
    assert main(["import-hf", str(tokenized_llama / "llm"), "--out", str(tmp_path / "zoo")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "zoo"), "--prompt", "", "--max-tokens", "2"]) == 2
    captured = capsys.readouterr()
    assert "the prompt is empty" in captured.err and "vocabulary" not in captured.err and captured.out == ""


def test_generate_stops_at_the_checkpoints_end_of_sequence_token(tokenized_llama, tmp_path, capsys):
    """generate ran to --max-tokens past the end-of-sequence token of an imported checkpoint; it stops there (the
    eos_token_id of the generation_config.json the import brought, else the tokenizer's) unless --ignore-eos."""
    import json

    zoo = tmp_path / "zoo"
    assert main(["import-hf", str(tokenized_llama / "llm"), "--out", str(zoo)]) == 0
    greedy = ["generate", str(zoo), "--prompt", "And the king", "--temperature", "0", "--max-tokens", "8"]
    config = zoo / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "eos_token_id": None}))
    capsys.readouterr()
    assert main(greedy) == 0
    free = capsys.readouterr().out
    assert "generated 8 tokens" in free and "stopped" not in free
    model = load_model(zoo)
    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo)
    sequence = torch.tensor([tokenizer("And the king")["input_ids"]])
    prompt_length = sequence.shape[1]
    for _ in range(8):
        sequence = torch.cat([sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)], 1)
    tokens = sequence[0, prompt_length:].tolist()
    at = next(i for i in range(1, 8) if tokens[i] not in tokens[:i])  # a token first sampled after the first one
    eos = tokens[at]
    for value in (eos, [299, eos]):
        config.write_text(json.dumps({"eos_token_id": value}))
        assert main(greedy) == 0
        out = capsys.readouterr().out
        assert f"generated {at + 1} tokens" in out and f"-- stopped: end-of-sequence token {eos}" in out, out
        assert out.split("\n")[0] == "And the king" + tokenizer.decode(tokens[:at])  # the text before the EOS
    assert main([*greedy, "--ignore-eos"]) == 0
    assert "generated 8 tokens" in capsys.readouterr().out
    config.write_text(json.dumps({"eos_token_id": "</s>"}))
    assert main(greedy) == 2
    assert f"{config}: eos_token_id = '</s>': expected a token id or a list of token ids" in capsys.readouterr().err


def test_data_tokenizer_problems_are_named(tmp_path):
    from attention_zoo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data.tokenizer = 'nowhere': no such folder"):
        load_config({"data": {"name": "shakespeare", "tokenizer": "nowhere"}})
    with pytest.raises(ConfigError, match=r"data.tokenizer.*unknown key for dataset 'variable_assignment'"):
        load_config({"data": {"name": "variable_assignment", "tokenizer": str(tmp_path)}})


def test_a_folder_without_tokenizer_files_says_so_and_a_broken_one_keeps_its_whole_reason(tmp_path, monkeypatch):
    """transformers' reason for an empty folder ran over several lines and was cut after the first
    ("Couldn't instantiate the backend tokenizer from one of: ")."""
    from attention_zoo.data import DataError
    from attention_zoo.data.tokenized import load_tokenizer

    (tmp_path / "notes.txt").write_text("no vocabulary here\n")
    with pytest.raises(DataError, match=r"no tokenizer files there \(expected one of tokenizer.json, .*; the folder "
                                        r"holds notes.txt\)"):
        load_tokenizer(tmp_path, "x.yaml")
    (tmp_path / "tokenizer.json").write_text("{}")

    def fails(*args, **kwargs):
        raise ValueError("Couldn't instantiate the backend tokenizer from one of: \n(1) a tokenizers file\n(2) ...")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fails)
    with pytest.raises(DataError, match=re.escape("cannot load a tokenizer there: ValueError: Couldn't instantiate "
                                                  "the backend tokenizer from one of: (1) a tokenizers file (2) ...")):
        load_tokenizer(tmp_path, "x.yaml")


def test_a_tokenizer_that_does_not_fit_the_model_leaves_data_byte_level_and_says_why(tokenized_llama, tmp_path,
                                                                                      capsys):
    """A tokenizer with more tokens than the model's embedding rows became data.tokenizer: the import said "train, eval
    and generate use these tokens", then each refused ("model.vocab_size = 200: dataset ... has 300 tokens"). A
    tokenizer that does not load was reported under the import's temporary folder, gone afterwards."""
    import shutil

    from attention_zoo.config import load_config

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenized_llama / "llm" / name, tmp_path / name)
    tiny("llama", vocab_size=200).save_pretrained(tmp_path / "small")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tmp_path / name, tmp_path / "small" / name)
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "small"), "--out", str(tmp_path / "zoo")]) == 0
    out = capsys.readouterr().out
    assert "its tokenizer has 300 tokens (added tokens included), more than the model's 200 embedding rows" in out, out
    assert "data.tokenizer =" not in out and (tmp_path / "zoo" / "tokenizer.json").is_file()
    assert (load_config(tmp_path / "zoo" / "config.yaml").get("data") or {}).get("tokenizer") is None
    (tmp_path / "small" / "tokenizer.json").write_text("{broken")
    assert main(["import-hf", str(tmp_path / "small"), "--out", str(tmp_path / "zoo2")]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'small'}: tokenizer files copied but not loadable (cannot load a tokenizer there: " in out, out
    assert ".tmp" not in out


def test_a_checkpoint_without_tokenizer_files_is_said_to_read_bytes_as_its_tokens(tmp_path, capsys):
    """Weights and config.json alone (a download without the tokenizer) imported in silence: train and eval then fed
    Shakespeare's bytes as token ids 0-255 of a model whose ids 0-255 stand for other text."""
    tiny("llama").save_pretrained(tmp_path / "hf")
    tiny("llama", vocab_size=256).save_pretrained(tmp_path / "bytes")
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "zoo")]) == 0
    assert (f"{tmp_path / 'hf'} holds no tokenizer files, so data stays byte-level: train, eval and generate feed bytes "
            "as token ids 0-255 of this 64-token model, which are not its tokens") in capsys.readouterr().out
    assert main(["import-hf", str(tmp_path / "bytes"), "--out", str(tmp_path / "zoo2")]) == 0  # a byte-level model
    assert "no tokenizer files" not in capsys.readouterr().out


def test_the_cache_refusal_names_the_implementation_as_written(llama_folder):
    """`attn_implementation='zoo_selective'`, the string a user passes, not `zoo_'selective'`."""
    register()
    with pytest.raises(NotImplementedError, match="attn_implementation='zoo_selective': "):
        stock(llama_folder, "zoo_selective").generate(tokens(4, batch=1), max_new_tokens=2, do_sample=False)


# -- import-hf: plug-in variants (--plugins) and the variant's parameters (model.* overrides) ----------------

PLUGIN = '''
from attention_zoo import ProjectedAttention, register_variant
from attention_zoo.variant import BASE_PARAMS, Param


@register_variant("zoo_hf_temp")
class Temp(ProjectedAttention):
    """Plain attention at temperature `temp`."""
    params = {**BASE_PARAMS, "temp": Param(float, 1.0, "softmax temperature")}

    def __init__(self, shape, *, temp=1.0, **kwargs):
        super().__init__(shape, **kwargs)
        self.temp = temp
        self.scale = self.scale / temp
'''


def test_import_hf_runs_a_plugin_variant_and_lists_its_module_under_plugins(tmp_path, capsys, monkeypatch,
                                                                              isolated_registry):
    (tmp_path / "zoo_hf_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    tiny("llama").save_pretrained(tmp_path / "hf")
    code = main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "bad"), "--variant", "zoo_hf_temp"])
    assert code == 2 and not (tmp_path / "bad").exists()
    assert ("model.attention.variant = 'zoo_hf_temp': unknown variant" in (err := capsys.readouterr().err) and
            "(import-hf --plugins MODULE)" in err)
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "zoo"), "--variant", "zoo_hf_temp",
                 "--plugins", "zoo_hf_plugin", "model.attention.temp=2.5"]) == 0
    saved = yaml.safe_load((tmp_path / "zoo" / "config.yaml").read_text())
    assert saved["plugins"] == ["zoo_hf_plugin"]  # train, eval and generate import it from the checkpoint's config
    assert saved["model"]["attention"] == {"variant": "zoo_hf_temp", "temp": 2.5}
    zoo = load_model(tmp_path / "zoo")
    assert zoo.blocks[0].attention.temp == 2.5
    code = main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "bad"), "--plugins", "zoo_no_such_mod"])
    assert code == 2 and "--plugins: plugin module 'zoo_no_such_mod' cannot be imported" in capsys.readouterr().err


def test_import_hf_overrides_set_the_variants_parameters_and_train_init_from_accepts_them(tmp_path, capsys):
    tiny("llama", vocab_size=256).save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "zoo"), "--variant", "selective",
                 "model.attention.selection_head=1"]) == 0
    zoo = load_model(tmp_path / "zoo")
    assert zoo.blocks[0].attention.selection_head == 1
    tiny_run = ["train.steps=1", "train.seq_len=16", "train.batch_size=2", "train.eval_batches=1", "train.warmup=0",
                "--no-progress"]
    assert main(["train", str(tmp_path / "zoo"), "--out", str(tmp_path / "run"), f"train.init_from={tmp_path / 'zoo'}",
                 *tiny_run]) == 0
    capsys.readouterr()
    code = main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "bad"), "--variant", "selective",
                 "model.attention.selection_head=9", "model.depth=3", "model.attention.kv_heads=2", "train.steps=3",
                 "model.attention.qkv_bias=true"])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "bad").exists()
    where = f"override (on {tmp_path / 'hf'})"
    assert f"{where}: model.depth = '3': fixed by the checkpoint" in err
    assert f"{where}: model.attention.qkv_bias = 'true': fixed by the checkpoint" in err
    assert f"{where}: model.attention.kv_heads = '2': set by the kv_heads argument (import-hf --kv-heads)" in err
    assert f"{where}: train.steps = '3': an import takes overrides of the model section only" in err
    code = main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "bad"), "--variant", "selective",
                 "model.attention.selection_head=9"])
    assert code == 2 and f"{where}: model.attention.selection_head = 9:" in capsys.readouterr().err


def test_from_hf_saved_with_save_checkpoint_is_a_checkpoint_train_eval_and_load_model_read(tmp_path, capsys,
                                                                                          monkeypatch, isolated_registry):
    """docs/hf.md, In Python: from_hf(..., variant, parameters, plugins=, overrides=) then save_checkpoint."""
    from attention_zoo.checkpoint import save_checkpoint

    (tmp_path / "zoo_hf_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    hf = tiny("llama", vocab_size=256)
    zoo = from_hf(hf, variant="selective", selection_head=1)
    assert save_checkpoint(tmp_path / "sel", zoo) == tmp_path / "sel"
    loaded = load_model(tmp_path / "sel")
    assert loaded.blocks[0].attention.selection_head == 1
    x = tokens()
    assert max_diff(logits(loaded, x), logits(zoo, x)) == 0.0
    assert main(["eval", str(tmp_path / "sel"), "--seq-len", "16", "--batch-size", "2", "--batches", "1"]) == 0
    temp = from_hf(hf, variant="zoo_hf_temp", plugins=["zoo_hf_plugin"], overrides=["model.attention.temp=3"])
    save_checkpoint(tmp_path / "temp", temp)
    assert yaml.safe_load((tmp_path / "temp" / "config.yaml").read_text())["plugins"] == ["zoo_hf_plugin"]
    assert load_model(tmp_path / "temp").blocks[1].attention.temp == 3
    with pytest.raises(UserError, match="plugins: plugin module 'zoo_no_such_mod' cannot be imported"):
        from_hf(hf, plugins=["zoo_no_such_mod"])
