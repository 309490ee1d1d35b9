"""Share a CPU op's batch elements out among torch's intra-op threads, each running its ops single-threaded.

Blocked attention loops issue many small ops per block. With torch's own threading every one of them is a
parallel region, whose cost is the threads' hand-off, not the arithmetic; under OMP_WAIT_POLICY=PASSIVE
(sleeping threads) each hand-off is a wake-up. Splitting the batch instead gives each thread whole batch
elements and no hand-offs inside the loop (docs/benchmarks.md, "Measurements behind the code's constants").
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from ..env import switch

# ATTENTION_ZOO_SPLIT_BACKWARD=0 turns the split off (the ops then run on torch's own threading).
SPLIT_ENV = "ATTENTION_ZOO_SPLIT_BACKWARD"


def batch_workers(batch: int, device: torch.device) -> int:
    """How many threads `over_batch` should use: torch's intra-op threads on CPU, at most one per batch element;
    1 elsewhere (a GPU op is one kernel launch per block, not worth splitting) or when the split is off."""
    if device.type != "cpu" or not switch(SPLIT_ENV):
        return 1
    return min(batch, torch.get_num_threads())


def over_batch(batch: int, workers: int, work: Callable[[range, int], None]) -> None:
    """Run work(batch elements, worker index) over `workers` contiguous ranges of range(batch), each in its own
    thread with torch single-threaded and grad off, and wait for all; with one worker, in this thread with
    torch's threading as it is. Exceptions propagate. Raises ValueError for workers < 1."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        with torch.no_grad():
            work(range(batch), 0)
        return
    threads = torch.get_num_threads()
    chunks = [range(i * batch // workers, (i + 1) * batch // workers) for i in range(workers)]
    try:
        futures = [_pool(workers).submit(_single_threaded, work, chunk, index) for index, chunk in enumerate(chunks)]
        for future in futures:
            future.result()
    finally:
        torch.set_num_threads(threads)  # a worker's setting also reaches process-wide (MKL) state


def _single_threaded(work: Callable[[range, int], None], chunk: range, index: int) -> None:
    torch.set_num_threads(1)  # this worker thread's own ops
    with torch.no_grad():  # grad mode is per thread: a worker starts with it on
        work(chunk, index)


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="attention-zoo-batch")


__all__ = ["batch_workers", "over_batch"]
