"""Tile sizes for the Triton kernels: autotuned on the GPU they run on, small and fixed in the interpreter.

Each kernel is wrapped in `triton.autotune` over flash-attention-shaped configurations: on first use
per (Nq, Nk, head dim, dtypes) Triton times each on the real GPU and keeps the fastest (configs that do not fit the GPU's
shared memory or registers are skipped by the autotuner). Kernels that accumulate with atomics name
those outputs in `reset_to_zero`, since the autotuner runs them once per configuration.

In Triton's interpreter (TRITON_INTERPRET=1, CPU) the configurations are 16-row tiles, two of them so
the tests exercise the autotuning path itself (reset_to_zero included), timed by the wall clock.
ATTENTION_ZOO_TRITON_AUTOTUNE=0 keeps each kernel's first configuration only: compiling every
configuration for every dtype and head dim dominates a GPU test run, where speed does not matter.
"""
from __future__ import annotations

import os
import time

import triton


@triton.jit
def _probe():
    pass


# Whether triton.jit builds kernels for Triton's interpreter (TRITON_INTERPRET=1 when triton was imported).
INTERPRETED = type(_probe).__name__ == "InterpretedFunction"

# The interpreter runs these kernels from triton 3.7 on; 3.6's fails on loop bounds taken from program ids
# ("only 0-dimensional arrays can be converted to Python scalars"). Compiled kernels ran on 3.6 (an H200).
INTERPRETER_MIN_VERSION = (3, 7)
VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
INTERPRETER_CONFIGS = [(16, 16, 1, 1), (16, 32, 1, 1)]
# Chosen from the resources of the sm_90 builds, read without a GPU (`python tests/sm90_compile.py
# --all-configs --resources`, bf16, head dim 64): a configuration whose registers overflow spills tiles to
# local memory on every iteration. Each kernel lists the shapes that build without spilling (or barely)
# and suit its loop: the forward and dq loop over keys (wide query blocks, narrow key blocks), dk/dv over
# queries (the reverse). The head-shared dq/d(bias) kernel holds the bias tile, its gradient and one
# head's P and dS at once: only 32 x 32 tiles with 8 warps build spill-free, so slightly spilling wider
# tiles are kept for the autotuner to weigh against the 2x more dq atomics of narrow key blocks.
# Before that scan, the first H200 run used 2-stage 64/128 x 64 tiles, most of which spill.
ATTENTION_CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 2)]
DKDV_CONFIGS = [(32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2), (32, 64, 4, 2), (32, 32, 8, 3)]
DQ_CONFIGS = [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 3), (32, 64, 8, 2), (64, 64, 8, 3), (32, 32, 8, 3)]
SHARED_DQ_CONFIGS = [(32, 32, 8, 3), (32, 32, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2)]
PENALTY_CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2)]
KEY = ["Nq", "Nk", "HEAD_DIM"]
# Keys per program of the head-shared dq/d(bias) kernel: a multiple of every BLOCK_N above. In the
# interpreter 32, so the tests' 37 to 50 keys cross a span boundary.
KEY_SPAN = 32 if INTERPRETED else 512


def _wall_clock(fn, quantiles=None):
    start = time.perf_counter()
    fn()
    elapsed = (time.perf_counter() - start) * 1e3
    return [elapsed] * len(quantiles) if quantiles else elapsed


def tuned(configs: list[tuple[int, int, int, int]], reset_to_zero: list[str] | None = None):
    """triton.autotune over `configs` (the interpreter's own on CPU), keyed on the problem size."""
    if INTERPRETED:
        chosen = INTERPRETER_CONFIGS
    else:
        chosen = configs[:1] if os.environ.get("ATTENTION_ZOO_TRITON_AUTOTUNE") == "0" else configs
    return triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in chosen],
        key=KEY, reset_to_zero=reset_to_zero, do_bench=_wall_clock if INTERPRETED else None)


def head_block(head_dim: int) -> int:
    """The head-dim tile: a power of two, at least 16 (tl.dot's minimum); columns past head_dim are masked."""
    return max(16, triton.next_power_of_2(head_dim))


__all__ = ["INTERPRETED", "INTERPRETER_MIN_VERSION", "VERSION", "KEY_SPAN", "tuned", "head_block", "ATTENTION_CONFIGS", "DKDV_CONFIGS", "DQ_CONFIGS", "SHARED_DQ_CONFIGS", "PENALTY_CONFIGS"]
