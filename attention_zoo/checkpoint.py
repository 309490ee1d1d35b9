"""Checkpoints: a folder with `model.safetensors`, `config.yaml` (the validated config that built the
model), and `state.pt` (optimizer, scheduler, RNG and step; only what resuming training needs).

The weights file's metadata carries the checkpoint format (`attention_zoo_format`, FORMAT_VERSION): a
change that makes the same weights and config compute something else raises it, so a loader can tell an
older checkpoint (and say what changed) from one it reads exactly, and refuses one from a newer release.

Every file is written to a temporary name and renamed into place, and the folder itself is written
under a temporary name and swapped in, so a run killed mid-write never leaves a half checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as _load_weights
from safetensors.torch import save_model as _save_weights

from .config import LEGACY_STACK, Config, ConfigError, build_model, load_config
from .errors import UserError

WEIGHTS, CONFIG, STATE = "model.safetensors", "config.yaml", "state.pt"
log = logging.getLogger(__name__)

# 1: no version in the file (everything written before versions). 2: differential attention under rope rotates
# each half of a head on its own (format 1 files may come from before that change, which rotated whole heads).
FORMAT_VERSION = 2
FORMAT_KEY = "attention_zoo_format"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so readers see either the old file or the whole new one. A symbolic link is written
    through (its target replaced, the link kept), as `open(path, "w")` would."""
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results should read like any other file
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)  # the rename itself, so a power loss cannot undo it
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_path(path: str | Path) -> None:
    """Flush a file's or folder's contents (a folder's: its entries, i.e. renames into it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """This process's umask (reading it means setting it; set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A temporary folder next to `path` to write into; when the block ends without an exception it replaces
    `path` (an existing folder is swapped out, then removed), on any failure it is removed and `path` is left as
    it was. Yields the temporary folder. Every file, the folder and the renames are flushed to the disk (fsync)
    before the old folder is removed, so a power loss leaves the old folder or the whole new one. A success also
    removes the staging folders of saves to `path` that a killed process (SIGKILL, power loss) left behind: one
    writer per path is assumed, as everywhere here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = path.with_name(f".{path.name}.old")
    try:
        yield tmp
        # mkdtemp makes the folder 0700 and safetensors its files 0600: give them the modes any new file gets
        umask = _umask()
        # and every byte on the disk before the renames: after a power loss the new folder must hold whole files,
        # since the previous checkpoint is removed below
        for folder, _, files in os.walk(tmp, topdown=False):
            for name in files:
                os.chmod(os.path.join(folder, name), 0o666 & ~umask)
                fsync_path(os.path.join(folder, name))
            os.chmod(folder, 0o777 & ~umask)
            fsync_path(folder)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)  # a directory cannot be replaced in one step: swap, then drop the old one
        os.replace(tmp, path)
        fsync_path(path.parent)  # both renames on the disk before the old checkpoint goes
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(path: str | Path, model: torch.nn.Module, training_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically. `model.config` must be the config it was built from."""
    with atomic_folder(path) as tmp:
        write_checkpoint(tmp, model, training_state)
    return Path(path)


def write_checkpoint(folder: Path, model: torch.nn.Module, training_state: dict[str, Any] | None = None) -> None:
    """A checkpoint's files (weights, config.yaml, the training state if given) into an existing folder, e.g. the
    staging folder of `atomic_folder` when more files go with them."""
    _save_weights(model, str(folder / WEIGHTS), metadata={"format": "pt", FORMAT_KEY: str(FORMAT_VERSION)})
    (folder / CONFIG).write_text(yaml.safe_dump(dict(model.config), sort_keys=False))
    if training_state is not None:
        torch.save(training_state, folder / STATE)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder holding `checkpoint/`, as the checkpoint folder. Raises UserError
    when neither holds config.yaml."""
    path = Path(path).expanduser()
    if not path.exists():  # a mistyped run name: said as such, not as a folder of the wrong kind
        raise UserError(f"{path}: not a checkpoint or run folder: it does not exist")
    if (path / "checkpoint").is_dir():
        path = path / "checkpoint"
    if not (path / CONFIG).is_file():
        hf = (f"; it holds a transformers model (config.json): convert it first, attention-zoo import-hf {path} --out "
              "FOLDER") if (path / "config.json").is_file() else ""
        raise UserError(f"{path}: not a checkpoint or run folder (expected {CONFIG} and {WEIGHTS}, "
                        f"or a checkpoint/ folder holding them){hf}")
    return path


def _require(path: Path) -> None:
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise UserError(f"{path}: not a checkpoint (expected a folder with {WEIGHTS} and {CONFIG})")


def read_saved_config(path: str | Path) -> dict:
    """The raw mapping in checkpoint `path`'s config.yaml (a legacy negative train.seed read as torch read it, see
    `with_legacy_seed`). Raises ConfigError naming that file when it is unreadable, invalid YAML or not a mapping."""
    from .config import read_yaml_chain

    data, problems = read_yaml_chain(Path(path) / CONFIG)
    if problems:
        raise ConfigError(problems)
    return with_legacy_seed(data)


def with_legacy_seed(saved: Any) -> Any:
    """A run from before seeds were refused below 0 may have saved a negative train.seed; torch read it modulo 2**64
    (-1 seeded as 2**64 - 1), so it is read as that seed here: its checkpoint still loads, and resuming it takes
    the seed as a config may now give it."""
    from .numbers import SEED_MAX, is_whole

    train = saved.get("train") if isinstance(saved, dict) else None
    seed = train.get("seed") if isinstance(train, dict) else None
    if is_whole(seed) and -(2**63) <= seed < 0:  # the range train.seed took then
        saved = {**saved, "train": {**train, "seed": seed % (SEED_MAX + 1)}}
    return saved


def load_saved_config(path: str | Path, overrides: tuple[str, ...] = ()) -> Config:
    """Checkpoint `path`'s config.yaml, validated (legacy stacks filled in); every problem names that file."""
    source = str(Path(path) / CONFIG)
    try:
        config = load_config(with_legacy_stack(read_saved_config(path)), overrides)
    except ConfigError as exc:
        for problem in exc.problems:
            if problem.source == "<dict>":
                problem.source = source
        raise ConfigError(exc.problems) from None
    config.source = source
    return config


def _listed(keys: list[str], limit: int = 4) -> str:
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_weights(model: torch.nn.Module, path: str | Path, device: str | torch.device = "cpu") -> None:
    """Load checkpoint `path`'s model.safetensors into `model`. Raises UserError naming the file when it is
    not a readable safetensors file or its tensors do not match the model (missing, unexpected, other shapes)."""
    file = Path(path) / WEIGHTS
    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            version = format_version(file, f.metadata())
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{file}: not a readable safetensors file ({exc}); the checkpoint is damaged or "
                        "incomplete: write it again") from None
    wanted = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    reshaped = [f"{key} (file {list(shapes[key])}, model {list(wanted[key])})"
                for key in sorted(shapes.keys() & wanted.keys()) if shapes[key] != wanted[key]]
    missing, unexpected = [], []
    if not reshaped:
        try:
            missing, unexpected = _load_weights(model, str(file), strict=False, device=str(device))
        except SafetensorError as exc:
            raise UserError(f"{file}: not a readable safetensors file ({exc}); the checkpoint is damaged or "
                            "incomplete: write it again") from None
    if reshaped or missing or unexpected:
        found = [f"{label}: {_listed(sorted(keys))}" for label, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("other shapes", reshaped)) if keys]
        raise UserError(f"{file}: the weights do not match the model section of {Path(path) / CONFIG} "
                        f"({'; '.join(found)}); the file was written for another model")
    config = getattr(model, "config", None)
    if version < FORMAT_VERSION and config is not None:
        for change in format_changes(version, config["model"]):
            log.warning("attention-zoo: %s: %s", file, change)


def format_version(file: Path, metadata: dict[str, str] | None) -> int:
    """The checkpoint format of weights `file` from its safetensors metadata: 1 when it has none (written before
    versions). Raises UserError for a format newer than this release reads, or a value that is not one."""
    value = (metadata or {}).get(FORMAT_KEY, "1")
    if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:  # not str.isdigit: it takes '²', which int() refuses
        raise UserError(f"{file}: metadata {FORMAT_KEY} = {value!r} is not a checkpoint format (a whole number "
                        f"from 1 to {FORMAT_VERSION}); the file was not written by attention-zoo, or was edited")
    if int(value) > FORMAT_VERSION:
        raise UserError(f"{file}: checkpoint format {value}, written by a newer attention-zoo; this one reads "
                        f"formats up to {FORMAT_VERSION}: upgrade attention-zoo to load it")
    return int(value)


def format_changes(version: int, model: dict) -> list[str]:
    """What a checkpoint of format `version` with validated model section `model` computes differently now that it
    is loaded by format FORMAT_VERSION's code; one sentence each, empty when nothing it uses changed."""
    from .config import resolved_layers

    changes = []
    differential = [i for i, layer in enumerate(resolved_layers(model)) if layer["variant"] == "differential"]
    if version < 2 and differential and model["position"] == "rope":
        changes.append(f"a checkpoint of format {version} with differential attention under rope (layers "
                       f"{_listed([str(i) for i in differential], 8)}): if it was trained before each half of a head "
                       "was rotated on its own (whole heads were, until 2026-12-01), it attends differently now; "
                       "its loss tells (attention-zoo eval): fine-tune or train it again if it rose")
    return changes


def load_model(path: str | Path, map_location: str | torch.device = "cpu", overrides: tuple[str, ...] = ()):
    """The model saved at `path` (a checkpoint folder or a run folder holding checkpoint/), weights loaded,
    in eval mode. `overrides` may change e.g. the backend. Every problem with the folder is a UserError
    naming the file at fault."""
    path = resolve_checkpoint(path)
    _require(path)
    config = load_saved_config(path, overrides)
    model = build_model(config)
    load_weights(model, path, map_location)
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
    if not state.is_file():
        return None
    try:
        return torch.load(state, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a damaged pickle raises many types
        raise UserError(f"{state}: cannot read the training state ({type(exc).__name__}: {exc}); the checkpoint "
                        "is damaged: train again without --resume, or into another --out") from None
