"""The streaming figure: loss (bucketed) and keys held against position, one line per model and policy,
with the training length marked."""
from __future__ import annotations

from pathlib import Path

from ..figures import pyplot, save_figure


def plot_stream(report: dict, path: str | Path) -> Path:
    """Write the figure for a `stream` report (see commands/stream.py) to `path` (PNG) atomically."""
    plt = pyplot()
    fig, (loss_ax, keys_ax) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for row in report["entries"]:
        size = row["bucket"]
        centres = [start + size / 2 for start in range(0, report["length"], size)]
        line, = loss_ax.plot(centres, row["bucket_loss"], marker=".", label=row["label"])
        keys_ax.plot(range(1, report["length"] + 1), row["position_keys"], color=line.get_color(), label=row["label"])
    train_lengths = {row["train_length"] for row in report["entries"]}
    for ax in (loss_ax, keys_ax):
        for n in train_lengths:
            ax.axvline(n, color="black", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    loss_ax.set_ylabel(f"loss (nats / token, mean of {report['entries'][0]['bucket']} positions)")
    loss_ax.set_title(f"{report['dataset']} {report['split']}: {report['sequences']} sequences of {report['length']} "
                      "tokens, one at a time (dashed: training length)", fontsize=9)
    loss_ax.legend(fontsize=8)
    keys_ax.set_yscale("log")
    keys_ax.set_ylabel("keys held (all layers)")
    keys_ax.set_xlabel("position")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
