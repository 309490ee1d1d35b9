"""What a variant is: the AttentionVariant protocol, its declared parameters, and a base class.

A variant owns one layer's attention: its projections, the bias it adds to the logits, the state it
reads from earlier layers and writes for later ones (see `state.py`), and its inference cache. The
attention itself is the backend's job (`backends/`), unless a variant replaces the attend step (attention
that is not a softmax), in which case no backend runs that layer.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Protocol, runtime_checkable

import torch
from einops import rearrange
from torch import Tensor, nn

from .backends import dispatch, fuses_unequal_value_dim, head_dim_limit
from .cache import LayerCache
from .errors import UserError
from .initialization import residual_output
from .ops import residual
from .ops.rms_norm import rms_norm
from .ops.selection import Selection
from .ops.separable import SeparableBias
from .state import RESIDUAL_SCORES

if TYPE_CHECKING:
    from .components.positions import Positions


@dataclass(frozen=True)
class LayerShape:
    """Where a variant sits: model width, heads, and its place in the stack.

    max_seq_len: the model's `max_seq_len`, the sequence length it is configured (trained) for; for a
    length-aware init such as sigmoid attention's b = -log(max_seq_len). A hard cap on positions only with
    learned positions: with rope or none the model runs longer sequences (cached decoding, streaming
    evaluation, `generate`), so a layer may see more keys than this. A layer built on its own
    (`create_variant`) gets 1024, the config default, unless told."""

    dim: int
    heads: int
    head_dim: int
    layer_index: int = 0
    depth: int = 1
    norm_eps: float = 1e-5  # for norms inside the layer (QK-norm, differential's per-head norm)
    max_seq_len: int = 1024


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
    finite: bool = True  # False: NaN or an infinity is a meaningful value here (the doc says which)

    def type_name(self) -> str:
        return type_name(self.type)


def zoos_own(obj: Any) -> bool:
    """Whether `obj` (a class or function) is defined in the zoo itself, not in a plug-in: a failure inside it is the
    zoo's bug, raised with its traceback, where a plug-in's is reported as a problem at its config key."""
    return (getattr(obj, "__module__", None) or "").split(".")[0] == "attention_zoo"


def meta_only(exc: BaseException) -> bool:
    """Whether `exc` is a failure only the meta device causes: a tensor's values read (.item(): "cannot be called
    on meta tensors", .tolist(): "Cannot copy out of meta tensor", .numpy(): "meta device type"), or an op
    without a meta kernel ("... from the 'Meta' backend", "... with Meta tensors, but there was no fake impl or
    Meta kernel registered")."""
    return re.search(r"\bmeta tensors?\b|\bmeta device type\b|'Meta' backend|\bMeta kernel\b", str(exc),
                     re.IGNORECASE) is not None


def construct(cls: type, *args: Any, **kwargs: Any) -> Any:
    """`cls(*args, **kwargs)`. Validation and the dry runs build under `torch.device("meta")` (no weights); an
    __init__ that reads a tensor's value (`float(torch.log(torch.tensor(2.0)))`, `.item()`) cannot run there,
    though it runs on every real device: such a module is built on the CPU instead and moved to meta (its weights
    allocated for that moment), so a plug-in validates, plans and builds as any other. Raises what the
    constructor raises (the CPU build's exception after such a retry)."""
    try:
        return cls(*args, **kwargs)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        if torch.get_default_device().type != "meta" or not meta_only(exc):
            raise
    with torch.device("cpu"):
        return cls(*args, **kwargs).to("meta")


def plugin_line(exc: BaseException, cls: type) -> str:
    """" (at FILE:LINE)": the last line of `cls`'s source file that `exc` passed through (the plug-in author's own
    line, where the zoo code it called raised), or "" when its traceback never entered that file."""
    import traceback

    try:
        source = inspect.getsourcefile(cls)
    except TypeError:  # a class defined where no file can be found (an interactive session)
        return ""
    lines = [frame for frame in traceback.extract_tb(exc.__traceback__) if frame.filename == source]
    return f" (at {lines[-1].filename}:{lines[-1].lineno})" if lines else ""


class PluginBuildFailed(Exception):
    """A plug-in's constructor raised while a model was built (`exc`, also the `__cause__`). `problem(source)` is the
    config Problem at `key`, the key whose `value` chose the plug-in, naming `where` it was built ("layer 3"; ""
    for a component the model has one kind of), its class and the plug-in's own line. A UserError (the zoo's
    own layers refusing their configuration) is quoted as it is: it already says what to change."""

    def __init__(self, key: str, value: Any, cls: type, exc: Exception, where: str = ""):
        self.key, self.value, self.cls, self.exc, self.where = key, value, cls, exc, where
        super().__init__(f"{key} = {value!r}: {self.message()}")

    def message(self) -> str:
        exc, name = self.exc, f"{self.cls.__module__}.{self.cls.__qualname__}"
        if isinstance(exc, UserError):
            return f"{self.where}: {exc}" if self.where else str(exc)
        where = f"{self.where} ({name})" if self.where else name
        return f"{where}: its __init__ raised {type(exc).__name__}: {exc}{plugin_line(exc, self.cls)}"

    def problem(self, source: str):
        from .config import Problem  # config imports this module

        return Problem(source, self.key, self.value, self.message())


def run_check(check: Callable[..., str | None], *args: Any) -> str | None:
    """`check(*args)`: a Param's check or a component's check_shape, which returns an error message or None. One
    that a plug-in wrote and that raises (an Exception) is reported as the message "its check (NAME) raised
    TYPE: ...", so validation names the key rather than stopping with a traceback; a check of the zoo's own that
    raises is a bug, raised as it is."""
    try:
        return check(*args)
    except Exception as exc:
        if zoos_own(check):
            raise
        module = getattr(check, "__module__", None) or ""
        name = f"{module}.{getattr(check, '__qualname__', check)}".lstrip(".")  # the plug-in file and function
        return f"its check ({name}) raised {type(exc).__name__}: {exc}"


@runtime_checkable
class AttentionVariant(Protocol):
    """The contract the stack relies on. Subclassing `ProjectedAttention` gives all of it for free.

    The stack builds a variant as `cls(shape, backend=NAME, **params)`: `shape` its LayerShape, `backend` the
    config's `backend:` (which a variant that computes its own attention may ignore), `params` its declared
    Params resolved from YAML."""

    params: ClassVar[dict[str, Param]]
    shape: LayerShape  # the shape it was built for: the stack checks its state writes with these sizes
    kv_heads: int | None  # key/value heads where it groups them (GQA); None or absent: one per query head
    reads: tuple[str, ...]  # state channels that must have been written by an earlier layer
    optional_reads: tuple[str, ...]  # channels used when present
    writes: tuple[str, ...]  # channels this layer writes

    def forward(self, x: Tensor, state: Mapping[str, Tensor], cache: LayerCache | None = None,
                positions: "Positions | None" = None) -> tuple[Tensor, dict[str, Tensor]]:
        """x: (B, N, dim) -> (B, N, dim), plus the state updates this layer writes. `positions` carries the
        tokens' absolute positions (B, N) and the stack's positional scheme (see components/positions.py)."""
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
QK_NORM = Param(bool, False, "RMSNorm with a learnable scale over the head dimension of q and k, before the rotation "
                "(per head as Qwen3; Dehghani et al. 2023)")
QKV_BIAS = Param(bool, False, "biases on the q, k and v projections (Qwen2, GPT-2)")
OUT_BIAS = Param(bool, False, "a bias on the output projection (GPT-2)")
SELECTION_HEAD = Param(int, 0, "query head whose logits select what later tokens ignore", check=_head_index_check)
PROTECT_BOS = Param(bool, True, "never penalise key 0 (BOS)")
RESIDUAL = Param(bool, False, "also carry RealFormer residual scores (they then include -F)")

# What every built-in variant takes; a variant's `params` starts from these (`{**BASE_PARAMS, ...}`).
BASE_PARAMS: dict[str, Param] = {"kv_heads": KV_HEADS, "qk_norm": QK_NORM, "qkv_bias": QKV_BIAS, "out_bias": OUT_BIAS}


class HeadRMSNorm(nn.RMSNorm):
    """QK-norm: RMSNorm over the last (head) dimension, (..., D) -> (..., D), with the stack's RMSNorm op
    (`ops.rms_norm`: float32 statistics, hand-written backward). nn.RMSNorm's parameters and state-dict
    keys (`weight`), so checkpoints are unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


# The layer inputs an attention_bias may ask for beyond (q, k, state, cache), by naming them.
BIAS_INPUTS = ("x", "positions")


@dataclass(frozen=True)
class BiasCall:
    """How forward passes the layer inputs an attention_bias names: `positional` right after (q, k, state,
    cache), in this order, then `keyword` by name."""

    positional: tuple[str, ...] = ()
    keyword: tuple[str, ...] = ()

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every input passed, whichever way."""
        return self.positional + self.keyword


# (function, bound) -> its BiasCall: read once per function, at its first call, so an attention_bias set
# on a class after it was made, or on an instance, is read too. Holds the functions it has seen.
_BIAS_CALLS: dict[tuple[Any, bool], BiasCall] = {}


def bias_call(fn: Callable[..., Any], owner: str) -> BiasCall:
    """How to call `fn`, an attention_bias as `layer.attention_bias` gives it (a bound method, or a function set
    on the instance). `owner` names it in the error. A dict lookup once its function has been read.

    Raises TypeError for a positional-only parameter before a positional-only `x` or `positions` that is
    neither (forward passes nothing else by position), and for an `x` or `positions` among the four leading
    parameters, which receive q, k, state, cache by position (one of those left out)."""
    bound = inspect.ismethod(fn)
    return _cached_bias_call(fn.__func__ if bound else fn, bound, owner)


def _cached_bias_call(fn: Callable[..., Any], bound: bool, owner: str) -> BiasCall:
    """bias_call of `fn`, a function whose first parameter takes self when `bound`."""
    call = _BIAS_CALLS.get((fn, bound))
    if call is None:
        call = _BIAS_CALLS[(fn, bound)] = _read_bias_call(inspect.signature(fn), 5 if bound else 4, owner)
    return call


def _read_bias_call(signature: inspect.Signature, standard: int, owner: str) -> BiasCall:
    """The BiasCall of a signature whose first `standard` positional parameters take (self,) q, k, state,
    cache, whatever their names."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in signature.parameters.values() if p.kind in kinds]
    # The four leading slots are filled by position whatever their names: an `x` or `positions` there (the
    # `cache` left out) would silently receive the cache or the state.
    slots = positional[standard - 4:standard]
    if misplaced := [(p.name, slot) for p, slot in zip(slots, ("q", "k", "state", "cache")) if p.name in BIAS_INPUTS]:
        name, slot = misplaced[0]
        raise TypeError(f"{owner}.attention_bias{signature}: {name!r} sits where {slot!r} is passed (the first four "
                        f"parameters receive q, k, state, cache by position); name all four before {name!r}")
    rest = [p for p in signature.parameters.values() if p not in positional[:standard]]
    # A positional-only input cannot go by name: it goes by position, so every positional-only parameter
    # before the last such input must be an input too (forward has nothing else to pass).
    only = [p.name for p in rest if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    last = max((i for i, n in enumerate(only) if n in BIAS_INPUTS), default=-1)
    if other := [n for n in only[:last + 1] if n not in BIAS_INPUTS]:
        raise TypeError(f"{owner}.attention_bias{signature}: positional-only {other[0]!r} comes before the "
                        f"positional-only {only[last]!r}, but only x and positions are passed after (q, k, state, "
                        "cache); put them first, or drop the `/` so they go by name")
    by_position = tuple(only[:last + 1])
    by_name = tuple(p.name for p in rest if p.name in BIAS_INPUTS and p.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))  # not a `*x` or `**x`
    return BiasCall(by_position, by_name)


class ProjectedAttention(nn.Module):
    """Multi-head attention with grouped k/v, as a sequence of steps a variant may override.

    forward(x (B, N, dim), state, cache, positions) runs, in order:
      project(x)                        -> q (B, H, N, D), k and v (B, Hkv, N, D)
      transform_qk(q, k, positions)     -> q, k: QK-norm if asked, then the stack's positional scheme
                                           (RoPE rotates here, at absolute positions); override to add
                                           the variant's own transform after calling super()
      extend_cache(k, v, cache, ...)    -> k, v with the cached keys in front (B, Hkv, T + N, D); keys
                                           are stored as transformed, so they are rotated once
      attention_bias(q, k, state, cache) -> (bias broadcastable to (B, H, N, T + N), a Selection, a
                                           SeparableBias or None, state updates);
                                           a subclass whose attention_bias also names `x` (the layer input
                                           (B, N, dim)) and/or `positions` gets them as keywords: a bias made
                                           from the tokens (a forget gate, a data-dependent decay); ones
                                           that are positional-only (before a `/`) by position instead, in
                                           their order, right after cache (another positional-only one in
                                           front of them: TypeError when the class is made). The signature
                                           is read from the attention_bias the layer has when forward runs
                                           (bias_call, once per function): one set later on the class or on
                                           an instance is read too
      (residual carry: with `carry_residual`, the layer attends with R_l = L_l + bias + R_{l-1} and
       writes R_l (RealFormer), kept as q and k concatenated over layers where it can (ops/residual.py),
       else as a dense (B, H, Nq, Nk) tensor that joins the bias)
      attend(q, k, v, bias)             -> (B, H, N, Dv): the backend call, softmax(scale q k^T + bias + mask) v
      output(out)                       -> (B, N, dim): heads merged, output projection
    Positions (B, N) come from the model; a layer called on its own numbers its tokens from 0 (or from
    the cache's end).
    """

    params: ClassVar[dict[str, Param]] = BASE_PARAMS
    # Parameter sets the zoo's contract tests (tests/cases.py) build this variant with, besides its defaults
    # (which they skip when a parameter is required): a plug-in's way to cover required parameters and the
    # combinations worth testing without editing the zoo's tests, e.g. [{"temp": 2.0}, {"temp": 0.5, "kv_heads": 2}].
    examples: ClassVar[list[dict[str, Any]]] = []
    carry_residual: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # A signature forward cannot call is said when the class is made, not at its first forward.
        if inspect.isfunction(inspect.getattr_static(cls, "attention_bias")):
            _cached_bias_call(cls.attention_bias, True, cls.__qualname__)

    def __init__(self, shape: LayerShape, *, kv_heads: int | None = None, qk_norm: bool = False,
                 qkv_bias: bool = False, out_bias: bool = False, backend: str = "auto"):
        super().__init__()
        self.shape = shape
        self.heads = shape.heads
        self.kv_heads = kv_heads or shape.heads
        self.head_dim = shape.head_dim
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.q_proj = nn.Linear(shape.dim, self.heads * self.head_dim, bias=qkv_bias)
        self.kv_proj = nn.Linear(shape.dim, 2 * self.kv_heads * self.head_dim, bias=qkv_bias)  # rows (k|v, head, D)
        self.out_proj = residual_output(nn.Linear(self.heads * self.head_dim, shape.dim, bias=out_bias))
        # QK-norm over the head dimension, one scale shared by all heads, as Qwen3's (OLMo 2 normalises the
        # flattened (H * D) projection instead, with one scale per channel: not this)
        self.q_norm = HeadRMSNorm(self.head_dim, eps=shape.norm_eps) if qk_norm else None
        self.k_norm = HeadRMSNorm(self.head_dim, eps=shape.norm_eps) if qk_norm else None
        self.reads: tuple[str, ...] = ()
        self.optional_reads: tuple[str, ...] = (RESIDUAL_SCORES.name,) if self.carry_residual else ()
        self.writes: tuple[str, ...] = (RESIDUAL_SCORES.name,) if self.carry_residual else ()

    # -- the steps, in the order forward runs them ---------------------------------------------------
    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, N, dim) -> q (B, H, N, D), k (B, Hkv, N, D), v (B, Hkv, N, D)."""
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv_proj(x), "b n (two h d) -> two b h n d", two=2, h=self.kv_heads)
        return q, k, v

    def transform_qk(self, q: Tensor, k: Tensor, positions: Positions) -> tuple[Tensor, Tensor]:
        """q (B, H, N, D), k (B, Hkv, N, D) of the new tokens -> the same shapes, normalised and rotated."""
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return positions.rotate(q, k)

    def extend_cache(self, k: Tensor, v: Tensor, cache: LayerCache | None, positions: Positions) -> tuple[Tensor, Tensor]:
        """Without a cache: k, v as they are. With one: store the new keys at their absolute positions and
        return every kept key and value, (B, Hkv, T + N, D)."""
        return (k, v) if cache is None else cache.extend(k, v, positions.index)

    def attention_bias(self, q: Tensor, k: Tensor, state: Mapping[str, Tensor], cache: LayerCache | None
                       ) -> tuple[Tensor | Selection | SeparableBias | None, dict[str, Any]]:
        """The variant's own bias and its state updates. The bias: a tensor broadcastable to (B, H, Nq, Nk), a
        structured `Selection` (the bias is then -F, which fusing backends never materialise), a `SeparableBias`
        (row_i + col_j per head, attended without an (Nq, Nk) tensor where it can be: ops/separable.py), or None."""
        return None, {}

    def _call_attention_bias(self, q: Tensor, k: Tensor, state: Mapping[str, Tensor], cache: LayerCache | None,
                             x: Tensor, positions: Positions) -> tuple[Tensor | Selection | SeparableBias | None,
                                                                       dict[str, Any]]:
        """attention_bias(q, k, state, cache) plus the inputs it names (bias_call): x (B, N, dim), positions."""
        fn = self.attention_bias  # looked up per call: one set on the instance or the class later is used
        call = bias_call(fn, type(self).__qualname__)
        if not call.inputs:  # every built-in variant
            return fn(q, k, state, cache)
        inputs = {"x": x, "positions": positions}
        return fn(q, k, state, cache, *(inputs[n] for n in call.positional), **{n: inputs[n] for n in call.keyword})

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | Selection | SeparableBias | None) -> Tensor:
        """softmax(scale q k^T + bias + causal mask) v on the configured backend: (B, H, Nq, Dv). A structured
        `Selection` bias (-F) or a `SeparableBias` goes to the backend as it is (ops/selection, ops/separable.py).
        An override that is not softmax builds on attention_zoo.functional's causal_mask, grouped_logits and
        grouped_values (GQA without copying k, v), and makes a SeparableBias a tensor with `.dense()` (its row term
        matters outside softmax)."""
        return dispatch(q, k, v, bias=bias, causal=True, scale=self.scale, backend=self.backend)

    def output(self, out: Tensor) -> Tensor:
        """(B, H, N, D) -> (B, N, dim)."""
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))

    def forward(self, x: Tensor, state: Mapping[str, Tensor], cache: LayerCache | None = None,
                positions: Positions | None = None) -> tuple[Tensor, dict[str, Any]]:
        """x (B, N, dim) -> (B, N, dim) and this layer's state updates (channel -> value), through the steps in
        the class docstring. `state`: what earlier layers wrote (read-only); `cache`: this layer's LayerCache, or
        None; `positions`: the tokens' absolute positions (B, N) and the stack's scheme (None: 0..N-1, or from the
        cache's end, with no scheme). Raises what the steps and the backend raise (e.g. BackendRefused for a
        named backend that refuses the call); the stack, not this method, checks the updates."""
        B, N, _ = x.shape
        if positions is None:  # called on its own, outside a model: no positional scheme
            from .components.positions import Positions
            positions = Positions.plain(B, N, cache.next_position() if cache is not None else 0, x.device)
        q, k, v = self.project(x)
        q, k = self.transform_qk(q, k, positions)
        k, v = self.extend_cache(k, v, cache, positions)  # (B, Hkv, T + N, D)
        bias, updates = self._call_attention_bias(q, k, state, cache, x, positions)
        if self.carry_residual:  # RealFormer: R_l = L_l + bias + R_{l-1}, structured where it can be
            limit = head_dim_limit(self.backend, q.device.type)
            carried, dense_bias = residual.carry(state.get(RESIDUAL_SCORES.name), q, k, bias, self.scale, limit)
            updates[RESIDUAL_SCORES.name] = carried
            if isinstance(carried, residual.ResidualScores):
                pad = not fuses_unequal_value_dim(self.backend, q.device.type)
                out = residual.attend(carried, v, self.attend, pad_values=pad)  # q, k concatenated over layers
            else:
                out = self.attend(q, k, v, dense_bias)
        else:
            out = self.attend(q, k, v, bias)  # (B, H, N, D)
        return self.output(out), updates  # the stack checks the updates against their channels (model.py)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, backend={self.backend!r}"
