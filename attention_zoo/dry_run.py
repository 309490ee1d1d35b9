"""One forward of a config's model on the meta device: what each layer asks its backend for, found before any
weight is allocated, and a plug-in's broken contract (a bias of the wrong shape, state of the wrong layout, a
tensor made on a fixed device) reported as a config problem by `validate` and `describe` rather than as a
traceback at a training run's first step."""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from .backends import AttentionCall, recording_calls
from .config import _MISSING, Config, ConfigError, Problem, build_model, layer_specs
from .errors import UserError
from .model import CausalLM


def dry_run(config: Config, *, train: bool = False) -> tuple[CausalLM, list[list[AttentionCall]]]:
    """Build `config`'s model on the meta device and run one forward of (1, max_seq_len) tokens through it
    (gradients on when `train`). Returns the meta model and, per layer, the backend calls its attention made
    (several for a variant that attends more than once, none for one whose own attend() computes attention).

    Raises ConfigError with one Problem at the key path of the variant (or the stack component) whose forward
    raised, naming the layer, the class and the exception, when any forward raises something other than a
    UserError; a UserError passes through as it is."""
    m = config["model"]
    with torch.device("meta"):  # no weights: a model of any size is planned in milliseconds
        model = build_model(config)
    tokens = torch.zeros(1, m["max_seq_len"], dtype=torch.long, device="meta")
    per_layer: list[list[AttentionCall]] = []

    def layer_done(*_) -> None:  # a forward hook must return None, or it replaces the block's output
        per_layer.append(list(calls))
        calls.clear()

    with recording_calls() as calls, _where_it_fails(model) as running, torch.set_grad_enabled(train):
        for block in model.blocks:
            block.register_forward_hook(layer_done)
        try:
            model(tokens)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of a plug-in's code becomes one clear problem
            raise ConfigError([_problem(config, model, running, len(per_layer), exc)]) from exc
    return model, per_layer


@contextlib.contextmanager
def _where_it_fails(model: nn.Module) -> Iterator[list[str]]:
    """The names of the modules whose forward is running, outermost first, kept up to date by hooks (a forward
    that raises never pops its name, so after an exception the list ends at the module that raised)."""
    running: list[str] = []
    hooks = []

    def entered(name: str):
        return lambda *_: running.append(name)  # a hook returning None leaves the input and output as they are

    def left(*_) -> None:
        running.pop()

    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(entered(name)))
            hooks.append(module.register_forward_hook(left))
    try:
        yield running
    finally:
        for hook in hooks:
            hook.remove()


def _problem(config: Config, model: CausalLM, running: list[str], finished: int, exc: Exception) -> Problem:
    """The Problem for `exc`, raised inside module running[-1], or (running empty) between modules: the stack's
    check of the state that layer `finished - 1` wrote, or the model's own code. It is put at the key that chose
    the plug-in whose forward was running: the layer's variant, or model.mlp / norm / position."""
    m = config["model"]
    innermost = running[-1] if running else (f"blocks.{finished - 1}.attention" if finished else "")
    parts = innermost.split(".") if innermost else []
    what = f"{type(exc).__name__}: {exc}"
    if re.search(r"\bmeta\b", str(exc)):  # a tensor made with device="cpu" (or .cuda()) met the dry run's meta ones
        what += "; a tensor the variant makes must be on its inputs' device (here meta), e.g. device=q.device"
    during = f"the model's forward on the meta device (1 x {m['max_seq_len']} tokens) raised {what}"
    owner = next((i for i, part in enumerate(parts) if part == "attention" or part in _COMPONENT_KEYS), None)
    if owner is None:  # the stack's own code (an output of the wrong shape fails where it is used)
        where = f"module {innermost} ({_class_name(model.get_submodule(innermost))})" if innermost else "the stack"
        return Problem(config.source, "model", _MISSING, f"{where}: {during}")
    module = model.get_submodule(".".join(parts[: owner + 1]))
    if parts[owner] == "attention":
        spec = layer_specs(m)[int(parts[1])]
        return Problem(config.source, f"{spec.origin['variant']}.variant", spec.variant,
                       f"layer {spec.index} ({_class_name(module)}): {during}")
    key = _COMPONENT_KEYS[parts[owner]]
    return Problem(config.source, f"model.{key}", m[key], f"module {'.'.join(parts[: owner + 1])} "
                   f"({_class_name(module)}): {during}")


def _class_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


# a stack module's attribute name -> the model key that chose it (components are plug-ins too)
_COMPONENT_KEYS = {"mlp": "mlp", "norm_attn": "norm", "norm_mlp": "norm", "norm": "norm",
                   "position_embedding": "position"}
