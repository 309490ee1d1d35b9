"""matplotlib, headless, and figures written atomically: the one place plots are saved from.

matplotlib is imported on first use only (a command that draws nothing never pays for it), with the
Agg backend, so no display is needed and no interactive backend is ever picked.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 100, **savefig_kwargs) -> Path:
    """Write `fig` to `path` (PNG) so readers see the old file or the whole new one, then close it.
    Readable as any file the user makes (mkstemp alone would leave it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, **savefig_kwargs)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        pyplot().close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def save_report_and_figure(report: str | Path, text: str, figure: str | Path, draw: Callable[[Path], object]) -> None:
    """Write `text` to the file `report` (a JSON) and the figure `draw(figure)` draws, so that the figure beside the
    report is never another run's: the old figure is removed first, then the report is written, then the figure
    (each file atomically). An interruption or a failing plot leaves the old pair, the old or the new report
    without a figure, or the new pair; drawing last also keeps the report when only the plot fails. Raises what
    the writes or `draw` raise (OSError for a path that cannot be written)."""
    from .checkpoint import atomic_write_text  # imports torch: not for a command that draws nothing

    Path(figure).unlink(missing_ok=True)
    atomic_write_text(report, text)
    draw(Path(figure))


__all__ = ["pyplot", "save_figure", "save_report_and_figure"]
