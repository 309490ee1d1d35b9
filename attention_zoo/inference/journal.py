"""A journal of streaming evaluations, so that an interrupted `calibrate` resumes.

A calibration is dozens of streaming evaluations (N forward calls each): 20 minutes on a small model on a CPU,
hours on a large one. Each evaluation is appended to OUT/<name>.partial.jsonl as it finishes; a re-run on the
same model and the same sequences reads them back instead of streaming them again, and the search, which is
deterministic given its measurements, walks the same path to where the interrupted run stopped. The first
line is a fingerprint of what the numbers depend on (the model's weights and config, the token ids, the
context, the device, the code's version); a journal with another fingerprint is replaced and the run starts afresh. The journal
is removed once the report is written: it exists only while a run is unfinished.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..checkpoint import atomic_write_text
from ..data import Batch
from .streaming import StreamingResult


def fingerprint(model: nn.Module, batches: list[Batch], **settings: Any) -> dict[str, Any]:
    """What a streamed loss depends on, as JSON-able values: sha256 digests of the model's state_dict (names,
    dtypes, shapes, bytes) and config, and of the batches' inputs and targets; the device the model is on (and
    the card), the attention-zoo and torch versions (code that computes differently); plus `settings` (the
    context: anything else the caller's numbers depend on). Reads every weight once (seconds per GB)."""
    weights = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        weights.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        weights.update(tensor.view(torch.uint8).numpy().tobytes())
    tokens = hashlib.sha256()
    for batch in batches:
        for tensor in (batch.inputs, batch.targets):
            tokens.update(f"{tuple(tensor.shape)}\n".encode())
            tokens.update(tensor.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    config = json.dumps(dict(getattr(model, "config", {})), sort_keys=True, default=str)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"weights": weights.hexdigest(), "config": hashlib.sha256(config.encode()).hexdigest(),
            "tokens": tokens.hexdigest(), "device": str(device), "card": card, "attention_zoo": __version__,
            "torch": torch.__version__, **settings}


class Journal:
    """Streaming evaluations by key (e.g. "search budget:8,8,8,8"), kept in `path` (JSON lines: the fingerprint,
    then one {"key", "result"} per evaluation). Opening reads back a journal with the same fingerprint (a torn
    last line, from a kill mid-write, is dropped) and starts a new one otherwise; `say` reports which. Nothing is
    written before the first evaluation that was not read back."""

    def __init__(self, path: Path, fingerprint: dict[str, Any], say: Callable[[str], None] = print):
        self.path = Path(path)
        found, self.done = self._read(fingerprint)
        if found and self.done is None:
            say(f"{self.path}: an unfinished run on another model or other sequences; starting afresh")
        elif self.done:
            say(f"resuming from {self.path}: {len(self.done)} evaluation(s) read back")
        self.done, self.fingerprint, self.started = self.done or {}, fingerprint, False

    def _read(self, fingerprint: dict[str, Any]) -> tuple[bool, dict[str, StreamingResult] | None]:
        """Whether a journal is at `path`, and its evaluations if it has this fingerprint (else None)."""
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return False, None
        except UnicodeDecodeError:
            return True, None
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # the write a kill cut short: nothing after it was written
        if not records or not isinstance(records[0], dict) or records[0].get("fingerprint") != fingerprint:
            return True, None
        done = {}
        for record in records[1:]:
            try:
                done[record["key"]] = StreamingResult(**record["result"])
            except (KeyError, TypeError):
                break
        return True, done

    def _lines(self) -> list[dict[str, Any]]:
        return [{"key": key, "result": vars(result)} for key, result in self.done.items()]

    def get(self, key: str, measure: Callable[[], StreamingResult]) -> StreamingResult:
        """The evaluation under `key`: read back, or `measure()`d now and appended (flushed to disk first, so a
        kill after this returns cannot lose it)."""
        if key not in self.done:
            result = measure()
            if not self.started:  # written at the first new evaluation: a run refused before one leaves nothing
                # whole, without a torn last line, so that what is appended next starts on a line of its own
                atomic_write_text(self.path, "".join(json.dumps(line) + "\n" for line in
                                                     [{"fingerprint": self.fingerprint}, *self._lines()]))
                self.started = True
            result = StreamingResult(result.loss, result.tokens, result.mean_kept, result.peak_kept)
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "result": vars(result)}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.done[key] = result
        return self.done[key]

    def close(self) -> None:
        """The run is finished and its report written: the journal has nothing left to resume."""
        self.path.unlink(missing_ok=True)
