"""Training: the `train:` and `data:` config sections, the loop (one process or many), the optimizer
and schedule, validation metrics and auxiliary losses. See docs/training.md.

    from attention_zoo import load_config
    from attention_zoo.train import train
    summary = train(load_config("configs/train/shakespeare_tiny.yaml"), "runs/tiny")

Names are imported on first use: `load_config` imports `attention_zoo.train.sections` to register
the sections, and that must not pull in the loop (tqdm, DDP, checkpoints).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "train": "loop", "plan_run": "loop", "evaluate": "metrics",
    "AUX_LOSSES": "aux_losses", "register_aux_loss": "aux_losses",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
