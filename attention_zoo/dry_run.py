"""A plug-in's broken contract (a bias of the wrong shape, state no channel declares, a tensor made on a fixed
device, a backward that raises) reported as a config problem at the key that chose the plug-in, not as a
traceback: found by one forward on the meta device (`validate`, `describe`, `ablate`: no weights, what each layer
asks its backend for), with gradients on and then a backward for a training config, and by the two-token warm-up
forward `train` runs on the real device before it writes its run folder (after the meta device's backward)."""
from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator

import torch

from .autograd_owners import NodeOwners
from .backends import AttentionCall, BackendRefused, planning_for, recording_calls
from .config import Config, ConfigError, Problem, build_model, layer_specs
from .errors import UserError
from .model import CausalLM
from .ops.residual import recording_dense_carries
from .variant import meta_only, plugin_line, zoos_own


def dry_run(config: Config, *, train: bool = False, device: str = "cpu", warm_up_follows: bool = False
            ) -> tuple[CausalLM, list[list[AttentionCall]], list[str | None]]:
    """Build `config`'s model on the meta device and run one forward of (1, max_seq_len) tokens through it,
    taking the decisions a run on `device` ("cpu", "cuda") would take (`backends.planning_for`). With `train`,
    the forward records gradients and a backward of the logits' sum follows, as a training step's does: a
    plug-in whose forward works and whose backward raises (a custom autograd.Function's backward, an op without a
    derivative) is found too. Returns the meta model (no gradients kept); per layer, the backend calls its
    attention made (several for a variant that attends more than once, none for one whose own attend() computes
    attention); and per layer, why it carried residual scores as a dense (B, H, N, N) tensor (None where it did not).

    A backward failure that only the meta device causes (a backward that reads tensor values, an op without a meta
    kernel) is passed over: it says nothing of a run on a real device. `warm_up_follows` (train, whose warm-up next
    runs the forward on the real device) passes over every forward failure too, and a backward failure that names
    the meta device (a tensor made on a fixed device, which a run on that device accepts): the dry run then only
    finds the backward failures any device would meet, and the lists it returns may be short.

    Raises ConfigError when a plug-in's forward or backward fails (plugin_failures_reported); a failure in the
    zoo's own modules is raised as it is (a bug to see with its traceback)."""
    m = config["model"]
    with torch.device("meta"):  # no weights: a model of any size is planned in milliseconds
        model = build_model(config)
    tokens = torch.zeros(1, m["max_seq_len"], dtype=torch.long, device="meta")
    per_layer: list[list[AttentionCall]] = []
    dense_residual: list[str | None] = []

    def layer_done(*_) -> None:  # a forward hook must return None, or it replaces the block's output
        per_layer.append(list(calls))
        dense_residual.append("; ".join(dict.fromkeys(dense_reasons)) or None)
        calls.clear()
        dense_reasons.clear()

    during = f"the model's forward on the meta device (1 x {m['max_seq_len']} tokens)"
    with (recording_calls() as calls, recording_dense_carries() as dense_reasons, planning_for(device),
          plugin_failures_reported(config, model, during) as backward, torch.set_grad_enabled(train)):
        hooks = [block.register_forward_hook(layer_done) for block in model.blocks]
        try:
            logits = model(tokens)
        except Exception:
            if warm_up_follows:  # the warm-up says what the forward meets on the real device
                return model, per_layer, dense_residual
            raise
        finally:  # the meta model is returned: a later forward must not append to these lists
            for hook in hooks:
                hook.remove()
        if train:
            try:
                backward(logits)
            except Exception as exc:
                if not (meta_only(exc) or (warm_up_follows and _names_meta(str(exc)))):
                    raise
            model.zero_grad(set_to_none=True)
    return model, per_layer, dense_residual


def _names_meta(message: str) -> bool:
    """Whether `message` is about the meta device at all: one `meta_only` matches, or a device mismatch with a
    tensor made on a fixed device ("... found at least two devices, meta and cpu!")."""
    return re.search(r"\bmeta\b|same device", message, re.IGNORECASE) is not None


@contextlib.contextmanager
def plugin_failures_reported(config: Config, model: CausalLM, during: str) -> Iterator[Callable[[torch.Tensor], None]]:
    """Inside the block, an exception (not a UserError) from a forward of `model` that a plug-in's module was
    running (a variant, or a model.mlp / norm / position component registered outside the zoo) is raised as a
    ConfigError with one Problem at the key that chose the plug-in, naming the layer, its class and what it
    raised `during` (e.g. "the model's first forward"). Failures of the zoo's own modules pass through, except a
    UserError a layer raises to refuse its configuration, which is a Problem at the key that chose its variant.

    Yields `backward(logits)`: the backward of logits.float().sum() for logits of a forward run inside the block
    with gradients on (nothing where they need no gradient); an exception from it is reported alike, at the key
    that chose the module whose autograd node raised (autograd_owners.py), as what "the backward of `during`"
    raised."""
    running: list[str] = []  # the modules running, outermost first: one that raises stays (its forward hook never runs)
    finished = [0]  # blocks done: the stack checks a layer's state writes after its block returns
    owners = NodeOwners()  # which module made each autograd node, for a failure in the backward
    in_backward = [False]

    def entered(name: str):
        def hook(module, args) -> None:  # a hook returning None leaves the input and output as they are
            owners.claim_inputs(running[-1] if running else "", args)
            running.append(name)
        return hook

    def left(name: str):
        def hook(module, args, output) -> None:
            owners.claim_outputs(name, output)
            _pop_to(running, name)
        return hook

    def block_done(*_) -> None:
        finished[0] += 1

    def backward(logits: torch.Tensor) -> None:
        loss = logits.float().sum()
        if not loss.requires_grad:  # nothing to differentiate (every parameter frozen): no backward to check
            return
        owners.claim_outputs("", loss)  # what the model computed outside its modules, and the loss, are its own
        in_backward[0] = True
        loss.backward()
        in_backward[0] = False

    with contextlib.ExitStack() as undo:  # every hook and wrapper removed, however the block ends
        for block in model.blocks:
            undo.callback(block.register_forward_hook(block_done).remove)
        for name, module in model.named_modules():
            if name:
                undo.callback(module.register_forward_pre_hook(entered(name)).remove)
                if re.fullmatch(_SHAPE_KEEPING, name) and not zoos_own(type(module)):  # checked while it is running
                    undo.callback(module.register_forward_hook(_same_shape).remove)
                undo.callback(module.register_forward_hook(left(name)).remove)
                for method in _CALLED_AS_METHODS.get(name, ()):
                    _track_method(module, method, name, running, owners, undo)
        try:
            yield backward
        except (ConfigError, BackendRefused):  # a backend's refusal already says to change `backend:`
            raise
        except UserError as exc:  # a layer that refuses its configuration (differential: rope needs even halves)
            innermost = (owners.current or "") if in_backward[0] else (running[-1] if running else "")
            problem = _layer_refusal(config, innermost, exc)
            if problem is None:
                raise
            raise ConfigError([problem]) from exc
        except Exception as exc:
            if in_backward[0]:  # no module is running: the node that raised says whose it is
                innermost, what = owners.current or "", f"the backward of {during}"
            else:
                innermost = running[-1] if running else (f"blocks.{finished[0] - 1}.attention" if finished[0] else "")
                what = during
            problem = _plugin_problem(config, model, innermost, exc, what)
            if problem is None:
                raise
            raise ConfigError([problem]) from exc


def _pop_to(running: list[str], name: str) -> None:
    """Pop `name` off `running`, with whatever is above it: a submodule that raised inside `name` (its forward hook
    never ran) and whose exception `name` caught, as a plug-in with a fallback path does."""
    while running and running.pop() != name:
        pass


def _same_shape(module: torch.nn.Module, inputs: tuple, output) -> None:
    """A forward hook: raise ValueError when a norm or MLP's `output` is not shaped like its input x (B, N, dim);
    otherwise the layer after it fails, and the failure is blamed on that layer."""
    if isinstance(output, torch.Tensor) and inputs and output.shape != inputs[0].shape:
        raise ValueError(f"returned shape {tuple(output.shape)} for an input of shape {tuple(inputs[0].shape)}; "
                         "a norm or MLP returns its input's shape")


def _track_method(module: torch.nn.Module, method: str, name: str, running: list[str], owners: NodeOwners,
                  undo: contextlib.ExitStack) -> None:
    """Put `name` on `running` while `module.method` runs, and give `owners` its autograd nodes: the model calls it
    directly (a positional scheme's prepare / embed / rotate), not through Module.__call__, so no hook sees it. An
    instance attribute shadows the class's method until `undo` exits."""
    own = vars(module).get(method)  # an instance attribute of that name the module set itself, put back after
    bound = getattr(module, method)

    def tracked(*args, **kwargs):
        owners.claim_inputs(running[-1] if running else "", (args, kwargs))
        running.append(name)
        result = bound(*args, **kwargs)
        owners.claim_outputs(name, result)
        _pop_to(running, name)
        return result

    setattr(module, method, tracked)
    if own is not None:
        undo.callback(setattr, module, method, own)
    else:
        undo.callback(delattr, module, method)


def _plugin_problem(config: Config, model: CausalLM, innermost: str, exc: Exception, during: str) -> Problem | None:
    """The Problem for `exc`, raised inside module `innermost` (a dotted name in `model`), at the key that chose the
    variant or component it belongs to; None when that is one of the zoo's own classes, or no layer's."""
    parts = innermost.split(".") if innermost else []
    owner = next((i for i, part in enumerate(parts) if part == "attention" or part in _COMPONENT_KEYS), None)
    if owner is None:
        return None
    name = ".".join(parts[: owner + 1])
    module = model.get_submodule(name)
    if zoos_own(type(module)):
        return None
    what = f"{during} raised {type(exc).__name__}: {exc}{plugin_line(exc, type(module))}{_advice(str(exc))}"
    cls = f"{type(module).__module__}.{type(module).__qualname__}"
    if parts[owner] == "attention":
        spec = layer_specs(config["model"])[int(parts[1])]
        return Problem(config.source, f"{spec.origin['variant']}.variant", spec.variant,
                       f"layer {spec.index} ({cls}): {what}")
    key = _COMPONENT_KEYS[parts[owner]]
    return Problem(config.source, f"model.{key}", config["model"][key], f"module {name} ({cls}): {what}")


def _layer_refusal(config: Config, innermost: str, exc: UserError) -> Problem | None:
    """A UserError raised inside a layer's attention (the zoo's own variants too: a refusal is about the config, not
    a bug) as the Problem at the key that chose the layer's variant; None outside any layer's attention."""
    parts = innermost.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or parts[2] != "attention":
        return None
    spec = layer_specs(config["model"])[int(parts[1])]
    return Problem(config.source, f"{spec.origin['variant']}.variant", spec.variant, f"layer {spec.index}: {exc}")


def _advice(message: str) -> str:
    """What to do about a failure whose message is `message`, when its words say it: a forward that read tensor
    values, which meta tensors do not hold (.item(): "cannot be called on meta tensors", .tolist(): "Cannot copy
    out of meta tensor", .numpy(): "meta device type tensor"), or a tensor made on a fixed device that met the
    inputs' ("... not on the expected device meta!", the zoo's own "on meta for q ...; got ... on cpu"); "" else."""
    if re.search(r"\bmeta tensors?\b|\bmeta device type\b", message):
        return ("; it reads tensor values, which the meta device does not hold: give its forward a path for it "
                "(if q.device.type == \"meta\": return a tensor of the output's shape)")
    if re.search(r"\bmeta\b|same device", message):  # a tensor made with device="cpu" (or .cuda()) met q's
        return "; a tensor the plug-in makes must be on its inputs' device, e.g. device=q.device"
    return ""


# the stack's norms and MLPs, whose output has their input's shape (B, N, dim)
_SHAPE_KEEPING = r"(blocks\.\d+\.)?(norm_attn|norm_mlp|mlp)|norm"

# a module the model calls methods of directly (not its forward) -> those methods
_CALLED_AS_METHODS = {"position_embedding": ("prepare", "embed", "rotate")}

# a stack module's attribute name -> the model key that chose it (components are plug-ins too)
_COMPONENT_KEYS = {"mlp": "mlp", "norm_attn": "norm", "norm_mlp": "norm", "norm": "norm",
                   "position_embedding": "position"}
