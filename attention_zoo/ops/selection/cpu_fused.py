"""Selective attention's fused CPU kernel (cpu_kernel.cpp), built on first use, and its autograd wrapper.

Without a selection the same kernel is plain causal attention whose q/k and v may differ in width
(`attention`): residual attention's concatenated q and k attend with the layer's own v, unpadded.

The same algorithm as `blocked.py` (F kept at query-block boundaries, recomputed per block; Leviathan, Kalman,
Matias, "Selective Attention Improves Transformer", ICLR 2025, section 3), written as one C++ loop per pass: a
block's mask, -F, exp, dlogits and running sums are fused over a (rows, keys) tile that stays in cache, head
by head, and the block loop pays no Python or per-op cost. The `sdpa` backend runs it on CPU where it builds;
where it cannot (no C++ compiler, or `ATTENTION_ZOO_CPU_KERNEL=0`), `blocked.py` runs instead and the reason
is logged once.

The kernel is compiled by torch.utils.cpp_extension (a C++ compiler and ninja) the first time it is needed,
about a minute on 2 cores, and cached under torch's extensions folder (`TORCH_EXTENSIONS_DIR`, by default
~/.cache/torch_extensions) for every later process. It is compiled for the CPU's vector width
(torch.backends.cpu.get_cpu_capability()), which is part of the cached build's name with the source's digest.
A build killed half-way (a signal, a time limit) is redone by the next process, never waited on.

The kernel's two passes are PyTorch custom operators (`torch.library.custom_op`): `attention_zoo::cpu_forward`
and `attention_zoo::cpu_backward`, each with a fake implementation that gives its outputs' shapes and dtypes
without building anything. `FusedCPUSelectiveAttention` (an autograd.Function) calls them, so torch.compile
traces a model through the kernel in one graph instead of breaking at an opaque pybind call; the kernel itself
is still built on the first real call.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...env import switch
from .blocked import _flatten, _start_row, _terms
from .structure import Selection

log = logging.getLogger("attention_zoo.ops.selection")

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
# ATTENTION_ZOO_CPU_KERNEL=0 (or false/no/off): never build or use the kernel (the PyTorch blocked op runs instead).
KERNEL_ENV = "ATTENTION_ZOO_CPU_KERNEL"
# -fopenmp: at::parallel_for is header code whose `omp parallel` needs it (without it the kernel runs on one
# thread); its OpenMP calls bind to the runtime torch has loaded. -fno-trapping-math lets the compiler turn
# the kernel's selects (masks, exp's underflow) into vector blends; it changes no value.
_CFLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
_ARCH_FLAGS = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]}

# Query rows per block and keys per tile: a tile's buffers (a few of ROWS x KEY_CHUNK floats) stay in the core's
# cache at any length. One layer (B 4, H 8, D 64) fwd+bwd on 2 cores, against SDPA's vanilla: 128 x 512 gave
# 0.81x at 1024 tokens and 1.03x at 4096; 64 x 256 0.80x and 1.05x; untiled keys 0.77x and 1.05x
# (docs/benchmarks.md, "Measurements behind the code's constants").
ROWS = 128
KEY_CHUNK = 512

_lock = threading.Lock()
_state: dict = {}  # "module" or "refusal", once decided


def build_name() -> str:
    """The build's name: the CPU's vector width and the source's digest (a changed source is a new build)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:10]
    return f"attention_zoo_selective_cpu_{torch.backends.cpu.get_cpu_capability().lower()}_{digest}"


def build_directory() -> Path:
    """Where the build lives (a folder named `build_name()`): under TORCH_EXTENSIONS_DIR (default: torch's
    extensions root), per Python version."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return root / f"py{sys.version_info.major}{sys.version_info.minor}_attention_zoo" / build_name()


@contextlib.contextmanager
def _exclusive(path: Path, waiting: str = ""):
    """An advisory lock on `path` for this process (POSIX flock: the OS releases it when the holder dies, however
    it dies); elsewhere no lock. Logs `waiting` (if given) when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: torch's own lock file serialises builds
        yield
        return
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                log.warning(waiting)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build():
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()
    folder = build_directory()
    name = folder.name
    folder.mkdir(parents=True, exist_ok=True)
    # torch's own build lock is a plain file that a build killed by a signal or a timeout leaves behind, after
    # which every later load() waits on it forever. Builds here take an flock first, which dies with its holder:
    # whoever holds it is the only builder, so a `lock` file found then is stale.
    with _exclusive(folder.with_name(name + ".lock"), "attention-zoo: waiting for another process to finish "
                    "building the fused CPU selective-attention kernel (about a minute)"):
        for stale in ("lock", ".ninja_lock"):
            (folder / stale).unlink(missing_ok=True)
        # The build reads a copy inside its folder: torch writes the source's path into build.ninja, so two
        # checkouts of one source would otherwise rebuild each other's kernel in turn (the digest in the folder's
        # name fixes the copy's content).
        source = folder / SOURCE.name
        if not source.exists():
            partial = folder / (SOURCE.name + ".partial")
            shutil.copyfile(SOURCE, partial)
            partial.replace(source)
        if not (folder / f"{name}.so").exists():
            log.warning("attention-zoo: building the fused CPU selective-attention kernel (once per machine, about "
                        "a minute; ATTENTION_ZOO_CPU_KERNEL=0 skips it)")
        with warnings.catch_warnings():  # torch's compiler-version notices; a failure is reported below
            warnings.simplefilter("ignore")
            return load(name=name, sources=[str(source)], extra_cflags=_CFLAGS + _ARCH_FLAGS.get(capability, []),
                        build_directory=str(folder), verbose=False)


def _reason(error: Exception) -> str:
    """The telling line of a failed build (the compiler's error or 'not found', not ninja's command line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if not line.startswith("[")  # "[1/2] c++ ...": ninja's command
               and any(word in line.lower() for word in ("error", "not found"))]
    return (telling or lines or [type(error).__name__])[-1][:300]


def kernel():
    """The compiled module, or None (see `refusal`). Built once per process, under a lock; every attention call
    asks, so once decided the answer is read without taking the lock."""
    if _state:
        return _state.get("module")
    with _lock:
        if not _state:
            if not switch(KERNEL_ENV):
                _state["refusal"] = f"{KERNEL_ENV}={os.environ[KERNEL_ENV]}"
                log.info("attention-zoo: selective attention on CPU runs the PyTorch blocked op: %s", _state["refusal"])
            else:
                try:
                    _state["module"] = _build()
                except Exception as error:  # noqa: BLE001 -- any build failure means: use the PyTorch op
                    _state["refusal"] = f"the C++ kernel did not build ({type(error).__name__}: {_reason(error)})"
                    log.warning("attention-zoo: selective attention on CPU runs the PyTorch blocked op: %s",
                                _state["refusal"])
        return _state.get("module")


# Called by torch.compile at trace time, never traced: the first call builds the kernel (a lock, files, a
# compiler), which dynamo cannot trace, and the answer holds for the process.
@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the kernel is available (`kernel()` is not None): what the attention paths ask. Builds it if not
    tried yet."""
    return kernel() is not None


def refusal() -> str | None:
    """Why the fused CPU kernel is not used (None when it is available). Builds it if not tried yet."""
    kernel()
    return _state.get("refusal")


def _module():
    """The kernel module for the ops' real implementations (building it on first use), or a RuntimeError."""
    module = kernel()
    if module is None:
        raise RuntimeError(f"the fused CPU kernel is not available: {refusal()}")
    return module


# The operators' schemas are written out rather than inferred from annotations: this module's annotations are
# strings (`from __future__ import annotations`), whose inference has changed between torch releases (the floor
# is 2.4); tests/test_compile.py's opcheck checks the schemas against the implementations. Every input is in one
# float dtype (float32 or float64), as the kernel checks; outputs are new, contiguous tensors of that dtype,
# aliasing no input.
_FORWARD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor[] sel_q, Tensor[] sel_k, float[] weights, "
                   "bool[] protect_bos, Tensor start, bool causal, int rows, int chunk) -> (Tensor, Tensor, Tensor)")
_BACKWARD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor dout, Tensor lse, Tensor delta, Tensor G, Tensor[] sel_q, "
                    "Tensor[] sel_k, float[] weights, bool[] protect_bos, bool causal, int rows, int chunk) -> Tensor[]")


@torch.library.custom_op("attention_zoo::cpu_forward", mutates_args=(), device_types="cpu", schema=_FORWARD_SCHEMA)
def cpu_forward(q, k, v, sel_q, sel_k, weights, protect_bos, start, causal, rows, chunk):
    """The kernel's forward: q (B, H, Nq, D) with the softmax scale folded in, k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv);
    per selection term its q (B, Nq, Ds) with its scale folded in, k (B, Nk, Ds), weight and protect_bos; start
    (B, Nk), F's first row. Returns out (B, H, Nq, Dv), lse (B, H, Nq) and G (B, ceil(Nq / rows), Nk), F's first
    row of each query block."""
    return tuple(_module().forward(q, k, v, sel_q, sel_k, weights, protect_bos, start, causal, rows, chunk))


@cpu_forward.register_fake
def _(q, k, v, sel_q, sel_k, weights, protect_bos, start, causal, rows, chunk):
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    return (q.new_empty(B, H, Nq, v.shape[3]), q.new_empty(B, H, Nq), q.new_empty(B, (Nq + rows - 1) // rows, Nk))


@torch.library.custom_op("attention_zoo::cpu_backward", mutates_args=(), device_types="cpu", schema=_BACKWARD_SCHEMA)
def cpu_backward(q, k, v, dout, lse, delta, G, sel_q, sel_k, weights, protect_bos, causal, rows, chunk):
    """The kernel's backward (inputs as `cpu_forward`'s, with dout (B, H, Nq, Dv), the forward's lse and G and
    delta (B, H, Nq) = rowsum(dout * out)). Returns [dq, dk, dv, carry, d sel_q per term..., d sel_k per term...]:
    gradients with respect to the scaled q and sel_q as given, and carry (B, Nk), start's gradient."""
    return list(_module().backward(q, k, v, dout, lse, delta, G, sel_q, sel_k, weights, protect_bos, causal, rows,
                                   chunk))


@cpu_backward.register_fake
def _(q, k, v, dout, lse, delta, G, sel_q, sel_k, weights, protect_bos, causal, rows, chunk):
    like = [torch.empty_like(t.contiguous()) for t in (q, k, v)]  # the kernel's zeros_like of contiguous inputs
    return [*like, q.new_empty(q.shape[0], k.shape[2]), *(torch.empty_like(t.contiguous()) for t in (*sel_q, *sel_k))]


def _compute_dtype(q: Tensor, terms) -> torch.dtype:
    """float64 if q or a selection is float64, else float32 (half inputs are computed in float32)."""
    return torch.float64 if torch.float64 in (q.dtype, *(t.q.dtype for t in terms)) else torch.float32


class FusedCPUSelectiveAttention(torch.autograd.Function):
    """q (B, H, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), then each term's q_s, k_s and accumulated
    (flattened, as `blocked.BlockedSelectiveAttention` takes them; none: plain attention) -> out (B, H, Nq, Dv)
    in q's dtype.
    Saves q, k, v, the output, the log-sum-exp per row (B, H, Nq) and F's block-start rows (B, Nblocks, Nk).

    Its forward and backward call the custom operators `cpu_forward` and `cpu_backward`. It stays an
    autograd.Function rather than `register_autograd` on `cpu_forward`: it saves q, k and v as the model hands
    them (views the model keeps anyway) and remakes the kernel's contiguous, scaled, compute-dtype operands in
    the backward, while an operator differentiated by `register_autograd` takes those operands as its inputs
    and would keep them alive until the backward (up to three more (B, H, N, D) tensors per layer in eager
    training); and the terms' flattened structure (`meta`: which carry an accumulator) stays Python here."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, rows: int, chunk: int, meta: tuple, *term_tensors):
        terms = _terms(meta, term_tensors)
        ct = _compute_dtype(q, terms)
        ops = _operands(q, k, v, terms, scale, ct)
        start = _start_row(terms, q.shape[0], k.shape[2], ct, q.device)
        out, lse, G = cpu_forward(*ops, start, causal, rows, chunk)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, G, *term_tensors)
        ctx.causal, ctx.scale, ctx.rows, ctx.chunk, ctx.meta = causal, scale, rows, chunk, meta
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse, G, *term_tensors = ctx.saved_tensors
        terms = _terms(ctx.meta, term_tensors)
        ct = lse.dtype
        qs, kc, vc, sel_q, sel_k, weights, protect = _operands(q, k, v, terms, ctx.scale, ct)
        do = dout.to(ct).contiguous()
        delta = torch.linalg.vecdot(do, out.to(ct))  # (B, H, Nq): rowsum(P * dP)
        dq, dk, dv, carry, *dsel = cpu_backward(qs, kc, vc, do, lse, delta, G, sel_q, sel_k, weights, protect,
                                                 ctx.causal, ctx.rows, ctx.chunk)
        dq.mul_(ctx.scale)  # the kernel saw scale * q
        grads = []
        for index, term in enumerate(terms):
            grads += [dsel[index].mul_(term.scale).to(term.q.dtype), dsel[len(terms) + index].to(term.k.dtype)]
            if term.accumulated is not None:  # accumulated[j] enters every row's F with the term's weight
                grads.append((carry * term.weight).to(term.accumulated.dtype))
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, *grads)


def _operands(q, k, v, terms, scale: float, ct: torch.dtype):
    """The kernel's inputs: contiguous, in `ct`, each q with its scale folded in."""
    qs = torch.mul(q, scale, out=torch.empty(q.shape, dtype=ct, device=q.device))
    sel_q = [torch.mul(t.q, t.scale, out=torch.empty(t.q.shape, dtype=ct, device=q.device)) for t in terms]
    sel_k = [t.k.to(ct).contiguous() for t in terms]
    return (qs, k.to(ct).contiguous(), v.to(ct).contiguous(), sel_q, sel_k, [float(t.weight) for t in terms],
            [bool(t.protect_bos) for t in terms])


def _apply(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, rows: int, chunk: int, meta: tuple,
           tensors) -> Tensor:
    """`FusedCPUSelectiveAttention` with its numbers (scale, each term's scale and weight) as plain Python values.
    Under torch.compile with dynamic shapes a float attribute of a module (a layer's scale) can arrive symbolic,
    and dynamo (torch 2.13) fails on one first read inside the Function's forward ("lift_tracked_freevar_to_input
    should not be called on root SubgraphTracer"); read here, each is specialised to its value, as the kernel
    takes it anyway."""
    meta = tuple((float(s), bool(protect), float(w), bool(acc)) for s, protect, w, acc in meta)
    return FusedCPUSelectiveAttention.apply(q, k, v, bool(causal), float(scale), rows, chunk, meta, *tensors)


def _empty(q: Tensor, k: Tensor) -> bool:
    """No batch element, head or query: the kernel splits its work by these sizes (a division by zero killed the
    process with SIGFPE), while the reference returns the empty result. (No key is fine: the kernel gives 0.)"""
    return 0 in (*q.shape[:3], k.shape[1])


def selective_attention(q: Tensor, k: Tensor, v: Tensor, selection: Selection, *, causal: bool, scale: float,
                        rows: int | None = None, chunk: int | None = None) -> Tensor:
    """softmax(scale q k^T - F + causal) v on CPU with the fused kernel, F never stored; query blocks of `rows`
    (default ROWS) and key tiles of `chunk` (default KEY_CHUNK).

    q: (B, H, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv), H % Hkv == 0; `selection` of shape (B, Nq, Nk).
    Returns (B, H, Nq, Dv) in q's dtype (half inputs computed in float32). Raises ValueError on mismatched
    shapes and RuntimeError when the kernel is not available (`refusal()` says why)."""
    Bs, Nqs, Nks = selection.shape
    if (Bs, Nqs, Nks) != (q.shape[0], q.shape[2], k.shape[2]):
        raise ValueError(f"selection (B, Nq, Nk) = {(Bs, Nqs, Nks)} does not match q{tuple(q.shape)} k{tuple(k.shape)}")
    if not available():
        raise RuntimeError(f"the fused CPU selective kernel is not available: {refusal()}")
    if _empty(q, k):
        from .reference import selective_attention as reference

        return reference(q, k, v, selection, causal=causal, scale=scale)
    meta, tensors = _flatten(selection)
    return _apply(q, k, v, causal, scale, rows or ROWS, chunk or KEY_CHUNK, meta, tensors)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float, rows: int | None = None,
              chunk: int | None = None) -> Tensor:
    """softmax(scale q k^T + causal) v on CPU with the fused kernel: q (B, H, Nq, D), k (B, Hkv, Nk, D),
    v (B, Hkv, Nk, Dv), any Dv (flash kernels want Dv = D). Returns (B, H, Nq, Dv) in q's dtype. Raises
    RuntimeError when the kernel is not available (`refusal()` says why)."""
    if not available():
        raise RuntimeError(f"the fused CPU kernel is not available: {refusal()}")
    if _empty(q, k):
        from ...backends.math import math_attention

        return math_attention(q, k, v, causal=causal, scale=scale)
    return _apply(q, k, v, causal, scale, rows or ROWS, chunk or KEY_CHUNK, (), [])


__all__ = ["FusedCPUSelectiveAttention", "selective_attention", "attention", "kernel", "available", "refusal",
           "KERNEL_ENV", "cpu_forward", "cpu_backward"]
