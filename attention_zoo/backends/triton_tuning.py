"""Tile sizes for the Triton kernels: autotuned on the GPU they run on, small and fixed in the interpreter.

Each kernel is wrapped in `triton.autotune` over flash-attention-shaped configurations: on first use
per (Nq, Nk, head dim, dtypes) Triton times each on the real GPU and keeps the fastest (configs that do not fit the GPU's
shared memory or registers are skipped by the autotuner). Kernels that accumulate with atomics name
those outputs in `reset_to_zero`, since the autotuner runs them once per configuration.

In Triton's interpreter (TRITON_INTERPRET=1, CPU) the configurations are 16-row tiles: one per kernel, but
two for the kernels that add atomically, so the tests exercise the autotuning path itself where it matters
(each configuration is timed by the wall clock and the outputs reset to zero in between). Two configurations
cost three runs of a kernel at each new problem size (both timed, then the chosen one run again): with two
everywhere, that was most of the interpreter's time in the tests.
ATTENTION_ZOO_TRITON_AUTOTUNE=0 keeps each kernel's first configuration only: compiling every
configuration for every dtype and head dim dominates a GPU test run, where speed does not matter.
"""
from __future__ import annotations

import contextlib
import time

import triton

from ..env import env_word, switch


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
INTERPRETER_CONFIGS = [(16, 16, 1, 1)]
INTERPRETER_AUTOTUNED_CONFIGS = [(16, 16, 1, 1), (16, 32, 1, 1)]  # kernels with reset_to_zero
# Candidates for the autotuner, which times them on the GPU; the first is what ATTENTION_ZOO_TRITON_AUTOTUNE=0
# keeps. Chosen from the registers of the sm_90 builds as the JIT specialises them (unit strides constant,
# 16-divisible sizes marked), read without a GPU: `python tests/sm90_compile.py --all-configs --resources`.
# In bf16 at head dim 64 every first configuration builds without spilling; of the others only two spill,
# a little, and stay for the autotuner to weigh: the forward's 128x128 with a bias (flash attention's own
# shape, spill-free without one) and the head-shared kernel's 64x64 with atomic dq (fewer dq atomics than
# narrower key blocks). The forward and dq loop over keys (wide query blocks), dk/dv over queries (the
# reverse). fp32, which is for exactness, spills in its larger tiles.
# (An earlier scan compiled every integer argument as a plain i32, which takes up to twice the registers:
# it showed spills everywhere and cut the head-shared dq/d(bias) kernel to 32x32 tiles.)
ATTENTION_CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 8, 3), (128, 32, 8, 3)]
DKDV_CONFIGS = [(32, 128, 8, 2), (128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2)]
DQ_CONFIGS = [(128, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 3), (64, 64, 8, 2), (64, 32, 8, 3), (32, 64, 8, 2)]
SHARED_DQ_CONFIGS = [(32, 128, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2), (32, 32, 8, 3)]
PENALTY_CONFIGS = [(64, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2), (32, 64, 4, 2)]
# The fused selective kernels (ops/selection/triton_fused.py) keep F at the boundaries of query blocks of
# SELECTIVE_ROWS rows (G, and the backward's carry rows): the boundary and key-pass kernels walk blocks of
# exactly that many rows, the forward and query pass blocks of a multiple of it, so every tile starts on a
# stored row. Not timed on a GPU yet (none this session). Each list's first configuration builds without
# spilling in bf16 at head dim 64, with one selection term and with two, as read from the sm_90 builds
# (`python tests/sm90_compile.py --all-configs --resources`); these kernels hold more tiles than flash
# attention's (F, dF, every head's P and dS), so wider tiles spill: the forward's 64 x 64 and 128 x 64 by 8 to
# 96 bytes a thread, the key pass's 64 x 64 by 248 to 320 (64 x 128, over 1 KB, is left out), the query
# pass's 64 x 64 by 64 to 112; they stay for the autotuner to weigh. The key pass's 64 x 32 spills 72 bytes
# with two terms. The interpreter runs one configuration each, 32-row blocks where a multiple is allowed so
# the tests cover a tile holding two stored rows.
SELECTIVE_ROWS = 16 if INTERPRETED else 64
SELECTIVE_ROW_CONFIGS = [(64, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2)]  # BLOCK_M == SELECTIVE_ROWS
SELECTIVE_FORWARD_CONFIGS = [(64, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3)]
SELECTIVE_QUERY_CONFIGS = [(64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)]
INTERPRETER_ROW_CONFIGS = [(16, 16, 1, 1)]
INTERPRETER_WIDE_CONFIGS = [(32, 16, 1, 1)]
KEY = ["Nq", "Nk", "HEAD_DIM"]
# Keys per program of the head-shared dq/d(bias) kernel: a multiple of every BLOCK_N it is tuned over (a key
# block crossing a span boundary would be computed by two programs). In the interpreter 32, so the tests'
# 37 to 50 keys cross a span boundary.
COMPILED_KEY_SPAN, INTERPRETER_KEY_SPAN = 512, 32
KEY_SPAN = INTERPRETER_KEY_SPAN if INTERPRETED else COMPILED_KEY_SPAN


def _wall_clock(fn, quantiles=None):
    start = time.perf_counter()
    fn()
    elapsed = (time.perf_counter() - start) * 1e3
    return [elapsed] * len(quantiles) if quantiles else elapsed


def tuned(configs: list[tuple[int, int, int, int]], reset_to_zero: list[str] | None = None,
          also_key: tuple[str, ...] = (), interpreter: list[tuple[int, int, int, int]] | None = None,
          key: list[str] | None = None):
    """triton.autotune over `configs` (on CPU `interpreter`, by default INTERPRETER_CONFIGS, or
    INTERPRETER_AUTOTUNED_CONFIGS for a kernel with `reset_to_zero`), keyed on the
    problem size (`key`, by default KEY) and on `also_key`: constexprs that change what the kernel does (the
    autotuner's key leaves constexprs out)."""
    if INTERPRETED:
        chosen = interpreter or (INTERPRETER_AUTOTUNED_CONFIGS if reset_to_zero else INTERPRETER_CONFIGS)
    else:
        chosen = configs if switch("ATTENTION_ZOO_TRITON_AUTOTUNE") else configs[:1]
    return triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in chosen],
        key=[*(key or KEY), *also_key], reset_to_zero=reset_to_zero, do_bench=_wall_clock if INTERPRETED else None)


# Two exact ways to get dq when the bias is head-shared and needs a gradient (selective's -F):
# "atomic": the d(bias) kernel, which walks every head per tile, also adds each head's dq tile atomically;
# "recompute": it computes d(bias) alone and the per-head dq kernel (dq in registers, no atomics)
# recomputes P and dS: two more tile matmuls per head, against B*H*Nq*D*Nk/BLOCK_N/2 atomic adds.
# Deterministic by default: "recompute" (no atomics, so gradients repeat bit for bit). Atomic adds land in
# any order, so "atomic" runs only when asked: ATTENTION_ZOO_TRITON_SHARED_DQ=atomic, or "fastest" to time
# both once per problem on CUDA and keep the faster.
SHARED_DQ_STRATEGIES = ("atomic", "recompute")
SHARED_DQ_ENV = "ATTENTION_ZOO_TRITON_SHARED_DQ"
_shared_dq_chosen: dict[tuple, str] = {}
_shared_dq_forced: str | None = None


@contextlib.contextmanager
def shared_dq_forced(strategy: str):
    """Every head-shared dq inside the block by `strategy`: the self-check checks each one."""
    global _shared_dq_forced
    previous, _shared_dq_forced = _shared_dq_forced, strategy
    try:
        yield
    finally:
        _shared_dq_forced = previous


def _gpu_milliseconds(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn)


def _capturing_cuda_graph() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def shared_dq_strategy(key: tuple, run, timer=_gpu_milliseconds) -> str:
    """The strategy for this problem `key`: "recompute" (deterministic) unless the environment asks for
    "atomic", or for "fastest": then the faster of `run(strategy)` timed once per key on CUDA (both give the
    same result up to summation order: each run writes d(bias) whole and returns a fresh dq)."""
    if _shared_dq_forced:
        return _shared_dq_forced
    asked = env_word(SHARED_DQ_ENV)
    if asked in SHARED_DQ_STRATEGIES:
        return asked
    if asked != "fastest":
        return "recompute"
    if INTERPRETED:
        return "recompute"
    if key not in _shared_dq_chosen and _capturing_cuda_graph():
        return "atomic"  # timing synchronises, which a CUDA graph capture forbids; decide on a plain call
    if key not in _shared_dq_chosen:
        times = {strategy: timer(lambda strategy=strategy: run(strategy)) for strategy in SHARED_DQ_STRATEGIES}
        _shared_dq_chosen[key] = min(times, key=times.get)
    return _shared_dq_chosen[key]


def head_block(head_dim: int) -> int:
    """The head-dim tile: a power of two, at least 16 (tl.dot's minimum); columns past head_dim are masked."""
    return max(16, triton.next_power_of_2(head_dim))


__all__ = [
    "SHARED_DQ_STRATEGIES", "SHARED_DQ_ENV", "shared_dq_strategy", "shared_dq_forced", "INTERPRETED",
    "INTERPRETER_MIN_VERSION", "VERSION", "KEY_SPAN", "COMPILED_KEY_SPAN", "INTERPRETER_KEY_SPAN", "tuned",
    "head_block", "SELECTIVE_ROWS", "SELECTIVE_ROW_CONFIGS", "SELECTIVE_FORWARD_CONFIGS", "SELECTIVE_QUERY_CONFIGS",
    "INTERPRETER_ROW_CONFIGS", "INTERPRETER_WIDE_CONFIGS", "INTERPRETER_CONFIGS",
    "INTERPRETER_AUTOTUNED_CONFIGS", "ATTENTION_CONFIGS", "DKDV_CONFIGS", "DQ_CONFIGS",
    "SHARED_DQ_CONFIGS", "PENALTY_CONFIGS"
]
