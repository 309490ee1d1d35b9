"""TensorBoard event files for a run (`train.tensorboard: true`).

Every record the loop appends to metrics.jsonl is also written as scalars, tagged `<kind>/<key>`:
`train/loss`, `train/lr`, `train/tokens_per_s`, `train/grad_norm`, `train/aux.<name>`, and `val/loss`,
`val/bpb` (or `val/ppl`, `val/accuracy`), each at its optimizer step. The event files go straight into
the run folder, so `tensorboard --logdir OUT` shows one run per folder: a train run, or every run of an
ablation (OUT/<label>/seed<k>/).

The `tensorboard` package is optional (`pip install tensorboard`); the train section refuses
`tensorboard: true` without it (sections.validate_train), so nothing here runs without it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

MISSING_HINT = ("needs the 'tensorboard' package, which is not installed: pip install tensorboard "
                "(or pip install 'attention-zoo[tensorboard]'), or set train.tensorboard: false")
FLUSH_SECS = 10  # a curve watched live lags at most this much; SummaryWriter's default is 120


def tensorboard_installed() -> bool:
    """Whether `torch.utils.tensorboard` can import its backend, without importing it."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    """Scalars of metrics records into event files under `log_dir`; a context manager that closes
    (flushes) the writer.

    `resumed_from`: the step a resumed run restarts after (0 for one killed before its first checkpoint),
    None for a new run. Events an earlier, killed process wrote past that step are dropped by TensorBoard
    (SummaryWriter's purge_step), as metrics.jsonl drops them, so the redone steps are not drawn twice.
    Records at that step itself (the checkpoint's) are kept.
    """

    def __init__(self, log_dir: str | Path, resumed_from: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for

        purge = None if resumed_from is None else resumed_from + 1
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge, flush_secs=FLUSH_SECS)

    def append(self, record: dict[str, Any]) -> None:
        """One metrics record {"kind": "train" | "val", "step": int, name: number, ...}: each number
        becomes the scalar `<kind>/<name>` at `step`; anything else (None, strings) is skipped."""
        kind, step = record["kind"], record["step"]
        for name, value in record.items():
            if name in ("kind", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
