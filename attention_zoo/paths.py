"""Output paths checked before any work: a run that trains for an hour must not fail at its first write
because `--out` lies under a file or in a folder nobody may write to."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

from .errors import UserError


def check_output_path(flag: str, path: str | Path, kind: Literal["folder", "file"]) -> Path:
    """`path` as a Path (`~` expanded) if a `kind` can be written there, else UserError naming `flag` and `path`:
    an empty path, an existing entry of the other kind (a file where a folder belongs, a folder where a file
    belongs), a device or pipe where a file belongs, a file among its parents, or a nearest existing parent that
    this process may not write into (its permission bits, then a probe file created and removed there at once:
    root passes the bits where writes fail). Leaves nothing behind. (A symbolic link to a file is written through: see
    checkpoint.atomic_write_text.)"""
    if not str(path).strip():
        raise UserError(f"{flag}: the path is empty; give the {kind} to write")
    path = Path(path).expanduser()  # as the readers (resolve_checkpoint) expand it, even when a shell did not
    if kind == "file" and path.exists() and not path.is_dir() and not path.is_file():
        raise UserError(f"{flag} {path}: not a regular file (a device, a pipe or a socket); give a file to write")
    if path.exists() and (path.is_dir() != (kind == "folder")):
        other = "a folder" if path.is_dir() else "a file"
        raise UserError(f"{flag} {path}: is {other}; give the path of a {kind} to write")
    parent = path if kind == "folder" and path.exists() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, so nothing can be written below it; give a path "
                        f"under a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write into {parent} (permission denied); give a path in a "
                        "folder you can write to")
    try:  # os.access reads permission bits, which root passes where a write still fails (an NFS share that
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".attention-zoo-probe-")  # squashes root, /proc, /sys)
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot write into {parent} ({exc.strerror or exc}); give a path in a "
                        "folder you can write to") from None
    os.close(fd)
    os.unlink(probe)
    return path
