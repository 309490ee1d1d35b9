"""The backend registry and dispatcher.

Kept apart from the variant registry on purpose: a new variant never touches a backend, and a new
backend serves every variant whose calls it accepts. `auto` tries backends in `AUTO_ORDER` and says
(once, in the log, and in `attention-zoo describe`) why each one it skipped refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as tF
from torch import Tensor

from ..errors import UserError
from ..ops.selection.dense import penalty as dense_penalty
from ..ops.selection.structure import Selection
from ..ops.separable import FOLDABLE_DTYPES, SeparableBias, fold, sees_a_key
from ..recording import collecting
from ..registry import Registry
from .base import AttentionCall, Backend, causal_mask
from .flex import FlexBackend
from .math import MathBackend, grouped_logits, math_attention
from .sdpa import SDPABackend
from .triton import TritonBackend
from .xformers import XFormersBackend

log = logging.getLogger("attention_zoo.backends")

BACKENDS: Registry[Backend] = Registry("backend", entry_point_group="attention_zoo.backends")
BACKENDS.add("math", MathBackend())
BACKENDS.add("sdpa", SDPABackend())
BACKENDS.add("xformers", XFormersBackend())  # each of these imports its library only on first use
BACKENDS.add("triton", TritonBackend())
BACKENDS.add("flex", FlexBackend())

# triton first, though `auto` hands it only training with a trainable bias (it defers every other call):
# the one call no other fused kernel serves whole.
AUTO_ORDER = ("triton", "xformers", "sdpa", "math")
# Named only, not tried by auto: flex, until a GPU benchmark shows it faster than triton for that call.
BACKEND_CHOICES = ("auto", *AUTO_ORDER, "flex")


class BackendRefused(UserError, RuntimeError):
    """The named backend cannot run a call (or, under auto, none can). A UserError: the CLI prints it and
    exits 2, since the fix is the config's `backend:` key."""


FOLD_ALIGN = 8  # off CPU a folded head dim is padded to a multiple of this (fold_plan)
_logged: set[str] = set()  # messages already logged (each is said once)
_recorders: list[list[AttentionCall]] = []
_planned_device: list[str] = []  # while planning on the meta device: the device the plan is for


@contextmanager
def planning_for(device: str) -> Iterator[None]:
    """Inside the block, a layer running on the meta device asks `head_dim_limit` and `fuses_unequal_value_dim`
    about `device` ("cpu", "cuda"): a plan (describe's meta-device forward) then takes the decisions a real run on
    that device would, such as where residual attention's concatenated head dim outgrows the fast kernels."""
    _planned_device.append(device)
    try:
        yield
    finally:
        _planned_device.pop()


def _device_meant(device: str) -> str:
    return _planned_device[-1] if device == "meta" and _planned_device else device


def recording_calls() -> contextlib.AbstractContextManager[list[AttentionCall]]:
    """Collect the AttentionCall of every dispatch inside the block (e.g. a meta-device forward pass),
    so tools can plan backends from what the variants really ask for, without knowing any variant."""
    return collecting(_recorders)


def choose(name: str, call: AttentionCall) -> tuple[Backend, list[str]]:
    """The backend that will run `call`, and why each one before it refused. Raises BackendRefused when the named
    backend refuses (or, under auto, every backend does), RegistryError for an unknown name."""
    if name != "auto":
        backend = BACKENDS.get(name)
        reason = backend.refuse(call)
        if reason:
            # Only the plain backends are offered: asking triton or flex would compile their self-checks.
            others = [n for n in ("sdpa", "math") if n != name and not BACKENDS.get(n).refuse(call)]
            raise BackendRefused(f"backend {name!r} refused: {reason}; backend: auto, or one that accepts this call: "
                                 f"{', '.join(others) or 'none'}")
        return backend, []
    skipped = []
    for candidate in AUTO_ORDER:
        if candidate not in BACKENDS:
            continue
        backend = BACKENDS.get(candidate)
        reason = backend.refuse(call) or backend.defer(call)
        if reason is None:
            return backend, skipped
        skipped.append(f"{candidate}: {reason}")
    raise BackendRefused("no backend accepts this call: " + "; ".join(skipped))


_chosen: dict[tuple, tuple[Backend, list[str]]] = {}
MEMO_SIZE = 256  # call signatures remembered; decoding makes one per key length, so the memo must be bounded


def _backends_signature() -> tuple:
    """What a choice depends on besides the call: the registered backends, their refuse/defer methods (tests
    and plug-ins may replace them) and the environment variables the backends read at refusal time."""
    parts = []
    for name in AUTO_ORDER + ("flex",):
        if name in BACKENDS:
            b = BACKENDS.get(name)
            parts.append((name, id(b), type(b).refuse, type(b).defer, b.__dict__.get("refuse"), b.__dict__.get("defer")))
    return tuple(parts), os.environ.get("TRITON_INTERPRET"), os.environ.get("CUDA_VISIBLE_DEVICES")


def chosen_for(name: str, call: AttentionCall) -> tuple[Backend, list[str]]:
    """`choose`, memoised per (backend name, call signature), the MEMO_SIZE latest: a training step dispatches the same few calls
    every layer and step, and refusals are pure functions of them (the backends' self-checks are cached
    too). A refusal is never memoised: it raises each time."""
    if torch.compiler.is_compiling():  # traced once per graph: the memo saves nothing, and dynamo guards on it
        return choose(name, call)
    key = (name, call, _backends_signature())
    hit = _chosen.get(key)
    if hit is None:
        if len(_chosen) >= MEMO_SIZE:
            del _chosen[next(iter(_chosen))]  # the oldest entry (dicts keep insertion order)
        hit = _chosen[key] = choose(name, call)
    return hit


def dispatch(q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | Selection | SeparableBias | None, causal: bool,
             scale: float, backend: str = "auto") -> Tensor:
    """softmax(scale q k^T + bias + causal mask) v on the named backend, or the first that accepts the call
    under `auto`. q: (B, H, Nq, D); k: (B, Hkv, Nk, D), H % Hkv == 0; v: (B, Hkv, Nk, Dv) (Dv = D but for
    backends that take other value widths); `bias`: a tensor broadcastable to (B, H, Nq, Nk), a structured
    `Selection` (the bias is then -F, see ops/selection), a `SeparableBias` (row_i + col_j, folded into q and k
    where `fold_plan` allows, see ops/separable.py), or None; causal is bottom-right aligned. Returns
    (B, H, Nq, Dv) in q's dtype; a row that sees no key is 0.

    Raises BackendRefused (a UserError) when the named backend refuses the call, or none does under auto; a
    RegistryError for a backend name that is not registered; ValueError for a tensor bias that does not
    broadcast to (B, H, Nq, Nk) or a SeparableBias of the wrong shape. Other shapes are not checked here (see
    `functional.attention`)."""
    if isinstance(bias, Tensor):
        bias = as_4d_bias(bias, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    elif isinstance(bias, SeparableBias):
        bias.check(q, k)
    call = AttentionCall.from_tensors(q, k, bias, v)
    for calls in _recorders:
        calls.append(call)
    if call.device == "meta":  # a dry run (`describe`) computes shapes only; backends are chosen for a real device
        return run_on(BACKENDS.get("math"), q, k, v, bias, causal, scale)
    if isinstance(bias, SeparableBias):
        route = separable_route(backend, call)
        if route.how == "folded":
            return _attend_folded(backend, route.call, q, k, v, bias, causal, scale)
        if route.how == "dense":
            _say_once(f"attention-zoo separable bias: dense (B, H, Nq, Nk) on backend {backend}: {route.why}")
            bias, call = bias.dense(), route.call
    return _run(backend, call, q, k, v, bias, causal, scale)


def _attend_folded(backend: str, folded: AttentionCall, q: Tensor, k: Tensor, v: Tensor, bias: SeparableBias,
                   causal: bool, scale: float) -> Tensor:
    """The separable call as `fold_plan`'s `folded` call: the column term folded into q and k, at scale 1."""
    Nq, Nk, width = q.shape[2], k.shape[2], v.shape[-1]
    q, k = fold(q, k, bias, scale, head_dim=folded.head_dim)
    pad = folded.value_dim is None and width != q.shape[-1]  # the backend wants v as wide as q and k
    out = _run(backend, folded, q, k, tF.pad(v, (0, q.shape[-1] - width)) if pad else v, None, causal, 1.0)
    out = out[..., :width] if pad else out
    # A query whose every visible key col masks gets 0. Only where col masks a key: the out-of-place fill keeps
    # one more (B, H, Nq, Dv) tensor for the backward (about 5% of FoX's activations at 2048 tokens).
    if torch.compiler.is_compiling() or bias.col.isneginf().any():
        out = out.masked_fill(~sees_a_key(bias, Nq, Nk, causal), 0.0)
    return out


def _run(backend: str, call: AttentionCall, q: Tensor, k: Tensor, v: Tensor, bias, causal: bool, scale: float) -> Tensor:
    chosen, skipped = chosen_for(backend, call)
    for why in skipped:
        _say_once(f"attention-zoo auto backend: using {chosen.name} ({why})")
    return run_on(chosen, q, k, v, bias, causal, scale)


def _say_once(message: str) -> None:
    # a Logger call is a graph break under torch.compile: a compiled model's first trace says nothing (an eager
    # forward, as train's warm-up, says it; describe shows every choice)
    if not torch.compiler.is_compiling() and message not in _logged:
        _logged.add(message)
        log.info("%s", message)


@dataclasses.dataclass(frozen=True)
class SeparableRoute:
    """How a call whose bias is a SeparableBias runs (`separable_route`): `how` is "read" (the backend's own
    `separable_attention`), "folded" (`fold_plan`) or "dense" (for `why`); `call` is what the backend is asked."""

    how: str
    call: AttentionCall
    why: str = ""


def separable_route(name: str, call: AttentionCall) -> SeparableRoute:
    """The one decision dispatch acts on and `describe` prints, for a call with `call.separable_width` > 0."""
    if reads_separable(name, call):
        return SeparableRoute("read", call)
    folded, why = fold_plan(name, call)
    if folded is None:  # the call of the dense bias: the same but for the separable width
        return SeparableRoute("dense", dataclasses.replace(call, separable_width=0), why)
    return SeparableRoute("folded", folded)


def reads_separable(name: str, call: AttentionCall) -> bool:
    """Whether backend `name` takes `call`, whose bias is a SeparableBias, to its own `separable_attention`. A
    refusal is no answer yet: the folded or dense call may still be accepted (`fold_plan`)."""
    try:
        chosen, _ = chosen_for(name, call)
    except BackendRefused:
        return False
    return chosen.separable_attention is not None


def fold_plan(name: str, call: AttentionCall) -> tuple[AttentionCall | None, str]:
    """For a call whose bias is a SeparableBias (`call.separable_width` > 0): (the plain call it becomes when its
    column term is folded into q and k, "") where backend `name` should run it so, else (None, why the bias goes
    dense). The folded call has a head dim of D + separable_width (off CPU rounded up to a multiple of FOLD_ALIGN),
    no bias, and v as wide as before; for a backend that wants equal widths, the narrower of q/k and v is
    zero-padded to the wider (value_dim None). Asked only where the backend
    chosen for `call` has no `separable_attention` of its own."""
    if call.dtype not in FOLDABLE_DTYPES:
        return None, (f"in {str(call.dtype).removeprefix('torch.')} a folded key column would round the bias; "
                      "it is folded in float32 and float64 only")
    if name == "math":
        return None, "math is the reference and attends with the bias itself"
    head_dim = call.head_dim + call.separable_width
    if call.device != "cpu":  # GPU kernels want q/k widths in multiples of 8 (SDPA's fp32 kernel: of 4); zeros pad
        head_dim = -(-head_dim // FOLD_ALIGN) * FOLD_ALIGN
    if call.heads * call.q_len < call.kv_heads * head_dim:  # decoding: Nq x Nk of bias against Nk x (D + G) of k
        return None, "few queries (a decoding step, or a warm-up's 2 tokens): the dense bias is smaller than a folded copy of k"
    limit = head_dim_limit(name, call.device)
    if limit is not None and head_dim > limit:
        return None, f"the folded head dim {head_dim} is above the backend's limit {limit}"
    value_dim = call.value_dim or call.head_dim
    if not fuses_unequal_value_dim(name, call.device):  # equal widths: the narrower side is zero-padded, which
        head_dim, value_dim = max(head_dim, value_dim), None  # adds nothing to q' k'^T or to the output
    folded = dataclasses.replace(call, head_dim=head_dim, value_dim=value_dim, has_bias=False, bias_requires_grad=False,
                                 separable_width=0)
    try:
        chosen, _ = chosen_for(name, folded)
    except BackendRefused as exc:
        return None, str(exc)
    if chosen.name == "math":
        return None, "no fused backend accepts the folded call"
    return folded, ""


def as_4d_bias(bias: Tensor, full: tuple[int, int, int, int]) -> Tensor:
    """A tensor bias broadcastable to `full` = (B, H, Nq, Nk) as a 4-D view ((Nq, Nk) -> (1, 1, Nq, Nk)): every
    backend indexes a bias by those four dims. Raises ValueError naming both shapes when it does not broadcast."""
    if bias.dim() > 4 or any(b not in (1, f) for b, f in zip(bias.shape[::-1], full[::-1])):
        raise ValueError(f"attention bias of shape {tuple(bias.shape)} does not broadcast to (B, H, Nq, Nk) = {full}; "
                         "each of its trailing dims must be 1 or that size")
    return bias[(None,) * (4 - bias.dim())]  # a view: leading dims of size 1


def head_dim_limit(name: str, device: str) -> int | None:
    """The largest q/k head dim backend `name` runs fast on `device` (None: no limit): where residual attention
    stops concatenating layers' q and k. `auto` answers for sdpa, which serves plain calls."""
    return BACKENDS.get("sdpa" if name == "auto" else name).head_dim_limit(_device_meant(device))


def fuses_unequal_value_dim(name: str, device: str) -> bool:
    """`Backend.fuses_unequal_value_dim` of backend `name` (`auto` answers for sdpa, which serves plain calls)."""
    return BACKENDS.get("sdpa" if name == "auto" else name).fuses_unequal_value_dim(_device_meant(device))


def run_on(backend: Backend, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | Selection | SeparableBias | None,
           causal: bool, scale: float) -> Tensor:
    """Run the primitive on `backend`. A Selection goes to the backend's own `selective_attention` where it has
    one; otherwise -F is made dense, (B, 1, Nq, Nk), and passed as a bias (the only place that happens). A
    SeparableBias goes to the backend's own `separable_attention` where it has one, else is made dense too (the
    math reference, a dry run; `dispatch` folds it before it gets here where `fold_plan` allows). A call with
    nothing to attend (no batch element, head, query or key) runs on math whatever the backend: the result is
    empty, or 0 for queries without keys, and the kernels divide their work by these sizes."""
    if 0 in (*q.shape[:3], k.shape[2]):
        backend = BACKENDS.get("math")
    if isinstance(bias, SeparableBias):
        if backend.separable_attention is not None:
            return backend.separable_attention(q, k, v, bias, causal=causal, scale=scale)
        bias = bias.dense()
    if isinstance(bias, Selection):
        if backend.selective_attention is not None:
            return backend.selective_attention(q, k, v, bias, causal=causal, scale=scale)
        bias = dense_penalty(bias, negate=True, backend=backend.name).unsqueeze(1)
    return backend.attention(q, k, v, bias=bias, causal=causal, scale=scale)


__all__ = [
    "AttentionCall", "Backend", "BACKENDS", "BACKEND_CHOICES", "AUTO_ORDER", "BackendRefused", "choose", "dispatch",
    "head_dim_limit", "fuses_unequal_value_dim", "planning_for", "run_on", "recording_calls", "fold_plan", "reads_separable",
    "separable_route", "SeparableRoute",
    "causal_mask", "math_attention", "grouped_logits",
]
