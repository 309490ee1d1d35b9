"""Open a checkpoint for inference: a checkpoint folder or a run folder that holds `checkpoint/`."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_model, resolve_checkpoint
from ..errors import UserError

__all__ = ["load_for_inference", "resolve_checkpoint"]


def check_device(device: str, flag: str = "--device", auto: bool = False) -> torch.device:
    """`device` (a command's --device) as a torch.device this machine has: cpu, cuda or cuda:N, and with `auto`
    also auto (cuda if available, else cpu). UserError naming `flag` otherwise, before any work."""
    if auto and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError:
        target = None
    if target is None or target.type not in ("cpu", "cuda"):
        raise UserError(f"{flag} {device!r}: expected {'auto, ' if auto else ''}cpu, cuda or cuda:N")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {device}: CUDA is not available on this machine; use {flag} cpu")
    return target


def load_for_inference(path: str | Path, device: str = "cpu", backend: str | None = None) -> tuple[nn.Module, Path]:
    """The model in eval mode and the checkpoint folder it came from."""
    path = resolve_checkpoint(path)
    check_device(device)
    overrides = (f"backend={backend}",) if backend else ()
    return load_model(path, map_location=device, overrides=overrides), path
