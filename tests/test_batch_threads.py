"""ops/batch_threads.py: a CPU op's batch elements shared out among worker threads."""
from __future__ import annotations

import threading

import pytest
import torch

from attention_zoo.ops import batch_threads
from attention_zoo.ops.batch_threads import batch_workers, over_batch


@pytest.mark.parametrize("batch, workers", [(1, 1), (5, 1), (5, 2), (4, 3), (2, 2)])
def test_every_element_once_each_range_in_one_worker(batch, workers):
    seen, lock = [], threading.Lock()

    def work(elements: range, worker: int) -> None:
        assert not torch.is_grad_enabled()
        if workers > 1:
            assert torch.get_num_threads() == 1 and threading.current_thread() is not threading.main_thread()
        with lock:
            seen.append((worker, list(elements)))

    before = torch.get_num_threads()
    over_batch(batch, workers, work)
    assert torch.get_num_threads() == before
    assert sorted(e for _, elements in seen for e in elements) == list(range(batch))
    assert sorted(w for w, _ in seen) == list(range(workers))


def test_a_workers_exception_reaches_the_caller_and_threads_are_restored():
    def work(elements: range, worker: int) -> None:
        if worker == 1:
            raise RuntimeError("worker 1 failed")

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="worker 1 failed"):
        over_batch(4, 2, work)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="workers must be >= 1"):
        over_batch(4, 0, work)


def test_workers_follow_the_threads_and_the_batch_on_cpu_only(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert batch_workers(4, torch.device("cpu")) == 2 and batch_workers(1, torch.device("cpu")) == 1
        assert batch_workers(4, torch.device("cuda")) == 1
        monkeypatch.setenv(batch_threads.SPLIT_ENV, "0")
        assert batch_workers(4, torch.device("cpu")) == 1
    finally:
        torch.set_num_threads(before)
