"""The variant registry: `register_variant`, `list_variants`, `create_variant`, parameter validation.

Built-in variants live in `attention_zoo.variants` (the repository's `variants/` folder, installed inside
the package) and register themselves on import; third-party packages join through the
`attention_zoo.variants` entry-point group.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .numbers import finite_problem
from .registry import Registry, RegistryError, did_you_mean
from .variant import LayerShape, Param, run_check, type_ok

VARIANTS: Registry[type] = Registry("variant", entry_point_group="attention_zoo.variants",
                                    builtin_modules=("attention_zoo.variants",))


def register_variant(name: str) -> Callable[[type], type]:
    """Class decorator: `@register_variant("mine") class Mine(ProjectedAttention): ...`."""

    def decorator(cls: type) -> type:
        if not isinstance(getattr(cls, "params", None), dict):
            raise TypeError(f"variant {name!r} ({cls.__qualname__}) must declare `params: dict[str, Param]`")
        VARIANTS.add(name, cls)
        return cls

    return decorator


def list_variants(pattern: str = "*") -> list[str]:
    """Registered variant names matching a shell-style wildcard."""
    return VARIANTS.names(pattern)


def get_variant(name: str) -> type:
    return VARIANTS.get(name)


def summary(name: str) -> str:
    """First line of the variant's docstring."""
    doc = inspect.getdoc(get_variant(name)) or ""
    return doc.splitlines()[0] if doc else ""


@dataclass
class ParamProblem:
    key: str
    value: Any
    message: str
    missing: bool = False  # the parameter was not given (value is meaningless), as opposed to given as null


def check_params(name: str, params: dict[str, Any], shape: LayerShape) -> list[ParamProblem]:
    """Every problem with `params` for variant `name` at `shape`, not just the first."""
    declared: dict[str, Param] = get_variant(name).params
    problems = []
    for key, value in params.items():
        if key not in declared:
            hint = did_you_mean(key, list(declared))
            valid = ", ".join(sorted(declared)) or "(none)"
            problems.append(ParamProblem(key, value, f"unknown parameter for variant {name!r}; {hint}valid: {valid}"))
    for key, spec in declared.items():
        if key not in params:
            if spec.required:
                problems.append(ParamProblem(key, None, f"required by variant {name!r}: {spec.doc}", missing=True))
            continue
        value = params[key]
        if not type_ok(value, spec.type):
            problems.append(ParamProblem(key, value, f"expected {spec.type_name()}"))
            continue
        message = finite_problem(value, spec)
        if message:
            problems.append(ParamProblem(key, value, message))
            continue
        if spec.choices is not None and value not in spec.choices:
            hint = did_you_mean(str(value), [str(c) for c in spec.choices])
            problems.append(ParamProblem(key, value, f"{hint}valid: {', '.join(map(str, spec.choices))}"))
            continue
        if spec.check is not None:
            message = run_check(spec.check, value, shape)  # a plug-in's check that raises: a message
            if message:
                problems.append(ParamProblem(key, value, message))
    return problems


def resolved_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Declared defaults overlaid with the given parameters."""
    declared: dict[str, Param] = get_variant(name).params
    return {**{k: p.default for k, p in declared.items() if not p.required}, **params}


def create_variant(name: str, *, dim: int = 64, heads: int = 4, head_dim: int | None = None, layer_index: int = 0,
                   depth: int = 1, max_seq_len: int = 1024, backend: str = "auto", **params: Any) -> nn.Module:
    """Build one attention layer of variant `name` (the sizes fill its LayerShape); invalid parameters raise
    ValueError with every problem listed."""
    shape = LayerShape(dim, heads, head_dim or dim // heads, layer_index, depth, max_seq_len=max_seq_len)
    problems = check_params(name, params, shape)
    if problems:
        raise ValueError(f"invalid parameters for variant {name!r}:\n" + "\n".join(
            f"  {p.key} = {p.value!r}: {p.message}" for p in problems))
    return get_variant(name)(shape, backend=backend, **params)


__all__ = ["VARIANTS", "register_variant", "list_variants", "get_variant", "create_variant", "check_params",
           "resolved_params", "summary", "ParamProblem", "RegistryError"]
