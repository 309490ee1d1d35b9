"""Checkpoints: a folder with `model.safetensors`, `config.yaml` (the validated config that built the
model), and `state.pt` (optimizer, scheduler, RNG and step; only what resuming training needs).

Every file is written to a temporary name and renamed into place, and the folder itself is written
under a temporary name and swapped in, so a run killed mid-write never leaves a half checkpoint.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_model as _load_weights
from safetensors.torch import save_model as _save_weights

from .config import LEGACY_STACK, build_model, load_config
from .errors import UserError

WEIGHTS, CONFIG, STATE = "model.safetensors", "config.yaml", "state.pt"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results should read like any other file
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, model: torch.nn.Module, training_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically. `model.config` must be the config it was built from."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        _save_weights(model, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(yaml.safe_dump(dict(model.config), sort_keys=False))
        if training_state is not None:
            torch.save(training_state, tmp / STATE)
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            os.replace(path, old)  # a directory cannot be replaced in one step: swap, then drop the old one
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _require(path: Path) -> None:
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise UserError(f"{path}: not a checkpoint (expected a folder with {WEIGHTS} and {CONFIG})")


def load_model(path: str | Path, map_location: str | torch.device = "cpu", overrides: tuple[str, ...] = ()):
    """The model saved at `path`, weights loaded, in eval mode. `overrides` may change e.g. the backend."""
    path = Path(path)
    _require(path)
    config = load_config(with_legacy_stack(yaml.safe_load((path / CONFIG).read_text())), overrides)
    config.source = str(path / CONFIG)
    model = build_model(config)
    _load_weights(model, str(path / WEIGHTS), device=str(map_location))
    return model.to(map_location).eval()


def with_legacy_stack(saved: Any) -> Any:
    """A saved config from before positions, norms and MLPs were components had none of their keys and
    meant GPT-2's stack (learned positions, LayerNorm, GELU); today's defaults differ, so fill them in."""
    model = saved.get("model") if isinstance(saved, dict) else None
    if isinstance(model, dict) and not any(key in model for key in LEGACY_STACK):
        saved = {**saved, "model": {**model, **LEGACY_STACK}}
    return saved


def load_training_state(path: str | Path) -> dict[str, Any] | None:
    state = Path(path) / STATE
    return torch.load(state, map_location="cpu", weights_only=False) if state.is_file() else None
