"""What a benchmark measures: named variant presets, YAML configs, and the points of a sweep.

A point is one (implementation, variant, backend, sequence length, batch, mode, compiled or not) measured in
its own process. Our models are built from a config; the x-transformers peer is built from the keyword
arguments `peer_kwargs` gives for the same dims, heads and head_dim.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

OURS, PEER = "attention-zoo", "x-transformers"
MODES = ("fwd", "fwdbwd")
COMPILE = ("off", "on")  # on: the model under torch.compile (inductor), as train.compile runs it
DTYPES = ("float32", "bfloat16", "float16")
BASELINE = "vanilla"

# Preset name -> model.attention. Any registered variant name also works with its defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "vanilla": {"variant": "vanilla"},
    "gqa": {"variant": "gqa", "kv_heads": 2},
    "mqa": {"variant": "gqa", "kv_heads": 1},
    "residual": {"variant": "residual"},
    "selective": {"variant": "selective"},
    "selective_gqa": {"variant": "selective", "kv_heads": 2},
    "selective_residual": {"variant": "selective", "residual": True},
    "cross_layer_share": {"variant": "cross_layer_selective", "mode": "share", "sources": [0]},
    "cross_layer_accumulate": {"variant": "cross_layer_selective", "mode": "accumulate", "sources": [0]},
}


@dataclass(frozen=True)
class VariantSpec:
    """A benchmarked variant: a label, and either a model.attention mapping or a YAML config."""

    label: str
    attention: dict[str, Any] | None = None
    config_path: str | None = None
    plugins: tuple[str, ...] = ()  # modules that register the variant (bench --plugins), imported by the worker


@dataclass
class Point:
    impl: str
    variant: VariantSpec
    backend: str
    seq_len: int
    batch: int
    mode: str
    dim: int
    depth: int
    heads: int
    head_dim: int
    vocab_size: int = 256
    dtype: str = "float32"
    device: str = "cpu"
    warmup: int = 2
    repeats: int = 5
    threads: int | None = None
    profile: bool = False  # one more step under torch.profiler after the timed ones
    extra: dict[str, Any] = field(default_factory=dict)
    compiled: bool = False  # the model under torch.compile, compiled by one untimed step before the warm-up

    @property
    def key(self) -> tuple:
        """Identifies a point across rounds and in comparisons."""
        return (self.impl, self.variant.label, self.backend, self.seq_len, self.batch, self.mode, self.compiled)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Point":
        data = dict(data)
        data["variant"] = VariantSpec(**{**data["variant"], "plugins": tuple(data["variant"].get("plugins", ()))})
        return cls(**data)


def resolve_variant(name: str, plugins: tuple[str, ...] = ()) -> VariantSpec:
    """A preset, a registered variant name (defaults; `plugins`, already imported, may have registered it), or a
    YAML config path (label: its file stem)."""
    if name.endswith((".yaml", ".yml")):
        if not Path(name).is_file():
            raise UserError(f"--variants: config file {name!r} not found")
        return VariantSpec(Path(name).stem, config_path=str(Path(name).resolve()))
    if name in PRESETS:
        return VariantSpec(name, attention=copy.deepcopy(PRESETS[name]))
    from ..variant_registry import VARIANTS

    if name in VARIANTS:
        return VariantSpec(name, attention={"variant": name}, plugins=plugins)
    from ..registry import did_you_mean

    known = sorted(set(PRESETS) | set(VARIANTS.names()))
    raise UserError(f"--variants: unknown variant {name!r}; {did_you_mean(name, known)}"
                    f"valid: {', '.join(known)}, or a path to a YAML config (a plug-in's variant: --plugins MODULE)")


def model_config(point: Point) -> dict[str, Any]:
    """The config our model is built from: the variant's attention (or YAML), the sweep's dims."""
    dims = {"vocab_size": point.vocab_size, "dim": point.dim, "depth": point.depth, "heads": point.heads,
            "head_dim": point.head_dim, "max_seq_len": point.seq_len}
    if point.variant.config_path:
        from ..config import load_config

        config = load_config(point.variant.config_path)  # ConfigError names the file and every problem
        model = {**config["model"], **dims}
        return {"plugins": config["plugins"], "backend": point.backend, "model": model}
    return {"plugins": list(point.variant.plugins), "backend": point.backend,
            "model": {**dims, "attention": copy.deepcopy(point.variant.attention)}}


def peer_kwargs(spec: VariantSpec, depth: int) -> tuple[dict[str, Any] | None, str]:
    """x-transformers Decoder keyword arguments equivalent to `spec`, and the attention path it takes
    ("sdpa" with attn_flash, else "math"); (None, why) when x-transformers has no equivalent."""
    attention = spec.attention
    if attention is None:
        return None, "YAML configs are not translated to x-transformers"
    variant = attention.get("variant")
    kwargs: dict[str, Any] = {}
    if attention.get("kv_heads"):
        kwargs["attn_kv_heads"] = attention["kv_heads"]
    if variant in ("vanilla", "gqa"):
        kwargs["attn_flash"] = True
        return kwargs, "sdpa"
    if variant == "residual":
        return {**kwargs, "residual_attn": True}, "math"
    if variant == "selective":
        kwargs["attn_selective"] = True  # x-transformers always selects with head 0
        if attention.get("residual"):
            kwargs["residual_attn"] = True
        return kwargs, "math"
    return None, f"x-transformers has no equivalent of {variant!r}"


def peer_stack(stack: dict[str, str], head_dim: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """x-transformers TransformerWrapper and Decoder keyword arguments for our component stack, so the
    peer is compared on the same positions, norm and MLP (presets run on the default stack).

    Raises ValueError for a component x-transformers has no equivalent of."""
    wrapper: dict[str, Any] = {}
    decoder: dict[str, Any] = {}
    position, norm, mlp = stack["position"], stack["norm"], stack["mlp"]
    if position in ("rope", "none"):
        wrapper["use_abs_pos_emb"] = False
        if position == "rope":  # x-transformers rotates half the head dimension unless told: ours rotates all
            decoder.update(rotary_pos_emb=True, rotary_emb_dim=head_dim)
    if norm == "rmsnorm":
        decoder["use_rmsnorm"] = True
    if mlp == "swiglu":  # our SwiGLU: no biases, hidden 2/3 of 4 * dim
        decoder.update(ff_glu=True, ff_swish=True, ff_mult=8 / 3, ff_no_bias=True)
    elif mlp != "gelu":
        raise ValueError(f"x-transformers has no equivalent of mlp {mlp!r}")
    return wrapper, decoder


__all__ = ["PRESETS", "VariantSpec", "Point", "resolve_variant", "model_config", "peer_kwargs", "peer_stack", "OURS",
           "PEER", "MODES", "COMPILE", "DTYPES", "BASELINE"]
