"""Open a checkpoint for inference: a checkpoint folder or a run folder that holds `checkpoint/`."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_model, resolve_checkpoint
from ..errors import UserError

__all__ = ["check_device", "checkpoint_label", "load_for_inference", "resolve_checkpoint"]


def check_device(device: str, flag: str = "--device", auto: bool = False, present: bool = True) -> torch.device:
    """`device` (a command's --device) as a torch.device: cpu, cuda, cuda:N or mps, and with `auto` also auto
    (cuda if available, else cpu). The inference commands, eval and describe pass auto=True, so they take the
    same words. With `present` (to run on it, not to plan for it) the device must exist on this machine.
    UserError naming `flag`, the value and what is valid otherwise, before any work."""
    if auto and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError:
        target = None
    if target is None or target.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{flag} {device!r}: expected {'auto, ' if auto else ''}cpu, cuda or cuda:N "
                        "(or mps, on a machine with an Apple GPU)")
    if not present:
        return target
    if target.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag} {device}: MPS (Apple GPU) is not available on this machine; use {flag} cpu")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {device}: CUDA is not available on this machine; use {flag} cpu")
    if target.type == "cuda" and target.index is not None and target.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UserError(f"{flag} {device}: this machine has {count} CUDA device{'s' if count > 1 else ''}, "
                        f"cuda:0 to cuda:{count - 1}")
    return target


def checkpoint_label(path: Path) -> str:
    """A short name for checkpoint folder `path`: its run folder's name when it is a run's checkpoint/,
    else its own (a bare `imp1` resolves to imp1, not the empty name of its parent `.`)."""
    path = path.resolve()
    return path.parent.name if path.name == "checkpoint" else path.name


def load_for_inference(path: str | Path, device: str = "cpu", backend: str | None = None) -> tuple[nn.Module, Path]:
    """The model in eval mode, on `device` (any --device word, auto included), and the checkpoint folder it
    came from."""
    target = check_device(device, auto=True)  # before reading the checkpoint: a bad flag costs nothing
    if backend is not None:
        from ..backends import BACKEND_CHOICES

        if backend not in BACKEND_CHOICES:  # as a config override it was "override (on <dict>): backend = ..."
            raise UserError(f"--backend {backend!r}: unknown attention backend; valid: {', '.join(BACKEND_CHOICES)}")
    path = resolve_checkpoint(path)
    overrides = (f"backend={backend}",) if backend else ()
    model = load_model(path, map_location=target, overrides=overrides)
    check_finite_weights(model, path)
    return model, path


def check_finite_weights(model: nn.Module, path: Path) -> None:
    """UserError naming PATH/model.safetensors when a weight of `model` (loaded from it) is NaN or infinite: every
    logit would be NaN, and eval printed a NaN loss, stream drew NaN curves, calibrate crashed drawing its figure."""
    from ..hf.weights import non_finite_weights

    if bad := non_finite_weights(model.state_dict()):
        raise UserError(f"{path / 'model.safetensors'}: {len(bad)} weight tensor(s) hold NaN or infinite values "
                        f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}): the checkpoint is damaged (a run "
                        "that diverged?); use an earlier checkpoint or train again")
