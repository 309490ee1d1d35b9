"""What a variant is: the AttentionVariant protocol, its declared parameters, and a base class.

A variant owns one layer's attention: its projections, the bias it adds to the logits, the state it
reads from earlier layers and writes for later ones (see `state.py`), and its inference cache. It
never computes softmax itself: that is the backend's job (`backends/`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Protocol, runtime_checkable

from torch import Tensor, nn

from .backends import dispatch, head_dim_limit
from .cache import LayerCache
from .ops import residual
from .state import RESIDUAL_SCORES


@dataclass(frozen=True)
class LayerShape:
    """Where a variant sits: model width, heads, and its place in the stack."""

    dim: int
    heads: int
    head_dim: int
    layer_index: int = 0
    depth: int = 1


def type_name(types: type | tuple[type, ...]) -> str:
    """How YAML users read a declared type: `int or null`."""
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def type_ok(value: Any, types: type | tuple[type, ...]) -> bool:
    """isinstance as YAML users mean it: `true` is not a number, and an int is fine where a float is."""
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:
        return False
    if float in types and isinstance(value, int):
        return True
    return isinstance(value, types)


@dataclass(frozen=True)
class Param:
    """A declared variant parameter: validated from YAML before anything is built."""

    type: type | tuple[type, ...]
    default: Any = None
    doc: str = ""
    choices: tuple[Any, ...] | None = None
    required: bool = False
    # check(value, shape) -> error message or None; runs only when the type is right
    check: Callable[[Any, LayerShape], str | None] | None = None

    def type_name(self) -> str:
        return type_name(self.type)


@runtime_checkable
class AttentionVariant(Protocol):
    """The contract the stack relies on. Subclassing `ProjectedAttention` gives all of it for free."""

    params: ClassVar[dict[str, Param]]
    reads: tuple[str, ...]  # state channels that must have been written by an earlier layer
    optional_reads: tuple[str, ...]  # channels used when present
    writes: tuple[str, ...]  # channels this layer writes

    def forward(self, x: Tensor, state: Mapping[str, Tensor], cache: LayerCache | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """x: (B, N, dim) -> (B, N, dim), plus the state updates this layer writes."""
        ...


def _kv_heads_check(value: int | None, shape: LayerShape) -> str | None:
    if value is None:
        return None
    if value < 1 or shape.heads % value:
        valid = [d for d in range(1, shape.heads + 1) if shape.heads % d == 0]
        return f"heads ({shape.heads}) must be divisible by kv_heads; valid: {', '.join(map(str, valid))}"
    return None


def _head_index_check(value: int, shape: LayerShape) -> str | None:
    return None if 0 <= value < shape.heads else f"must be a query head index in [0, {shape.heads - 1}]"


KV_HEADS = Param((int, type(None)), None, "key/value heads (GQA); null means one per query head", check=_kv_heads_check)
SELECTION_HEAD = Param(int, 0, "query head whose logits select what later tokens ignore", check=_head_index_check)
PROTECT_BOS = Param(bool, True, "never penalise key 0 (BOS)")
RESIDUAL = Param(bool, False, "also carry RealFormer residual scores (they then include -F)")


class ProjectedAttention(nn.Module):
    """Multi-head attention with grouped k/v; subclasses only say what bias they add.

    forward: project, extend the cache, ask `attention_bias` for (bias, updates), call the backend,
    project back. With `carry_residual`, the layer attends with R_l = L_l + bias + R_{l-1} and writes R_l
    (RealFormer, including whatever bias the variant adds), as q and k concatenated over layers where it
    can (ops/residual.py), else as a dense (B, H, Nq, Nk) tensor.
    """

    params: ClassVar[dict[str, Param]] = {"kv_heads": KV_HEADS}
    carry_residual: bool = False

    def __init__(self, shape: LayerShape, *, kv_heads: int | None = None, backend: str = "auto"):
        super().__init__()
        self.shape = shape
        self.heads = shape.heads
        self.kv_heads = kv_heads or shape.heads
        self.head_dim = shape.head_dim
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.q_proj = nn.Linear(shape.dim, self.heads * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(shape.dim, 2 * self.kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(self.heads * self.head_dim, shape.dim, bias=False)
        self.reads: tuple[str, ...] = ()
        self.optional_reads: tuple[str, ...] = (RESIDUAL_SCORES.name,) if self.carry_residual else ()
        self.writes: tuple[str, ...] = (RESIDUAL_SCORES.name,) if self.carry_residual else ()

    def attention_bias(self, q: Tensor, k: Tensor, state: Mapping[str, Tensor], cache: LayerCache | None
                       ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The variant's own bias and its state updates. The bias: a tensor broadcastable to (B, H, Nq, Nk), a
        structured `Selection` (the bias is then -F, which fusing backends never materialise), or None."""
        return None, {}

    def forward(self, x: Tensor, state: Mapping[str, Tensor], cache: LayerCache | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)
        k, v = self.kv_proj(x).view(B, N, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, Hkv, N, D)
        if cache is not None:
            start = int(cache.positions[0, -1]) + 1 if cache.length else 0
            k, v = cache.extend(k, v, start)  # (B, Hkv, T + N, D)
        bias, updates = self.attention_bias(q, k, state, cache)
        if self.carry_residual:  # RealFormer: R_l = L_l + bias + R_{l-1}, structured where it can be (ops/residual.py)
            limit = head_dim_limit(self.backend, q.device.type)
            carried, dense_bias = residual.carry(state.get(RESIDUAL_SCORES.name), q, k, bias, self.scale, limit)
            updates[RESIDUAL_SCORES.name] = carried
            if isinstance(carried, residual.ResidualScores):
                out = residual.attend(carried, v, backend=self.backend)
            else:
                out = dispatch(q, k, v, bias=dense_bias, causal=True, scale=self.scale, backend=self.backend)
        else:
            out = dispatch(q, k, v, bias=bias, causal=True, scale=self.scale, backend=self.backend)  # (B, H, N, D)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim)), updates

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, backend={self.backend!r}"
