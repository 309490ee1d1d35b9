"""The calibration figure: validation loss against KV-memory ratio, selective pruning beside the
sliding window, with the unpruned loss and the tolerance line."""
from __future__ import annotations

from pathlib import Path

from ..figures import pyplot, save_figure


def plot_calibration(report: dict, path: str | Path, title: str = "") -> Path:
    """Write the figure to `path` (PNG) atomically."""
    plt = pyplot()
    evaluations = report["evaluations"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    search = [e for e in evaluations if e["policy"].startswith("budget") and e["stage"] != "curve"]
    ax.scatter([e["memory_ratio"] for e in search], [e["loss"] for e in search], s=12, color="0.7",
               label="budget search")
    for prefix, color, label in (("budget", "tab:blue", "selective pruning (uniform budget)"),
                                 ("window", "tab:orange", "sliding window (BOS + recent)")):
        points = sorted((e["memory_ratio"], e["loss"]) for e in evaluations
                        if e["stage"] == "curve" and e["policy"].startswith(prefix))
        if points:
            ax.plot(*zip(*points), marker="o", color=color, label=label)
    best, window = report["calibrated"], report["window_same_memory"]
    ax.scatter([best["memory_ratio"]], [best["loss"]], marker="*", s=220, color="tab:green", zorder=5,
               label=f"calibrated budgets ({best['memory_ratio']:.1f}x)")
    top = max(report["target_loss"] * 1.05, best["loss"] * 1.02)
    # a point above the chart is left out of it, and its legend entry says so (it was an entry for nothing visible)
    shown = window["loss"] <= top
    ax.scatter([window["memory_ratio"]] if shown else [], [window["loss"]] if shown else [], marker="X", s=110,
               color="tab:red", zorder=5, label=f"window at the same memory, {window['relative_increase']:+.1%}"
               + ("" if shown else " (above the chart)"))
    if report.get("threshold"):
        t = report["threshold"]
        shown = t["loss"] <= top
        ax.scatter([t["memory_ratio"]] if shown else [], [t["loss"]] if shown else [], marker="D", s=50,
                   color="tab:purple", zorder=5, label=f"{t['policy']}: {t['memory_ratio']:.0f}x (most keys kept), "
                   f"{t['relative_increase']:+.1%}" + ("" if shown else " (above the chart)"))
    ax.axhline(report["base_loss"], color="black", linewidth=1, label="unpruned")
    ax.axhline(report["target_loss"], color="black", linestyle="--", linewidth=1,
               label=f"unpruned + {report['tolerance']:.1%}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV-memory ratio (L * N) / sum of K_l  (higher = less memory)")
    ax.set_ylabel("streamed validation loss (nats / byte)")
    ax.set_ylim(report["base_loss"] * 0.995, min(top, max(e["loss"] for e in evaluations) * 1.01))
    ax.set_title(title or f"context pruning at context {report['context']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
