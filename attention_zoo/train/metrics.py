"""Validation metrics and the metrics.jsonl log.

Metrics of one evaluation (over the fixed batches `dataset.eval_batches` gives):
- `loss`: mean cross-entropy (nats) per scored target token;
- `bpb`: bits per byte, loss / ln 2, for byte-level corpora; for corpora tokenized with `data.tokenizer`,
  loss / ln 2 / (the split's bytes per token), so models with different tokenizers compare;
  `ppl` = exp(loss) for any other vocabulary;
- `accuracy`: for tasks whose batches carry `metric_mask`, the fraction of answers (each contiguous run
  of masked positions of a row is one answer) whose every position is predicted right by argmax
  (exact match per answer; with one answer per example, per example).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from ..data import IGNORE_INDEX, VOCAB_SIZE, Dataset
from .distributed import World, all_sum


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the scored tokens. logits (B, N, V), targets (B, N)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def answer_accuracy(predicted: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """(answers predicted exactly right, answers) for predicted and targets (B, N) int and mask (B, N) bool:
    each contiguous run of True in a row of `mask` is one answer (e.g. the digits of one value)."""
    wrong = ((predicted != targets) & mask).long()
    before = F.pad(mask[:, :-1], (1, 0), value=False)
    after = F.pad(mask[:, 1:], (0, 1), value=False)
    starts, ends = mask & ~before, mask & ~after  # in row-major order the k-th start pairs with the k-th end
    wrong_so_far = wrong.cumsum(1)
    wrong_in_answer = wrong_so_far[ends] - (wrong_so_far - wrong)[starts]
    return int((wrong_in_answer == 0).sum()), int(starts.sum())


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, split: str, batch_size: int, seq_len: int, max_batches: int | None,
             device: torch.device, autocast: contextlib.AbstractContextManager | None = None,
             world: World = World()) -> dict[str, float]:
    """Metrics over the fixed evaluation batches of `split`: `loss` (mean nats per scored token), `tokens` (how
    many were scored, all ranks together), then `bpb` (bits per byte of text), `ppl` or, for a task, `accuracy`.
    With several processes each rank scores every size-th batch and the sums are combined, so the result
    equals a single process's."""
    was_training = model.training
    model.eval()
    # loss sum, scored tokens, exactly right answers, answers
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    has_mask = False
    for i, batch in enumerate(dataset.eval_batches(split, batch_size, seq_len, max_batches)):
        if i % world.size != world.rank:
            continue
        batch = batch.to(device)
        with autocast or contextlib.nullcontext():
            logits = model(batch.inputs)
        sums[0] += token_losses(logits, batch.targets).double()
        sums[1] += (batch.targets != IGNORE_INDEX).sum()
        if batch.metric_mask is not None:
            has_mask = True
            right, answers = answer_accuracy(logits.argmax(-1), batch.targets, batch.metric_mask)
            sums[2] += right
            sums[3] += answers
    all_sum(sums, world)
    has_mask = bool(all_sum(torch.tensor([float(has_mask)], device=device), world).item())
    model.train(was_training)
    loss = (sums[0] / sums[1].clamp(min=1)).item()
    metrics = {"loss": loss, "tokens": int(sums[1].item())}
    bytes_per_token = getattr(dataset, "bytes_per_token", None)  # tokenized corpora (data.tokenizer)
    if bytes_per_token is not None and not has_mask:  # nats per token -> bits per byte of the text
        metrics["bpb"] = loss / math.log(2) / bytes_per_token[split]
    elif dataset.vocab_size == VOCAB_SIZE and not has_mask:
        metrics["bpb"] = loss / math.log(2)
    elif not has_mask:
        metrics["ppl"] = math.exp(min(loss, 50.0))
    if has_mask:
        metrics["accuracy"] = (sums[2] / sums[3].clamp(min=1)).item()
    return metrics


class MetricsLog:
    """Append-only JSON lines, one record per event (`{"kind": "train" | "val", "step": ..., ...}`).
    Each record is flushed as written, so a killed run keeps everything it logged. `mirror`, when set
    (an object with `append(record)`, e.g. tensorboard.TensorBoardLog), gets every record too."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.mirror = None

    def append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.mirror is not None:
            self.mirror.append(record)

    def truncate_after(self, step: int) -> None:
        """On resume: drop what a killed run logged after its last checkpoint (it will be redone).
        Rewritten atomically."""
        if not self.enabled or not self.path.exists():
            return
        from ..checkpoint import atomic_write_text

        kept = [json.dumps(r) + "\n" for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(kept))


def read_jsonl(path: str | Path) -> Iterable[dict[str, Any]]:
    """Records of a JSON-lines file; a torn last line (a run killed mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def fsync_append(path: Path, line: str) -> None:
    """Append one line and make it durable before returning (results that must never be lost)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(line if line.endswith("\n") else line + "\n")
        f.flush()
        os.fsync(f.fileno())
