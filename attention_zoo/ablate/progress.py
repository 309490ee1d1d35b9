"""A sweep's overall progress and an estimate of the time left.

The estimate is per optimizer step, since runs of one sweep may train different numbers of steps:
seconds per step = the wall time of the runs finished so far (their start-up, validations and final
evaluation included) over the steps they trained; before any run has finished, the running run's own
elapsed time over its logged steps. Time left = that rate x the steps not trained yet (the rest of the
running run and every run not started). Runs of different variants differ in speed, so the estimate
moves as runs finish; it is a guide, not a promise.

The running run's step is read from the last train record of its metrics.jsonl (written every
`train.log_every` steps), so the bar moves in steps of log_every without any channel to the run.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

TAIL_BYTES = 8192  # the last records of metrics.jsonl: a few train records, whatever the run's length


def seconds_per_step(finished: list[tuple[int, float]], current: tuple[int, float] | None = None) -> float | None:
    """finished: (steps trained, wall seconds) per finished run; current: (steps done, seconds elapsed)
    of the running run. Seconds per step, or None while nothing has been measured."""
    steps = sum(s for s, _ in finished)
    if steps > 0:
        return sum(w for _, w in finished) / steps
    if current is not None and current[0] > 0:
        return current[1] / current[0]
    return None


def estimate_remaining(finished: list[tuple[int, float]], current: tuple[int, float] | None, steps_left: int) -> float | None:
    """Seconds left for `steps_left` steps at seconds_per_step(finished, current); None while unknown."""
    rate = seconds_per_step(finished, current)
    return None if rate is None else rate * max(steps_left, 0)


def format_duration(seconds: float) -> str:
    """45 s, 4 min 10 s, 1 h 05 min."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def latest_train_record(metrics_path: Path) -> dict[str, Any] | None:
    """The last {"kind": "train", "step": ...} record of a run's metrics.jsonl (reading only its tail),
    or None before the first one. A torn last line (being written) is skipped."""
    try:
        with metrics_path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(f.tell() - TAIL_BYTES, 0))
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("kind") == "train" and isinstance(record.get("step"), int):
            return record
    return None


class SweepProgress:
    """Tracks the runs this invocation trains; shows a bar (`bar=True`, on stderr) and/or an estimate
    after each finished run's line (`eta=True`). Lines go through `say` so they print above the bar.

    steps: train.steps of each run to train, in order (runs finished earlier are not in it).
    """

    def __init__(self, steps: list[int], *, bar: bool, eta: bool):
        self.steps, self.eta = list(steps), eta
        self.total = sum(self.steps)
        self.finished: list[tuple[int, float]] = []  # (steps trained, wall s) per finished run
        self.done_steps = 0  # steps of runs no longer running (finished, failed) plus the running run's
        self.index = -1  # the running run, in self.steps
        self.run_start_step = self.run_step = 0
        self.run_started = 0.0
        self.run_name = ""
        self.bar = tqdm(total=self.total, desc="sweep", unit="step", dynamic_ncols=True, file=sys.stderr,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]",
                        ) if bar and self.total else None

    def say(self, message: str) -> None:
        if self.bar is not None:
            tqdm.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def start_run(self, name: str, steps_done: int = 0) -> None:
        """The next run starts; `steps_done`: the step a resumed run continues from (its checkpoint's, not
        its last logged step: steps logged past the checkpoint are trained again, in this run's time)."""
        self.index += 1
        self.run_name, self.run_started = name, time.perf_counter()
        self.run_start_step = self.run_step = min(steps_done, self.steps[self.index])
        self._show()

    def update(self, step: int, loss: float | None = None) -> None:
        """The running run has reached `step` (its last logged train record)."""
        self.run_step = min(max(step, self.run_step), self.steps[self.index])
        self._show(loss)

    def end_run(self, wall_s: float | None) -> None:
        """The running run ended: finished after `wall_s` seconds, or failed (None: not a measurement)."""
        trained = self.steps[self.index] - self.run_start_step
        if wall_s is not None and trained > 0:
            self.finished.append((trained, wall_s))
        self.done_steps += self.steps[self.index]
        self.run_step = self.run_start_step = 0
        self._show()

    def steps_left(self) -> int:
        return self.total - self.done_steps - self.run_step

    def remaining(self) -> float | None:
        """Seconds left, or None while unknown (see the module's docstring)."""
        current = None
        if 0 <= self.index < len(self.steps) and self.run_step > self.run_start_step:
            current = (self.run_step - self.run_start_step, time.perf_counter() - self.run_started)
        return estimate_remaining(self.finished, current, self.steps_left())

    def status(self) -> str:
        """`sweep: 500/1750 steps, about 4 min 10 s left` (steps of the runs this invocation trains)."""
        left = self.remaining()
        when = "estimating the time left" if left is None else f"about {format_duration(left)} left"
        return f"sweep: {self.total - self.steps_left()}/{self.total} steps, {when}"

    def _show(self, loss: float | None = None) -> None:
        if self.bar is None:
            return
        self.bar.n = self.total - self.steps_left()
        left = self.remaining()
        parts = [f"run {self.index + 1}/{len(self.steps)} {self.run_name}"] if self.run_name else []
        if loss is not None:
            parts.append(f"loss {loss:.3f}")
        parts.append("estimating" if left is None else f"~{format_duration(left)} left")
        self.bar.set_postfix_str(", ".join(parts), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
