"""One process or many: what the train loop needs from torch.distributed, and nothing when alone.

Launched by `torchrun --nproc_per_node=N -m attention_zoo train ...`, the environment carries RANK,
WORLD_SIZE and LOCAL_RANK; we join a process group (gloo on CPU, NCCL on GPU) and the loop wraps the
model in DistributedDataParallel. Without those variables everything here is a no-op.

Batches: every rank draws the same GLOBAL batch from the same seeded generator and keeps its own
slice of rows (`rank_rows`), so N processes with batch b/N each train on exactly the examples one
process with batch b would, and a run resumes on any number of processes.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_world(device: torch.device) -> World:
    """Join the process group torchrun set up (if any). `device` must already be this rank's device."""
    if not launched_by_torchrun():
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if world.size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_available() or (backend == "nccl" and not dist.is_nccl_available()):
            raise UserError(f"torch.distributed backend {backend!r} is not available in this torch build")
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return world


def local_device(name: str) -> torch.device:
    """`train.device` resolved for this process: auto means cuda if available; under torchrun each
    rank takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"train.device = {name!r}, but torch sees no MPS device (Apple GPUs only; use cpu or auto)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"train.device = {name!r}, but torch sees no CUDA device (use cpu or auto)")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if launched_by_torchrun() else 0)
        torch.cuda.set_device(device)
    return device


def rank_rows(batch_size: int, world: World) -> slice:
    """This rank's rows of the global batch."""
    if batch_size % world.size:
        raise UserError(f"train.batch_size ({batch_size}) must be divisible by the number of processes ({world.size})")
    per_rank = batch_size // world.size
    return slice(world.rank * per_rank, (world.rank + 1) * per_rank)


def all_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum over ranks (in place; returned for chaining)."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj: Any, world: World) -> list[Any]:
    """Every rank's `obj`, in rank order (e.g. each rank's RNG state for a checkpoint)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        # Collected first, so nothing left in a reference cycle still holds the process group or gloo's
        # work objects after it is destroyed: released during interpreter exit instead, they can abort
        # the process (a rank died with "terminate called without an active exception" in CI).
        gc.collect()
        dist.destroy_process_group()
