"""Compile the triton backend's kernels for an H100/H200 (sm_90) on a machine without a GPU.

Triton's interpreter (which the CPU tests run the kernels in) executes the kernel code in numpy and
never compiles it, so a kernel it runs can still fail to compile: a type that changes across a
branch, a constexpr used as a value, an op the compiler lowers differently. Triton can compile ahead
of time for a named target with its bundled ptxas, no GPU needed, and that is what this does: every
kernel, in bf16 and fp32, with and without its bias paths, through PTX to a cubin for sm_90.

    python tests/sm90_compile.py                           # each kernel's first tile configuration
    python tests/sm90_compile.py --all-configs --resources  # every autotuned one (minutes), and registers

Prints one line per compile (the shared memory it needs; Hopper has 227 KiB per block, and the
autotuner skips configurations that do not fit; with --resources also the registers per thread and the
bytes spilled to the stack, read from the cubin by Triton's bundled cuobjdump: a spilling configuration
goes through local memory on every iteration) and exits 1 if any compile failed. Must run with
TRITON_INTERPRET unset: tests/test_triton.py runs it in a subprocess.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attention_zoo.backends import triton_kernels, triton_selection  # noqa: E402
from attention_zoo.backends.triton_tuning import INTERPRETED  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SHARED_BYTES = 232448  # 227 KiB: the most shared memory one block may take on sm_90


def jobs(dtype: str):
    """(kernel, pointer types by argument name, constexprs) for every kernel and path the backend uses."""
    fp32 = dtype == "fp32"
    data = {name: f"*{dtype}" for name in ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ")}
    floats = {name: "*fp32" for name in ("Bias", "Lse", "Delta", "DBias", "Fpen", "DF")}
    ptrs = {**data, **floats}
    common = dict(HEAD_DIM=64, FP32_DOT=fp32, BLOCK_D=64)
    return [
        (triton_kernels._forward, ptrs, dict(common, HAS_BIAS=True, CAUSAL=True)),
        (triton_kernels._forward, ptrs, dict(common, HEAD_DIM=48, HAS_BIAS=False, CAUSAL=False)),
        (triton_kernels._backward_dk_dv, ptrs, dict(common, HAS_BIAS=True, CAUSAL=True)),
        (triton_kernels._backward_dq, ptrs, dict(common, HAS_BIAS=True, BIAS_GRAD=True, CAUSAL=True)),
        (triton_kernels._backward_dq, ptrs, dict(common, HAS_BIAS=False, BIAS_GRAD=False, CAUSAL=False)),
        (triton_kernels._backward_dq_dbias_shared, {**ptrs, "DQ": "*fp32"}, dict(common, WITH_DQ=True, CAUSAL=True)),
        (triton_kernels._backward_dq_dbias_shared, {**ptrs, "DQ": "*fp32"}, dict(common, WITH_DQ=False, CAUSAL=True)),
        (triton_selection._penalty_forward, ptrs, dict(common, PROTECT_BOS=True)),
        (triton_selection._penalty_backward, {**ptrs, "DQ": "*fp32", "DK": "*fp32"}, dict(common, PROTECT_BOS=True)),
    ]


def compile_for_hopper(kernel, pointers: dict[str, str], constexprs: dict, config: triton.Config):
    fn = kernel.fn  # the autotuner's JITFunction
    names = fn.arg_names
    const = {**constexprs, **config.kwargs}
    scalars = {"qk_scale": "fp32", "scale": "fp32"}
    signature = {n: "constexpr" if n in const else pointers.get(n) or scalars.get(n, "i32") for n in names}
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in const.items()})
    return triton.compile(source, target=HOPPER, options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def resources(cubin: bytes) -> str:
    """Registers per thread and stack bytes (spills) of a compiled kernel, from the cubin itself."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        Path(path).write_bytes(cubin)
        usage = subprocess.run([str(tool), "--dump-resource-usage", path], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return f", {found.group(1)} registers, {found.group(2)} stack bytes" if found else ", resources unreadable"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-configs", action="store_true", help="every autotuned configuration, not the first")
    parser.add_argument("--resources", action="store_true", help="also registers per thread and spilled stack bytes")
    args = parser.parse_args(argv)
    if INTERPRETED:
        print("TRITON_INTERPRET=1 is set: the kernels were built for the interpreter; unset it")
        return 2
    failures = 0
    for dtype in ("bf16", "fp32"):
        for kernel, pointers, constexprs in jobs(dtype):
            configs = kernel.configs if args.all_configs else kernel.configs[:1]
            paths = ", ".join(f"{k}={v}" for k, v in constexprs.items() if k not in ("FP32_DOT", "BLOCK_D"))
            for config in configs:
                what = f"{kernel.fn.__name__} {dtype} [{paths}] {config.kwargs} w{config.num_warps} s{config.num_stages}"
                try:
                    compiled = compile_for_hopper(kernel, pointers, constexprs, config)
                except Exception as exc:  # report every failure, not the first
                    failures += 1
                    print(f"FAILED {what}: {type(exc).__name__}: {exc}")
                    continue
                shared = compiled.metadata.shared
                fits = "" if shared <= HOPPER_SHARED_BYTES else " (over sm_90's limit: the autotuner skips it)"
                extra = resources(compiled.asm["cubin"]) if args.resources else ""
                print(f"ok {what}: {shared} bytes of shared memory{extra}{fits}")
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
