"""results.jsonl: one record per finished run, appended and fsynced before the next run starts, so a
killed sweep never loses a finished result and a restarted one knows what to skip.

A record holds everything the summaries need (the validation curve included), so tables and plots
can be rebuilt from results.jsonl alone.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..train.loop import FINAL, METRICS
from ..train.metrics import fsync_append, read_jsonl
from .sweep import Run

RESULTS = "results.jsonl"


def make_record(run: Run, run_dir: Path, wall_s: float) -> dict[str, Any]:
    final = json.loads((run_dir / FINAL).read_text())
    curve = [{k: v for k, v in r.items() if k != "kind"} for r in read_jsonl(run_dir / METRICS) if r.get("kind") == "val"]
    return {
        "label": run.label, "seed": run.seed, "fingerprint": run.fingerprint, "settings": run.settings,
        "run_dir": str(run_dir), "params": final["params"], "steps": final["steps"],
        "train_loss": final["train_loss"], "val": final["val"], "tokens_per_s": final["tokens_per_s"],
        "peak_mem_mb": final["peak_mem_mb"], "train_time_s": final["train_time_s"], "wall_s": wall_s,
        "device": final["device"], "curve": curve,
    }


def append_record(out: Path, record: dict[str, Any]) -> None:
    fsync_append(out / RESULTS, json.dumps(record))


def read_records(out: Path) -> list[dict[str, Any]]:
    return list(read_jsonl(out / RESULTS))


def current_records(records: list[dict[str, Any]], runs: list[Run]) -> list[dict[str, Any]]:
    """The latest record of each of this sweep's runs (same label, seed and exact config)."""
    wanted = {(r.label, r.seed, r.fingerprint) for r in runs}
    latest = {}
    for rec in records:
        key = (rec.get("label"), rec.get("seed"), rec.get("fingerprint"))
        if key in wanted:
            latest[key] = rec
    order = {(r.label, r.seed, r.fingerprint): i for i, r in enumerate(runs)}
    return [latest[k] for k in sorted(latest, key=order.__getitem__)]


def metric_of(record: dict[str, Any], metric: str) -> float | None:
    """`val.loss` -> record["val"]["loss"]; `train_loss` -> record["train_loss"]."""
    if metric.startswith("val."):
        return record["val"].get(metric[4:])
    return record.get(metric)
