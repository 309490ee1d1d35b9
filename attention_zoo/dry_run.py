"""A plug-in's broken contract (a bias of the wrong shape, state no channel declares, a tensor made on a fixed
device) reported as a config problem at the key that chose the plug-in, not as a traceback: found by one forward
on the meta device (`validate`, `describe`: no weights, what each layer asks its backend for) and by the two-token
warm-up forward `train` runs before it writes its run folder."""
from __future__ import annotations

import contextlib
import inspect
import re
import traceback
from collections.abc import Iterator

import torch

from .backends import AttentionCall, BackendRefused, planning_for, recording_calls
from .config import Config, ConfigError, Problem, build_model, layer_specs
from .errors import UserError
from .model import CausalLM
from .ops.residual import recording_dense_carries
from .variant import zoos_own


def dry_run(config: Config, *, train: bool = False, device: str = "cpu"
            ) -> tuple[CausalLM, list[list[AttentionCall]], list[str | None]]:
    """Build `config`'s model on the meta device and run one forward of (1, max_seq_len) tokens through it
    (gradients on when `train`), taking the decisions a run on `device` ("cpu", "cuda") would take
    (`backends.planning_for`). Returns the meta model; per layer, the backend calls its attention made
    (several for a variant that attends more than once, none for one whose own attend() computes attention);
    and per layer, why it carried residual scores as a dense (B, H, N, N) tensor (None where it did not).

    Raises ConfigError when a plug-in's forward fails (plugin_failures_reported); a failure in the zoo's own
    modules is raised as it is (a bug to see with its traceback)."""
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
          plugin_failures_reported(config, model, during), torch.set_grad_enabled(train)):
        hooks = [block.register_forward_hook(layer_done) for block in model.blocks]
        try:
            model(tokens)
        finally:  # the meta model is returned: a later forward must not append to these lists
            for hook in hooks:
                hook.remove()
    return model, per_layer, dense_residual


@contextlib.contextmanager
def plugin_failures_reported(config: Config, model: CausalLM, during: str) -> Iterator[None]:
    """Inside the block, an exception (not a UserError) from a forward of `model` that a plug-in's module was
    running (a variant, or a model.mlp / norm / position component registered outside the zoo) is raised as a
    ConfigError with one Problem at the key that chose the plug-in, naming the layer, its class and what it
    raised `during` (e.g. "the model's first forward"). Failures of the zoo's own modules pass through, except a
    UserError a layer raises to refuse its configuration, which is a Problem at the key that chose its variant."""
    running: list[str] = []  # the modules running, outermost first: one that raises stays (its forward hook never runs)
    finished = [0]  # blocks done: the stack checks a layer's state writes after its block returns

    def entered(name: str):
        return lambda *_: running.append(name)  # a hook returning None leaves the input and output as they are

    def left(name: str):
        return lambda *_: _pop_to(running, name)

    def block_done(*_) -> None:
        finished[0] += 1

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
                    _track_method(module, method, name, running, undo)
        try:
            yield
        except (ConfigError, BackendRefused):  # a backend's refusal already says to change `backend:`
            raise
        except UserError as exc:  # a layer that refuses its configuration (differential: rope needs even halves)
            problem = _layer_refusal(config, running[-1] if running else "", exc)
            if problem is None:
                raise
            raise ConfigError([problem]) from exc
        except Exception as exc:
            innermost = running[-1] if running else (f"blocks.{finished[0] - 1}.attention" if finished[0] else "")
            problem = _plugin_problem(config, model, innermost, exc, during)
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


def _track_method(module: torch.nn.Module, method: str, name: str, running: list[str],
                  undo: contextlib.ExitStack) -> None:
    """Put `name` on `running` while `module.method` runs: the model calls it directly (a positional scheme's
    prepare / embed / rotate), not through Module.__call__, so no hook sees it. An instance attribute shadows the
    class's method until `undo` exits."""
    own = vars(module).get(method)  # an instance attribute of that name the module set itself, put back after
    bound = getattr(module, method)

    def tracked(*args, **kwargs):
        running.append(name)
        result = bound(*args, **kwargs)
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
    what = f"{during} raised {type(exc).__name__}: {exc}{_where(exc, type(module))}{_advice(str(exc))}"
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


def _where(exc: Exception, cls: type) -> str:
    """" (at FILE:LINE)": the last line of `cls`'s source file that `exc` passed through (the plug-in author's own
    line, where the zoo code it called raised), or "" when its traceback never entered that file."""
    try:
        source = inspect.getsourcefile(cls)
    except TypeError:  # a class defined where no file can be found (an interactive session)
        return ""
    lines = [frame for frame in traceback.extract_tb(exc.__traceback__) if frame.filename == source]
    return f" (at {lines[-1].filename}:{lines[-1].lineno})" if lines else ""


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
