"""Compile the triton backend's kernels for an H100/H200 (sm_90) on a machine without a GPU.

Triton's interpreter (which the CPU tests run the kernels in) executes the kernel code in numpy and
never compiles it, so a kernel it runs can still fail to compile: a type that changes across a
branch, a constexpr used as a value, an op the compiler lowers differently. Triton can compile ahead
of time for a named target with its bundled ptxas, no GPU needed, and that is what this does, through
PTX to a cubin for sm_90, in bf16 and fp32.

The kernels are compiled exactly as the JIT compiles them at run time. The backend's own launch
functions (`attention_forward`, `attention_backward` with either dq strategy and with a per-key bias
gradient, `penalty_forward`,
`penalty_backward`, and the fused selective `selective_forward` and `selective_backward` with one selection
term and with two: a single term's count specialises to the constant 1) run on CPU tensors laid out as the
model lays them out (q, k, v views of the projections), each launch captured instead of run, and Triton's
own argument binder, built for sm_90, specialises the captured arguments: an integer equal to 1 (a unit
stride, GROUP without GQA) becomes a constant, pointers and integers divisible by 16 are marked so, which
lets loads vectorise. Compiled with
plain i32 strides, the same kernels would report more registers and spills than the run-time ones have
(docs/benchmarks.md, "Measurements behind the code's constants").

    python tests/sm90_compile.py                           # each kernel's first tile configuration
    python tests/sm90_compile.py --all-configs --resources  # every autotuned one, and registers
    python tests/sm90_compile.py --all-configs --resources --dtype bf16
    python tests/sm90_compile.py --dtype fp32 --each-kernel-once  # the first build of each kernel only
    python tests/sm90_compile.py --dtype fp32 --each-kernel-once --narrow-tiles  # what the tests compile

By default every distinct build the cases launch is compiled (a kernel's constexpr branches: bias or
none, causal or not, a per-head bias gradient, GQA, a head dim below its tile). tests/test_triton.py
compiles all of them in bf16 (the dtype of GPU training) and, in fp32, each kernel and dq strategy once, in
16-wide tiles: every kernel's code path in both dtypes, the tuned tiles in bf16. fp32's IEEE dots have no
tensor-core form on sm_90 and unroll into FMAs per thread, so an fp32 build's lowering and ptxas time grow
with the tile per warp: the 11 fp32 builds took 55 s in their smallest tuned tiles and 32 s in 16-wide ones
(one measurement on a busy 2-core machine).

Prints one line per distinct compile (the shared memory it needs; Hopper has 227 KiB per block, and the
autotuner skips configurations that do not fit; with --resources also the registers per thread and the
bytes spilled to the stack, read from the cubin by Triton's bundled cuobjdump: a spilling configuration
goes through local memory on every iteration) and exits 1 if any compile failed. Must run with
TRITON_INTERPRET unset: tests/test_triton.py runs it in a subprocess. The binder is Triton's internal
API (`create_function_from_signature`, `JITFunction._pack_args`; the same in triton 3.6 and 3.9).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from attention_zoo.backends import triton_kernels  # noqa: E402
from attention_zoo.backends.triton_tuning import INTERPRETED, SHARED_DQ_STRATEGIES, shared_dq_forced  # noqa: E402
from attention_zoo.ops.selection import SelectionTerm, triton_fused  # noqa: E402
from attention_zoo.ops.selection import triton as triton_selection  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SHARED_BYTES = 232448  # 227 KiB: the most shared memory one block may take on sm_90
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BATCH, HEADS, TOKENS = 2, 8, 256  # any sizes divisible by 16 specialise as 4096 tokens would


@dataclass(frozen=True)
class Case:
    """One way the backend launches its kernels: a variant's training step, or plain attention."""
    label: str
    bias: str | None  # "shared" (selective's -F, read by every head), "per_head" (residual scores) or None
    kv_heads: int = HEADS
    head_dim: int = 64
    causal: bool = True
    selection_terms: int = 0  # > 0: also the fused selective kernels, with that many selection terms
    # Kernels whose build here differs from another case's only by an integer argument's value (GQA's GROUP
    # enters them as `h // GROUP`): the same code, so ptxas would compile the same instructions again.
    skip: tuple[str, ...] = ()


CASES = (
    Case("selective", "shared", selection_terms=1),
    Case("selective + GQA, cross-layer accumulate", "shared", kv_heads=2, selection_terms=2,
         skip=("_forward", "_backward_dq", "_backward_dq_dbias_shared")),  # dk/dv loops over GROUP: compiled
    Case("residual", "per_head"),
    Case("vanilla", None),
    Case("head dim 48, no mask", None, head_dim=48, causal=False),
)


@dataclass
class Launch:
    case: str
    kernel: Autotuner
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def captured_launches(into: list, case: str):
    """Every autotuned kernel launch inside the block is recorded into `into`, not run."""
    run = Autotuner.run

    def capture(self, *args, **kwargs):
        into.append(Launch(case, self, args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}))

    Autotuner.run = capture
    try:
        yield
    finally:
        Autotuner.run = run


def launches(dtype: torch.dtype) -> list[Launch]:
    """The launches of every case's forward and backward (each dq strategy), and the penalty kernels."""
    found: list[Launch] = []
    gen = torch.Generator().manual_seed(0)
    for case in CASES:
        B, H, Hkv, N, D = BATCH, HEADS, case.kv_heads, TOKENS, case.head_dim
        q = torch.randn(B, N, H, D, generator=gen).to(dtype).transpose(1, 2)  # (B, H, N, D) as the model's
        k, v = torch.randn(B, N, 2, Hkv, D, generator=gen).to(dtype).permute(2, 0, 3, 1, 4)
        bias = None
        if case.bias == "shared":  # the (B, 1, N, N) source the backend reads, broadcast over heads
            bias = torch.randn(B, 1, N, N, generator=gen).expand(B, H, N, N)
        elif case.bias == "per_head":
            bias = torch.randn(B, H, N, N, generator=gen)
        out, lse, dout = torch.empty(B, H, N, D, dtype=dtype), torch.zeros(B, H, N), torch.randn(B, H, N, D).to(dtype)
        common = dict(causal=case.causal, scale=D ** -0.5)
        with captured_launches(found, case.label):
            triton_kernels.attention_forward(q, k, v, bias, **common)
            for strategy in SHARED_DQ_STRATEGIES if case.bias == "shared" else SHARED_DQ_STRATEGIES[:1]:
                with shared_dq_forced(strategy):
                    triton_kernels.attention_backward(q, k, v, bias, out, lse, dout, bias_grad=bias is not None,
                                                      **common)
            if case.selection_terms:  # one term is selective's own; two, cross-layer accumulate (T = 1 is specialised)
                stacked = triton_fused.StackedTerms.of([SelectionTerm(q[:, 0], k[:, 0], D ** -0.5, True, 0.5 ** t)
                                                     for t in range(case.selection_terms)])
                _, _, G = triton_fused.selective_forward(q, k, v, stacked, **common)
                triton_fused.selective_backward(q, k, v, out, lse, dout, G, stacked, **common)
            if case.bias == "shared":  # a SeparableBias's column term: (B, 1, 1, N), its gradient from the dk/dv kernel
                key_bias = torch.randn(B, 1, 1, N, generator=gen)
                triton_kernels.attention_backward(q, k, v, key_bias, out, lse, dout, bias_grad=False,
                                                  key_bias_grad=True, **common)
                triton_selection.penalty_forward(q[:, 0], k[:, 0], scale=D ** -0.5, protect_bos=True)
                triton_selection.penalty_backward(q[:, 0], k[:, 0], torch.randn(B, N, N), scale=D ** -0.5,
                                                  protect_bos=True)
    skipped = {case.label: case.skip for case in CASES}
    return [launch for launch in found if launch.kernel.fn.__name__ not in skipped[launch.case]]


def compile_for_hopper(launch: Launch, config: triton.Config):
    """(compiled kernel, what identifies its build): Triton's run-time binder, but for sm_90."""
    fn = launch.kernel.fn  # the autotuner's JITFunction
    backend = make_backend(HOPPER)
    kwargs = {**launch.kwargs, **config.all_kwargs()}
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(
        *launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    identity = (fn.__name__, str(signature), str(constexprs), str(attrs), str(config))
    return (lambda: triton.compile(ASTSource(fn, signature, constexprs, attrs), target=HOPPER,
                                   options=options.__dict__)), identity, constexprs


def resources(cubin: bytes) -> str:
    """Registers per thread and stack bytes (spills) of a compiled kernel, from the cubin itself."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        Path(path).write_bytes(cubin)
        usage = subprocess.run([str(tool), "--dump-resource-usage", path], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return f", {found.group(1)} registers, {found.group(2)} stack bytes" if found else ", resources unreadable"


def describe(launch: Launch, constexprs: dict, config: triton.Config) -> str:
    names = launch.kernel.fn.arg_names
    flags = ", ".join(f"{names[path[0]]}={value}" for path, value in constexprs.items()
                      if isinstance(value, bool) and names[path[0]] != "FP32_DOT")
    tile = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']} w{config.num_warps} s{config.num_stages}"
    return f"{launch.kernel.fn.__name__} [{launch.case}{', ' + flags if flags else ''}] {tile}"


def smallest(config: triton.Config) -> float:
    """Tile elements per warp: what a dot unrolls into per thread where it has no tensor-core form (fp32's
    IEEE dots on sm_90 become FMAs), and so what ptxas's time grows with."""
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] / config.num_warps


def narrowest(config: triton.Config, kernel: str) -> triton.Config:
    """16-wide tiles (the least tl.dot takes), 4 warps, 1 stage: the same code paths as any tile, a fraction
    of the unrolled FMAs (so of the compile time) of the smallest tuned tile. The fused selective kernels
    keep their BLOCK_M, which must be a multiple of the stored boundary rows."""
    block_m = config.kwargs["BLOCK_M"] if kernel.startswith("_selective") else 16
    return triton.Config({**config.kwargs, "BLOCK_M": block_m, "BLOCK_N": 16}, num_warps=4, num_stages=1)


def chosen_configs(configs: list[triton.Config], args, kernel: str) -> list[triton.Config]:
    if args.all_configs:
        return configs
    if args.narrow_tiles:
        return [narrowest(min(configs, key=smallest), kernel)]
    return [min(configs, key=smallest)] if args.smallest_config else configs[:1]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-configs", action="store_true", help="every autotuned configuration, not the first")
    parser.add_argument("--resources", action="store_true", help="also registers per thread and spilled stack bytes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), action="append", help="only this dtype (repeatable)")
    parser.add_argument("--each-kernel-once", action="store_true",
                        help="only the first build of each kernel (and each dq strategy), not every constexpr branch")
    parser.add_argument("--smallest-config", action="store_true",
                        help="each kernel's configuration with the fewest tile elements per warp, not its first")
    parser.add_argument("--narrow-tiles", action="store_true",
                        help="each kernel in 16-wide tiles, 4 warps (a build check of the code, not of a tuned tile)")
    args = parser.parse_args(argv)
    if INTERPRETED:
        print("TRITON_INTERPRET=1 is set: the kernels were built for the interpreter; unset it")
        return 2
    failures = 0
    for dtype_name in args.dtype or DTYPES:
        dtype, seen = DTYPES[dtype_name], set()
        for launch in launches(dtype):
            for config in chosen_configs(launch.kernel.configs, args, launch.kernel.fn.__name__):
                build, identity, constexprs = compile_for_hopper(launch, config)
                if args.each_kernel_once:  # one build per kernel, per dq strategy and per tile configuration
                    names = launch.kernel.fn.arg_names
                    strategy = [v for path, v in constexprs.items() if names[path[0]] == "WITH_DQ"]
                    identity = (launch.kernel.fn.__name__, str(strategy), str(config))
                if identity in seen:  # another case launching the very same build
                    continue
                seen.add(identity)
                what = f"{dtype_name} {describe(launch, constexprs, config)}"
                try:
                    compiled = build()
                except Exception as exc:  # report every failure, not the first
                    failures += 1
                    print(f"FAILED {what}: {type(exc).__name__}: {exc}")
                    continue
                shared = compiled.metadata.shared
                fits = "" if shared <= HOPPER_SHARED_BYTES else " (over sm_90's limit: the autotuner skips it)"
                extra = resources(compiled.asm["cubin"]) if args.resources else ""
                print(f"ok {what}: {shared} bytes of shared memory{extra}{fits}", flush=True)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
