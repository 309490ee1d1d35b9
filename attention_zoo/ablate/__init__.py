"""Ablations: run a sweep of configs x seeds, keep every finished result, and summarise them as a
table (mean +- std over seeds) and plots. See docs/ablations.md.

    from attention_zoo.ablate import read_sweep_file, run_sweep
    run_sweep(read_sweep_file("configs/ablations/quickstart.yaml"), Path("runs/quickstart"))
"""
from __future__ import annotations

from .runner import run_sweep, write_summaries
from .sweep import Run, Sweep, read_sweep_file

__all__ = ["Run", "Sweep", "read_sweep_file", "run_sweep", "write_summaries"]
