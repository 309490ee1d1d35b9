"""Open a checkpoint for inference: a checkpoint folder or a run folder that holds `checkpoint/`."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_model, resolve_checkpoint
from ..errors import UserError

__all__ = ["load_for_inference", "resolve_checkpoint"]


def load_for_inference(path: str | Path, device: str = "cpu", backend: str | None = None) -> tuple[nn.Module, Path]:
    """The model in eval mode and the checkpoint folder it came from."""
    path = resolve_checkpoint(path)
    try:
        target = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    overrides = (f"backend={backend}",) if backend else ()
    return load_model(path, map_location=device, overrides=overrides), path
