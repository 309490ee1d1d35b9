"""PNG plots of a sweep: validation curves per run label and the final metric with error bars.

matplotlib runs headless (Agg); each figure is written atomically (attention_zoo/figures.py).
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ..figures import pyplot, save_figure
from .records import metric_of
from .summary import grouped, mean_std
from .sweep import Sweep

CURVES, FINAL = "curves.png", "final.png"


LINESTYLES = ("-", "--", ":", "-.")


def line_styles(n: int) -> list[tuple[str, str]]:
    """n distinct (color, linestyle) pairs: tab10's ten colours, then again dashed, dotted, dash-dotted, so a sweep
    of more than ten labels (a variant x learning-rate grid) draws no two curves alike. Raises ValueError past 40."""
    if n > 10 * len(LINESTYLES):
        raise ValueError(f"{n} curves: at most {10 * len(LINESTYLES)} can be told apart in one plot")
    return [(f"C{i % 10}", LINESTYLES[i // 10]) for i in range(n)]


def _curve_key(metric: str) -> str:
    return metric[4:] if metric.startswith("val.") else "loss"


def plot_curves(path: Path, sweep: Sweep, records: list[dict[str, Any]]) -> None:
    """Mean over seeds of the validation metric against steps; the band spans the seeds' min to max."""
    plt = pyplot()
    key = _curve_key(sweep.metric)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    groups = grouped(sweep, records)
    styles = line_styles(len(groups)) if len(groups) <= 10 * len(LINESTYLES) else [(None, "-")] * len(groups)
    for (label, rs), (color, linestyle) in zip(groups.items(), styles):
        by_step: dict[int, list[float]] = {}
        for r in rs:
            for point in r["curve"]:
                if point.get(key) is not None:
                    by_step.setdefault(point["step"], []).append(point[key])
        steps = sorted(s for s, v in by_step.items() if len(v) == len(rs))  # points every seed reached
        if not steps:
            continue
        mean = [statistics.fmean(by_step[s]) for s in steps]
        line, = ax.plot(steps, mean, marker="o", markersize=2.5, linewidth=1.3, label=label, color=color,
                        linestyle=linestyle)
        if len(rs) > 1:
            ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("step")
    ax.set_ylabel(f"validation {key}")
    ax.set_title(f"{sweep.name}\nvalidation {key}, mean over seeds (band: min to max)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=90, bbox_inches="tight")


def plot_final(path: Path, sweep: Sweep, records: list[dict[str, Any]]) -> None:
    """The final metric per label: mean over seeds, error bar = standard deviation."""
    plt = pyplot()
    groups = grouped(sweep, records)
    labels, means, stds = [], [], []
    for label, rs in groups.items():
        values = [v for r in rs if (v := metric_of(r, sweep.metric)) is not None]
        if values:
            m, s = mean_std(values)
            labels.append(label), means.append(m), stds.append(s)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.4))
    y = list(range(len(labels)))
    # Points with error bars, not bars: the differences are small next to the values, and a bar
    # whose axis does not start at zero would exaggerate them.
    ax.errorbar(means, y, xerr=stds, fmt="o", capsize=4, color="#4c72b0")
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    better = "higher" if sweep.higher_is_better else "lower"
    ax.set_xlabel(f"{sweep.metric} ({better} is better; error bar: std over seeds)")
    ax.set_title(f"{sweep.name}\nfinal {sweep.metric}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path, dpi=90, bbox_inches="tight")


def write_plots(out: Path, sweep: Sweep, records: list[dict[str, Any]]) -> list[Path]:
    if not records:
        return []
    plot_curves(out / CURVES, sweep, records)
    plot_final(out / FINAL, sweep, records)
    return [out / CURVES, out / FINAL]
