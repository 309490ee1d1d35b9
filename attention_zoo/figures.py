"""matplotlib, headless, and figures written atomically: the one place plots are saved from.

matplotlib is imported on first use only (a command that draws nothing never pays for it), with the
Agg backend, so no display is needed and no interactive backend is ever picked.
"""
from __future__ import annotations

import os
import tempfile
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


__all__ = ["pyplot", "save_figure"]
