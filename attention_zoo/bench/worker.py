"""Measure one benchmark point in this process: `python -m attention_zoo.bench.worker '<point json>'`.

Run in a fresh process per point, so peak memory belongs to that point alone: on CPU the process's
peak resident set size (ru_maxrss, which also counts the ~0.2-0.3 GB of Python and torch), and how
far it rose above the resident size once the model was built; on CUDA torch's peak allocation.
Time is the median over `repeats` steps after `warmup` steps; a compiled point (`compiled`) first runs one
more untimed step, which compiles the forward and backward (its time: `compile_s`). The result is printed as one line
starting with RESULT_PREFIX; any exception becomes a failed result with its message.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from typing import Any

RESULT_PREFIX = "ATTENTION_ZOO_BENCH_RESULT "
PROFILE_ROWS = 20  # operators (kernels on CUDA) in a point's profile, by their own time


def rss_mb() -> float:
    """Current resident set size (Linux /proc; falls back to the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def build(point) -> Any:
    import torch

    if point.impl == "x-transformers":
        from x_transformers import Decoder, TransformerWrapper

        from ..config import STACK_DEFAULTS
        from .points import peer_kwargs, peer_stack

        kwargs, _ = peer_kwargs(point.variant, point.depth)
        if kwargs is None:
            raise ValueError("no x-transformers equivalent")
        # presets run on the default stack: so does the peer
        wrapper, decoder = peer_stack(STACK_DEFAULTS, point.head_dim or point.dim // point.heads)
        model = TransformerWrapper(
            num_tokens=point.vocab_size, max_seq_len=point.seq_len, tie_embedding=True, **wrapper,
            attn_layers=Decoder(dim=point.dim, depth=point.depth, heads=point.heads, attn_dim_head=point.head_dim,
                                **decoder, **kwargs))
    else:
        from ..config import build_model
        from .points import model_config

        model = build_model(model_config(point))
    return model.to(device=point.device, dtype=getattr(torch, point.dtype))


def measure(point) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    if point.threads:
        torch.set_num_threads(point.threads)
    torch.manual_seed(0)
    cuda = point.device.startswith("cuda")
    model = build(point)
    tokens = torch.randint(point.vocab_size, (point.batch, point.seq_len + 1), device=point.device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    note = None
    if hasattr(model, "warm_up"):  # ours: kernels built on first use are built (or loaded) before any measure
        from ..model import own_attention_note

        note = own_attention_note(model, model.warm_up(point.device), point.backend)
    if point.compiled:  # as train.compile: the whole model, after the warm-up forward built any kernel
        model = torch.compile(model)
    rss_before = rss_mb()

    def step() -> None:
        if point.mode == "fwd":
            with torch.no_grad():
                model(inputs)
        else:
            logits = model(inputs)  # (B, N, vocab)
            F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
            model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    compile_s = None
    if point.compiled:
        start = time.perf_counter()
        step()
        compile_s = time.perf_counter() - start
    for _ in range(point.warmup):
        step()
    times = []
    for _ in range(point.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    result = {"status": "ok", "median_s": median, "times_s": times, "tokens_per_s": point.batch * point.seq_len / median,
              "threads": torch.get_num_threads(), "parameters": sum(p.numel() for p in model.parameters())}
    if compile_s is not None:
        result["compile_s"] = compile_s
    if note:  # e.g. a variant with its own attend(): the point's backend label would claim what did not run
        result["note"] = note
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        result.update(peak_mb=peak, activation_mb=peak - base_alloc / 2**20, memory="cuda max_memory_allocated")
    else:
        peak = peak_rss_mb()
        result.update(peak_mb=peak, activation_mb=peak - rss_before, memory="peak RSS")
    if point.profile:  # after the peak is read: the profiler's own buffers are not the model's memory
        result["profile"] = profile_step(step, cuda)
    return result


def profile_step(step, cuda: bool) -> str:
    """One more step under torch.profiler: the operators (on CUDA, the kernels) that took the most time
    of their own, as torch's table. Where a step's time goes, not how long a step takes: the profiler
    slows the step it watches."""
    from torch.profiler import ProfilerActivity, profile

    try:  # the timings are already taken: a profiler problem costs the table, never the point
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
        with profile(activities=activities) as prof:
            step()
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        return prof.key_averages().table(sort_by=sort, row_limit=PROFILE_ROWS)
    except Exception as exc:
        return f"profiling failed: {type(exc).__name__}: {exc}"


def measure_safely(point) -> dict[str, Any]:
    """`measure`, with any exception (out of memory, a refusing backend, ...) turned into a failed result."""
    try:
        return measure(point)
    except Exception as exc:  # recorded as a failed point; the sweep goes on
        message = str(exc).strip().splitlines()
        return {"status": "failed", "reason": f"{type(exc).__name__}: {message[0] if message else ''}"[:300]}


def main(argv: list[str]) -> int:
    from .points import Point

    result = measure_safely(Point.from_json(json.loads(argv[0])))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
