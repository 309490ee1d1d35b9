"""`from_hf`: a transformers causal LM (in memory, or a local folder) as a zoo CausalLM with the same weights."""
from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path
from typing import Any, Iterable

import torch

from ..config import ConfigError, Problem, build_model
from ..registry import import_required_plugins
from .errors import ConversionError, require_transformers
from .families import causal_lm_class, family_of, zoo_model_section
from .weights import Source, gpt2_to_zoo, llama_to_zoo, non_finite_weights, pool_kv_heads

# A layer's index in a transformers weight name: model.layers.3. (Llama, Mistral, Qwen2), transformer.h.3. (GPT-2).
_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")

# Buffers, not weights, that checkpoints of older transformers versions hold (GPT-2's causal mask and its fill
# value, Llama's rotary frequencies): today's classes rebuild them, so the load reports them as unexpected.
# Matched as whole dotted name parts: "c_attn.bias", GPT-2's q/k/v bias, also ends in "attn.bias".
_SAVED_BUFFERS = (".attn.masked_bias", ".attn.bias", ".rotary_emb.inv_freq")

# The parameters of the plain projected-attention stack; a variant may add its own (left as initialised).
_MAPPED = ("q_proj.", "kv_proj.", "out_proj.")


def load_hf(path: str | Path) -> Any:
    """A local transformers folder as a float32 model in eval mode; checked before its weights are read.
    Raises ConversionError if the folder is missing or unreadable, or its architecture unsupported."""
    transformers = require_transformers()
    path = Path(path)
    if path.is_file():  # config.json or a weight file: "no such folder" would be puzzling
        raise ConversionError(f"{path}: a file; give the transformers checkpoint folder that holds config.json and the "
                              f"weights ({path.parent}?)")
    if not path.is_dir():
        raise ConversionError(f"{path}: no such folder (give a local transformers checkpoint folder with config.json; "
                              "nothing is downloaded)")
    if not (path / "config.json").is_file():  # transformers' own message asks for a model_type in config.json
        entries = sorted(p.name for p in path.iterdir())
        held = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "") if entries else "nothing"
        if "config.yaml" in entries:
            raise ConversionError(f"{path}: a zoo checkpoint (config.yaml), not a transformers folder (config.json): "
                                  "eval, generate, train and export-hf take it as it is")
        raise ConversionError(f"{path}: not a transformers checkpoint folder: no config.json (it holds {held}); "
                              "give the folder save_pretrained wrote: config.json with model.safetensors, its shards "
                              "and model.safetensors.index.json, or pytorch_model.bin")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for an unreadable folder
        raise ConversionError(f"{path}: not a readable transformers checkpoint: {type(exc).__name__}: {exc}") from None
    zoo_model_section(config)  # refuse unsupported models before reading gigabytes of weights
    try:  # mismatched sizes loaded as a report, not raised: transformers' error points at a log we silence
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as exc:  # noqa: BLE001
        if culprit := unreadable_weight_file(path):
            raise ConversionError(f"{culprit}; download or save it again") from None
        raise ConversionError(f"{path}: could not load the weights: {type(exc).__name__}: {exc}") from None
    if problems := weight_problems(info):
        raise ConversionError(f"{path}: the weights do not match config.json, so transformers would fill the gap with "
                              "random weights: " + "; ".join(problems) + ". Make config.json's sizes (num_hidden_layers, "
                              "hidden_size, intermediate_size, heads, vocab_size) describe the weights")
    return model.eval()


def unreadable_weight_file(path: Path) -> str | None:
    """'FILE: cannot be read (reason)' for the first weight file of transformers folder `path` that does not open (a
    shard index that is not JSON, a safetensors file whose header does not parse or cover the file, a .bin file
    torch.load refuses), or None. transformers' own error names no file, and an interrupted download truncates one
    shard of many. Called only after a load failed: opening a safetensors header reads no tensor, but a .bin is
    loaded (memory-mapped)."""
    from safetensors import safe_open

    def first_line(exc: Exception) -> str:
        text = str(exc)
        if "WeightsUnpickler error:" in text:  # torch's first lines advise weights_only=False, not the reason
            reason = " ".join(text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0].split())
            return f"not a file of tensors torch.load(weights_only=True) reads: {reason}"
        return f"{type(exc).__name__}: {(text.strip().splitlines() or [''])[0]}"

    for index in sorted(path.glob("*.index.json")):
        try:
            json.loads(index.read_text())
        except (OSError, ValueError) as exc:
            return f"{index}: cannot be read ({first_line(exc)})"
    safetensors = sorted(path.glob("*.safetensors"))
    for file in safetensors:
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError
            return f"{file}: cannot be read ({first_line(exc)})"
    for file in [] if safetensors else sorted(path.glob("pytorch_model*.bin")):  # read only without safetensors
        try:
            try:
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # not a zip file: pre-1.6 format (cannot be memory-mapped), or not torch's
                if "mmap" not in str(exc):
                    raise
                torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - pickle, zip and torch errors
            return f"{file}: cannot be read ({first_line(exc)})"
    return None


def weight_problems(info: dict[str, Any]) -> list[str]:
    """What transformers' loading info (from_pretrained(..., output_loading_info=True)) says is wrong: weights the
    model needs but the checkpoint lacks (whole layers summarised by index), weights it holds but the model has no
    place for, and weights of another shape. Empty when every weight was loaded as saved."""
    def layers_or_keys(keys: list[str]) -> str:
        indices = sorted({int(m.group(1)) for k in keys if (m := _LAYER.search(k))})
        others = sorted(k for k in keys if not _LAYER.search(k))
        parts = [f"layers {indices[0]}-{indices[-1]}" if len(indices) > 1 else f"layer {indices[0]}"] if indices else []
        parts += others[:4] + ([f"{len(others) - 4} more"] if len(others) > 4 else [])
        return ", ".join(parts)

    problems = []
    if missing := list(info.get("missing_keys") or []):
        problems.append(f"{len(missing)} weights missing from the checkpoint ({layers_or_keys(missing)})")
    if unexpected := [k for k in info.get("unexpected_keys") or [] if not ("." + k).endswith(_SAVED_BUFFERS)]:
        problems.append(f"{len(unexpected)} weights in the checkpoint that config.json has no place for "
                        f"({layers_or_keys(unexpected)})")
    if mismatched := sorted(info.get("mismatched_keys") or []):  # a set: sorted, so the same ones are shown
        shown = ", ".join(f"{key} {tuple(saved)} where config.json makes {tuple(expected)}"
                          for key, saved, expected in mismatched[:3])
        problems.append(f"{len(mismatched)} weights of another shape ({shown}{', ...' if len(mismatched) > 3 else ''})")
    return problems


def ties_embeddings(hf: Any) -> bool:
    """Whether the transformers model's output projection is its input embedding. `tie_word_embeddings` alone does
    not say: transformers (5.x) keeps a checkpoint's lm_head.weight apart, and uses it, when it holds other values
    than the embedding (with a warning the CLI silences), so the model it runs is untied whatever the config says."""
    output, embedding = hf.get_output_embeddings(), hf.get_input_embeddings()
    if output is None or output.weight is embedding.weight:
        return True
    return output.weight.shape == embedding.weight.shape and torch.equal(output.weight, embedding.weight)


def zoo_attention_running(hf: Any) -> tuple[str | None, dict[str, Any]]:
    """(variant, parameters) of the zoo attention an in-memory transformers model runs through register()
    (attn_implementation "zoo_<variant>", parameters from config.zoo_attention), or (None, {})."""
    from .interface import CONFIG_KEY, PREFIX

    implementation = getattr(hf.config, "_attn_implementation", None)
    if not (isinstance(implementation, str) and implementation.startswith(PREFIX)):
        return None, {}
    params = dict(getattr(hf.config, CONFIG_KEY, None) or {})
    params.pop("kv_heads", None)  # the weights' (or kv_heads=) count, as for any import
    return implementation[len(PREFIX):], params


def from_hf(model_or_path: Any, *, variant: str | None = None, kv_heads: int | None = None, backend: str = "auto",
            plugins: Iterable[str] = (), overrides: Iterable[str] = (), **variant_params: Any):
    """A zoo CausalLM with the weights of a transformers Llama / Mistral / Qwen2 / GPT-2 causal LM.

    model_or_path: a transformers model (LlamaForCausalLM, MistralForCausalLM without sliding window,
        Qwen2ForCausalLM, GPT2LMHeadModel) or a local folder holding one (never downloaded).
    variant: the zoo attention to run on those weights (default: vanilla, or gqa for a GQA checkpoint; for a
        model loaded with attn_implementation="zoo_<variant>" after register(), that variant with the parameters
        of its config.zoo_attention, as the model computes); any registered variant whose other parameters have
        defaults, given in `variant_params`. Parameters a variant adds (none for selective) keep their
        initialisation.
    kv_heads: fewer key/value heads than the checkpoint has: each group of consecutive kv heads is mean-pooled
        into one (the GQA paper's uptraining conversion); query head h reads pooled head h // (H / kv_heads).
    backend: the zoo attention backend the model runs on (auto, math, sdpa, ...).
    plugins: modules to import first (as a config's `plugins:` does), so `variant` may name a plug-in's variant;
        they are listed under the config's `plugins:`, so a checkpoint saved from the model loads them again.
    overrides: `KEY.PATH=VALUE` strings applied to the model section as `train` takes them
        (`model.attention.selection_head=1`, `model.layers=[...]`); keys the checkpoint fixes (its sizes, stack
        and biases) and those `variant` / `kv_heads` set are refused.
    Returns the model in float32, eval mode, with `.config` the validated zoo config (tied or untied embeddings
    as the checkpoint has them). Logits equal transformers' in float32 (vanilla, no pooling) up to rounding.
    Raises ConversionError (a UserError) for an unsupported architecture or option, ConfigError for invalid
    variant parameters or overrides, UserError for a plug-in module that cannot be imported.
    """
    plugins = import_required_plugins(list(plugins), flag="plugins") if plugins else []
    overrides = list(overrides)
    hf = load_hf(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    family, model_section, attention = zoo_model_section(hf.config)
    expected = causal_lm_class(hf.config)
    if not isinstance(hf, getattr(require_transformers(), expected)):  # a base model or another head
        raise ConversionError(f"{type(hf).__name__}: not a causal language model with its head; from_hf takes a "
                              f"{expected} (AutoModelForCausalLM.from_pretrained) or the folder it was saved to")
    running, running_params = zoo_attention_running(hf)
    if running is not None and variant in (None, running):  # the attention the model computes, not vanilla
        variant, variant_params = running, {**running_params, **variant_params}
    model_section["tie_embeddings"] = model_section["tie_embeddings"] and ties_embeddings(hf)
    heads, checkpoint_kv = model_section["heads"], attention["kv_heads"]
    new_kv = checkpoint_kv if kv_heads is None else kv_heads
    if not (isinstance(new_kv, int) and 1 <= new_kv <= checkpoint_kv and checkpoint_kv % new_kv == 0):
        raise ConversionError(f"kv_heads = {kv_heads!r}: must divide the checkpoint's {checkpoint_kv} key/value heads "
                              f"(pooling only merges heads); valid: "
                              f"{', '.join(str(d) for d in range(1, checkpoint_kv + 1) if checkpoint_kv % d == 0)}")
    if variant is None:
        variant = "vanilla" if new_kv == heads else "gqa"
    section: dict[str, Any] = {"variant": variant}
    if new_kv != heads:
        section["kv_heads"] = new_kv
    section.update({k: True for k in ("qkv_bias", "out_bias") if attention[k]})
    section.update(variant_params)
    where = type(hf).__name__ if not isinstance(model_or_path, (str, Path)) else str(model_or_path)
    if problems := override_problems(overrides, model_section, where):
        raise ConfigError(problems)
    config: dict[str, Any] = {"plugins": plugins} if plugins else {}
    try:
        zoo = build_model({**config, "backend": backend, "model": {**model_section, "attention": section}}, overrides)
    except ConfigError as exc:
        for problem in exc.problems:
            problem.source = (f"override (on {where})" if problem.source.startswith("override")
                              else f"from_hf({where})")
            if problem.path.endswith("attention.variant") and "unknown variant" in problem.message and not plugins:
                problem.message += ("; a plug-in's variant needs its module imported first: plugins=[MODULE] "
                                    "(import-hf --plugins MODULE)")
        raise ConfigError(exc.problems) from None
    pool = (lambda w: w) if new_kv == checkpoint_kv else partial(pool_kv_heads, kv_heads=checkpoint_kv,
                                                                 new_kv_heads=new_kv)
    to_zoo = llama_to_zoo if family == "llama" else gpt2_to_zoo
    src = Source(hf.state_dict(), where)
    if bad := non_finite_weights(src.state):  # transformers loads them as they are; every logit would be NaN
        raise ConversionError(f"{where}: {len(bad)} weights hold NaN or infinite values ({', '.join(bad[:4])}"
                              f"{', ...' if len(bad) > 4 else ''}): the checkpoint is damaged; download or save it again")
    state = to_zoo(src, model_section["depth"], model_section["tie_embeddings"], pool)
    src.check_all_used()
    _load(zoo, state, where)
    return zoo.float().eval()


# keys an override may not set: what `variant=` / `kv_heads=` (--variant / --kv-heads) set, and the biases the
# checkpoint's weights have or lack
_BY_ARGUMENT = {"model.attention.variant": "variant", "model.attention.kv_heads": "kv_heads"}
_FIXED_ATTENTION = ("model.attention.qkv_bias", "model.attention.out_bias")


def override_problems(overrides: list[str], model_section: dict[str, Any], where: str) -> list[Problem]:
    """Problems of `KEY.PATH=VALUE` overrides of an import: a key outside `model.`, one the checkpoint fixes
    (its sizes, stack, biases: the weights would not fit or would mean something else), one an argument sets."""
    fixed = {f"model.{k}" for k in model_section} | set(_FIXED_ATTENTION)
    source = f"override (on {where})"
    problems = []
    for override in overrides:
        key, _, value = (part.strip() for part in override.partition("="))
        if "=" not in override or not key:
            continue  # load_config names a malformed one
        head = next((f for f in (*fixed, *_BY_ARGUMENT, "model.attention", "model") if key == f or
                     key.startswith(f + ".")), None)
        if head is None:
            problems.append(Problem(source, key, value, "an import takes overrides of the model section only "
                                    "(model.attention.PARAM=VALUE, model.layers=[...]); train and eval settings "
                                    "are given to train / eval"))
        elif head in _BY_ARGUMENT:
            problems.append(Problem(source, key, value, f"set by the {_BY_ARGUMENT[head]} argument "
                                    f"(import-hf --{_BY_ARGUMENT[head].replace('_', '-')}), not by an override"))
        elif head in fixed:
            problems.append(Problem(source, key, value, "fixed by the checkpoint (its config.json and weights); "
                                    "valid: model.attention.PARAM=VALUE (the variant's parameters), model.layers=[...] "
                                    "(per-layer variants), model.dropout"))
    return problems


def _load(zoo: torch.nn.Module, state: dict, where: str) -> None:
    """Copy `state` into `zoo`; only parameters a variant adds beyond the projections may stay as initialised."""
    state = {k: v.detach().to(torch.float32) for k, v in state.items()}
    try:
        missing, unexpected = zoo.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: a variant that lays out its projections differently
        raise ConversionError(f"{where}: the weights do not fit the zoo model: {exc}") from None
    mapped_missing = [k for k in missing if ".attention." not in k or any(m in k for m in _MAPPED)]
    if unexpected or mapped_missing:
        raise ConversionError(f"{where}: weights do not line up with the zoo model "
                              f"(missing {mapped_missing}, unexpected {unexpected})")


__all__ = ["from_hf", "load_hf", "family_of"]
