"""Collecting what code deep in a forward reports, for the block of a `with` only (describe's meta-device plan)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def collecting(listeners: list[list[T]]) -> Iterator[list[T]]:
    """A fresh list added to `listeners` for the block and yielded: the reporting code appends each item to every
    list in `listeners`, so nested or concurrent collectors each get all of them."""
    items: list[T] = []
    listeners.append(items)
    try:
        yield items
    finally:  # this list itself: list.remove would take the first one *equal* to it (another collector's)
        del listeners[next(i for i, other in enumerate(listeners) if other is items)]
