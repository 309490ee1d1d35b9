"""YAML configs: load (with `base:` inheritance and `a.b=c` overrides), validate every key, report all
problems at once, and check the state flow between layers before any weight is allocated.

A problem names the file, the key path, the bad value and what would be valid. Sections other than
`model` (data, train, ...) register their own validators with `register_section`.
"""
from __future__ import annotations

import copy
import importlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import torch
import yaml

from .errors import UserError, out_of_memory
from .numbers import finite_problem, is_whole
from .registry import PluginFailure, RegistryError, did_you_mean, import_plugins, valid_choices
from .state import CHANNELS
from .variant import LayerShape, PluginBuildFailed, construct, run_check, type_name, type_ok, zoos_own
from .variant_registry import VARIANTS, check_params, get_variant, resolved_params

log = logging.getLogger(__name__)

_MISSING = object()


@dataclass
class Problem:
    source: str
    path: str
    value: Any
    message: str

    def __str__(self) -> str:
        value = "" if self.value is _MISSING else f" = {self.value!r}"
        return f"{self.source}: {self.path}{value}: {self.message}"


class AmbiguousPath(Problem):
    """A relative FILE_KEYS path naming two different files: a problem only if no later file or override
    replaces the value (a child's own path, `data.text=...` on the command line)."""


def _replaces(data: dict, path: str) -> bool:
    """Whether merging `data` over a base replaces the base's value at key path `path` (`data.text`): `data` sets
    that key, or a key above it to something that is not a mapping (deep_merge merges mappings, replaces the rest)."""
    node = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
        if not isinstance(node, dict):
            return True
    return True


def _replaced(problems: list[Problem], data: dict) -> list[Problem]:
    """`problems` less the AmbiguousPath ones whose value `data` replaces."""
    return [p for p in problems if not (isinstance(p, AmbiguousPath) and _replaces(data, p.path))]


class ConfigError(UserError, ValueError):
    """Every problem found in a config, one per line."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        n = len(problems)
        super().__init__(f"{n} problem{'s' * (n != 1)} in config:\n" + "\n".join(f"  {p}" for p in problems))


class Config(dict):
    """A validated config: plain nested dicts with defaults filled in, plus where it came from and which of its
    `plugins:` modules failed to import (module -> failure), which load_config does not raise for."""

    source: str = "<dict>"
    plugin_failures: Mapping[str, PluginFailure] = MappingProxyType({})


# ---------------------------------------------------------------------------------------------------
# Simple typed fields, for `model` and for sections registered by other modules.

@dataclass(frozen=True)
class Field:
    type: type | tuple[type, ...]
    default: Any = _MISSING
    doc: str = ""
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    # check(value) -> message or None; runs once the type and bounds are right
    check: Callable[[Any], str | None] | None = None
    # False only where the doc says what NaN or an infinity means for this key (numbers.py's rule)
    finite: bool = True

    def type_name(self) -> str:
        return type_name(self.type)


# YAML 1.1 (PyYAML) reads `3e-4` as a string (it wants `3.0e-4`); float fields take such strings as
# the numbers everyone means.
_FLOAT_STRING = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _yaml_float(value: Any, types: type | tuple[type, ...]) -> Any:
    types = types if isinstance(types, tuple) else (types,)
    if float in types and isinstance(value, str) and _FLOAT_STRING.match(value.strip()):
        return float(value)
    return value


def validate_fields(value: Any, fields: dict[str, Field], path: str, source: str) -> tuple[dict, list[Problem]]:
    """Check a mapping against `fields`: unknown keys, types, choices, bounds. Fills defaults."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        return {}, [Problem(source, path, value, f"expected a mapping with keys: {', '.join(fields)}")]
    problems, out = [], {}
    for key in value:
        if key not in fields:
            problems.append(Problem(source, f"{path}.{key}", value[key],
                                    f"unknown key; {did_you_mean(str(key), list(fields))}valid: {', '.join(fields)}"))
    for key, spec in fields.items():
        if key not in value:
            if spec.default is _MISSING:
                problems.append(Problem(source, f"{path}.{key}", _MISSING, f"required ({spec.doc})"))
            else:
                out[key] = copy.deepcopy(spec.default)
            continue
        v = _yaml_float(value[key], spec.type)
        where = f"{path}.{key}"
        if not type_ok(v, spec.type):
            problems.append(Problem(source, where, v, f"expected {spec.type_name()}"))
        elif message := finite_problem(v, spec):
            problems.append(Problem(source, where, v, message))
        elif spec.choices is not None and v not in spec.choices:
            problems.append(Problem(source, where, v,
                                    valid_choices(str(v), [str(c) for c in spec.choices])))
        elif spec.minimum is not None and v is not None and v < spec.minimum:
            problems.append(Problem(source, where, v, f"must be >= {spec.minimum}"))
        elif spec.check is not None and (message := spec.check(v)):
            problems.append(Problem(source, where, v, message))
        else:
            out[key] = v
    return out, problems


SectionValidator = Callable[[Any, str], tuple[Any, list[Problem]]]  # (value, source) -> (normalized, problems)
SECTIONS: dict[str, SectionValidator] = {}
# Modules that register sections; imported on first load so `import attention_zoo` stays light.
SECTION_MODULES: list[str] = ["attention_zoo.train.sections"]


def register_section(name: str, validator: SectionValidator) -> None:
    SECTIONS[name] = validator


# ---------------------------------------------------------------------------------------------------
# The model section.

def _backend_choices() -> tuple[str, ...]:
    from .backends import BACKEND_CHOICES
    return BACKEND_CHOICES


def at_most(limit: int) -> Callable[[int], str | None]:
    """A bound far above any real model's, so that a typo (an extra digit, 1e20) is an error in validation
    instead of a memory exhaustion or an integer overflow inside torch."""
    return lambda value: None if value is None or value <= limit else f"must be <= {limit:,} (a typo?)"


MODEL_FIELDS = {
    "vocab_size": Field(int, 256, "tokens in the vocabulary", minimum=1, check=at_most(2**31 - 1)),
    "dim": Field(int, 256, "model width", minimum=1, check=at_most(2**20)),
    "depth": Field(int, 4, "number of transformer blocks", minimum=1, check=at_most(10_000)),
    "heads": Field(int, 8, "query heads per layer", minimum=1, check=at_most(2**16)),
    "head_dim": Field((int, type(None)), None, "per-head width; default dim // heads", minimum=1, check=at_most(2**16)),
    "max_seq_len": Field(int, 1024, "training length; a hard cap only with position: learned", minimum=1,
                         check=at_most(2**31 - 1)),
    "mlp_ratio": Field(float, 4.0, "input of the MLP's hidden-width rule (gelu: ratio * dim, swiglu: 2/3 of that)",
                       minimum=0, check=lambda v: None if v > 0 else "must be > 0"),
    "dropout": Field(float, 0.0, "dropout probability", minimum=0, check=lambda v: None if v < 1 else "must be < 1"),
    "tie_embeddings": Field(bool, True, "share input embedding and output projection"),
    "attention": Field(dict, {"variant": "vanilla"}, "default attention for every layer"),
    "layers": Field(list, [], "per-layer overrides: [{at: [indices], attention: {...}}]"),
}


# The stack's components and the value a new config gets. Checkpoints written before these keys existed
# were GPT-2's stack: `checkpoint.load_model` fills LEGACY_STACK for them.
STACK_DEFAULTS = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
LEGACY_STACK = {"position": "learned", "norm": "layernorm", "mlp": "gelu"}


def model_fields() -> dict[str, Field]:
    """MODEL_FIELDS plus, for each component kind, the key naming it (choices: what is registered now,
    plug-ins included) and every parameter key its registered components declare."""
    from .components import KINDS

    fields = dict(MODEL_FIELDS)
    for key, kind in KINDS.items():
        fields[key] = Field(str, STACK_DEFAULTS[key], kind.doc, choices=tuple(kind.names()))
        for name, param in kind.params().items():
            check = (lambda p: (lambda v: run_check(p.check, v, None)))(param) if param.check else None
            fields[name] = Field(param.type, param.default, param.doc, param.choices, check=check, finite=param.finite)
    return fields


@dataclass
class LayerSpec:
    """The attention of one layer as resolved from `model.attention` and `model.layers`."""

    index: int
    variant: str
    params: dict[str, Any]
    origin: dict[str, str] = field(default_factory=dict)  # param (and 'variant') -> key path it came from


def params_kept(attention: dict, current: Any, named: Any) -> dict:
    """What an override that names variant `named` keeps of `attention`, the mapping of variant `current` it
    overrides (any values: layer_specs' are (value, origin) pairs): all of it when `named` is `current`, not text
    or not a registered variant (that name is then the problem to report), else only the parameters `named`
    declares, `variant` itself dropped for the override to set. Used by `layers:` overrides and by a sweep's
    runs, so both treat another variant's options alike. Raises nothing."""
    if not isinstance(named, str) or named == current or named not in VARIANTS:
        return attention
    declared = get_variant(named).params
    return {k: v for k, v in attention.items() if k in declared}


def layer_specs(model: dict) -> list[LayerSpec]:
    """Resolve per-layer attention. An override that names another variant inherits only the default
    parameters that variant declares (so `{variant: vanilla}` keeps kv_heads, drops selection_head)."""
    default = dict(model["attention"])
    specs = []
    for i in range(model["depth"]):
        attn = {k: (v, "model.attention") for k, v in default.items()}
        for n, override in enumerate(model.get("layers", [])):
            at = override.get("at", [])
            at = [at] if isinstance(at, int) else at
            if i in at:
                new = override.get("attention", {}) or {}
                attn = params_kept(attn, attn.get("variant", ("vanilla",))[0], new.get("variant"))
                attn.update({k: (v, f"model.layers[{n}].attention") for k, v in new.items()})
        variant, variant_origin = attn.pop("variant", ("vanilla", "model.attention"))
        origin = {"variant": variant_origin, **{k: o for k, (_, o) in attn.items()}}  # where each key was set
        specs.append(LayerSpec(i, variant, {k: v for k, (v, _) in attn.items()}, origin))
    return specs


def head_dim_of(model: dict) -> int:
    """The per-head width a validated model section means: `head_dim`, or dim // heads when it is null."""
    return model["head_dim"] or model["dim"] // model["heads"]


def layer_shape(model: dict, index: int) -> LayerShape:
    """Layer `index`'s shape from a model section (defaults where a key failed validation)."""
    return LayerShape(model["dim"], model["heads"], head_dim_of(model), index, model["depth"],
                      model.get("norm_eps", 1e-5), model.get("max_seq_len", MODEL_FIELDS["max_seq_len"].default))


def stack_shape(model: dict):
    """The sizes the stack's components are built for (defaults where a key failed validation)."""
    from .components import StackShape

    sizes = {k: model.get(k, MODEL_FIELDS[k].default) for k in ("max_seq_len", "mlp_ratio", "dropout")}
    return StackShape(model["dim"], model["heads"], head_dim_of(model), **sizes)


def _validate_model(value: Any, source: str, plugin_failures: list[str]) -> tuple[dict, list[Problem]]:
    model, problems = validate_fields(value, model_fields(), "model", source)
    bad = {p.path for p in problems}
    shapes_ok = not bad & {"model", "model.dim", "model.heads", "model.head_dim"}
    if shapes_ok and model["head_dim"] is None and model["dim"] % model["heads"]:
        problems.append(Problem(source, "model.heads", model["heads"],
                                f"dim ({model['dim']}) must be divisible by heads, or set model.head_dim"))
        shapes_ok = False
    if not shapes_ok or bad & {"model.depth", "model.attention", "model.layers"}:
        # shapes unknown: per-layer checks would only add noise, but a misspelt variant name needs no shapes
        if not bad & {"model", "model.attention"}:
            problems += _unknown_variant(model["attention"].get("variant", "vanilla"), "model.attention.variant",
                                         source, plugin_failures)
        return model, problems
    problems += _check_components(model, source)
    for n, override in enumerate(model["layers"]):
        where = f"model.layers[{n}]"
        if not isinstance(override, dict):
            problems.append(Problem(source, where, override, "expected a mapping {at: [...], attention: {...}}"))
            continue
        for key in override:
            if key not in ("at", "attention"):
                problems.append(Problem(source, f"{where}.{key}", override[key],
                                        f"unknown key; {valid_choices(str(key), ['at', 'attention'])}"))
        at = override.get("at", _MISSING)
        indices = [at] if isinstance(at, int) and not isinstance(at, bool) else at
        if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            problems.append(Problem(source, f"{where}.at", at, "expected a layer index or a list of layer indices"))
        elif bad := [i for i in indices if not 0 <= i < model["depth"]]:
            problems.append(Problem(source, f"{where}.at", at, f"layer indices {bad} outside [0, {model['depth'] - 1}]"))
        elif not indices:
            problems.append(Problem(source, f"{where}.at", at, "selects no layer; list the layer indices to override"))
        if "attention" not in override:
            problems.append(Problem(source, f"{where}.attention", _MISSING,
                                    "missing: an override without `attention` changes nothing"))
        elif not isinstance(override["attention"], dict):
            problems.append(Problem(source, f"{where}.attention", override["attention"], "expected a mapping"))
    # With malformed overrides, still check the default attention (as if there were no overrides).
    layers_ok = not any(p.path.startswith("model.layers") for p in problems)
    seen: set[tuple[str, str]] = set()
    for spec in layer_specs(model if layers_ok else {**model, "layers": []}):
        if not isinstance(spec.variant, str) or spec.variant not in VARIANTS:
            path = f"{spec.origin.get('variant', 'model.attention')}.variant"
            key = (path, str(spec.variant))
            if key not in seen:
                seen.add(key)
                problems += _unknown_variant(spec.variant, path, source, plugin_failures)
            continue
        for p in check_params(spec.variant, spec.params, layer_shape(model, spec.index)):
            path = f"{spec.origin.get(p.key, 'model.attention')}.{p.key}"
            if (path, p.message) not in seen:
                seen.add((path, p.message))
                problems.append(Problem(source, path, _MISSING if p.missing else p.value, p.message))
    if not any(p.path.startswith(("model.attention", "model.layers")) for p in problems):
        problems += check_state_flow(model, source)
    return model, problems


def _unknown_variant(name: Any, path: str, source: str, plugin_failures: list[str]) -> list[Problem]:
    """[the problem] if `name` is not a registered variant, else []."""
    if isinstance(name, str) and name in VARIANTS:
        return []
    hint = f"; plugins that failed to import: {'; '.join(plugin_failures)}" if plugin_failures else ""
    return [Problem(source, path, name, f"unknown variant; {valid_choices(str(name), VARIANTS.names())}{hint}")]


def _check_components(model: dict, source: str) -> list[Problem]:
    """Each chosen component's own check of the model's shape (e.g. rope needs an even head_dim)."""
    from .components import KINDS

    problems = []
    for key, kind in KINDS.items():
        name = model.get(key)
        if name in kind.names() and (message := run_check(kind.get(name).check_shape, stack_shape(model))):
            problems.append(Problem(source, f"model.{key}", name, message))
    return problems


def resolved_layers(model: dict) -> list[dict[str, Any]]:
    """Each layer's attention as it is built, from a validated model section: `{"variant": name, **params}`
    with every parameter the variant declares (defaults filled in, per-layer overrides applied); (depth,) list.
    Two sections that build the same attention give equal lists however they were written."""
    return [{"variant": s.variant, **resolved_params(s.variant, s.params)} for s in layer_specs(model)]


def build_attentions(model: dict, backend: str = "auto") -> list[torch.nn.Module]:
    """One attention module per layer, as the config says. Raises PluginBuildFailed when a plug-in's constructor
    (or a UserError of the zoo's own) fails; see `_build_attention`."""
    return [_build_attention(model, s, backend) for s in layer_specs(model)]


def _build_attention(model: dict, spec: LayerSpec, backend: str) -> torch.nn.Module:
    """Layer `spec`'s attention module, built as `variant.construct` builds (on the meta device too, for a plug-in
    whose __init__ reads tensor values). A failure of a plug-in's constructor (or a UserError, a layer refusing
    its configuration) is raised as PluginBuildFailed; running out of memory passes through (build_model says
    how large the model is), and any other failure of the zoo's own classes too: a bug, to see with its
    traceback."""
    cls = get_variant(spec.variant)
    shape, params = layer_shape(model, spec.index), resolved_params(spec.variant, spec.params)
    try:
        return construct(cls, shape, backend=backend, **params)
    except Exception as exc:
        if out_of_memory(exc) or zoos_own(cls) and not isinstance(exc, UserError):
            raise
        raise PluginBuildFailed(f"{spec.origin.get('variant', 'model.attention')}.variant", spec.variant, cls, exc,
                                where=f"layer {spec.index}") from exc


def check_state_flow(model: dict, source: str) -> list[Problem]:
    """Walk the layers as built on the meta device (no memory) and check every read has a writer below: one problem
    per variant and channel, naming its layers, with the layer's `missing_state_hint(channel)` (an optional method
    saying what to change) or else the channel's doc."""
    problems = []
    try:
        with torch.device("meta"):
            attentions = build_attentions(model)
    except PluginBuildFailed as exc:  # a plug-in's constructor failing is a config problem, not a crash
        return [exc.problem(source)]
    written: set[str] = set()
    unwritten: dict[tuple[str, str], list[int]] = {}  # (variant, channel) -> layers reading it with no writer below
    hints: dict[tuple[str, str], str] = {}
    for spec, attn in zip(layer_specs(model), attentions):
        for channel in attn.reads:
            if channel not in written:
                unwritten.setdefault((spec.variant, channel), []).append(spec.index)
                # a layer may say what to change (its `missing_state_hint(channel)`, optional); else the channel's doc
                hint = getattr(attn, "missing_state_hint", lambda channel: None)(channel)
                if hint:
                    hints[spec.variant, channel] = hint
        for channel in attn.writes:
            if channel not in CHANNELS:
                problems.append(Problem(source, f"model (layer {spec.index}, variant {spec.variant})", _MISSING,
                                        f"writes undeclared state channel {channel!r}; declare it with state.declare_channel"))
        written.update(attn.writes)
    for (variant, channel), layers in unwritten.items():  # one problem for the layers one cause breaks, not one each
        which = f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))}"
        doc = CHANNELS[channel].doc if channel in CHANNELS else "undeclared channel"
        why = f": {hints[variant, channel]}" if (variant, channel) in hints else f" ({doc})"
        problems.append(Problem(source, f"model ({which}, variant {variant})", _MISSING,
                                f"read{'s' * (len(layers) == 1)} state {channel!r} that no earlier layer writes{why}"))
    return problems


# ---------------------------------------------------------------------------------------------------
# Loading.

class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key that appears twice in one mapping (plain PyYAML keeps the last
    one without a word: `model: {dim: 64, dim: 32}` would silently build width 32)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, except that a key repeated within one mapping raises yaml.YAMLError (a
    ConstructorError whose problem_mark is the repeated key)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def read_yaml_file(path: Path, missing: Problem | None = None, shown: str | None = None) -> tuple[Any, list[Problem]]:
    """The YAML document in `path` (None for an empty file), or the one Problem that stops reading it: not
    found (`missing`, if given, names who pointed there), unreadable, not UTF-8, invalid YAML (with line and
    column) or a key repeated in one mapping. Problems name the file `shown` (default: `path`), e.g. as the user
    wrote it where `path` is resolved."""
    source = shown or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, [missing or Problem(source, "(file)", source, "file not found")]
    except OSError as exc:
        return None, [Problem(source, "(file)", _MISSING, f"cannot read: {exc}")]
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start:exc.start + 1]
        return None, [Problem(source, "(file)", _MISSING, f"not UTF-8 text (byte {exc.start}: {bad!r}); expected a YAML file")]
    try:
        return load_yaml(text), []
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        return None, [Problem(source, where, _MISSING, f"invalid YAML: {getattr(exc, 'problem', exc)}")]


def read_yaml_chain(path: Path, chain: tuple[Path, ...] = (), origins: dict[str, str] | None = None,
                    names: tuple[str, ...] = (), missing: Problem | None = None) -> tuple[dict, list[Problem]]:
    """The raw, unvalidated mapping of YAML file `path` merged over its `base:` chain (a file's keys override
    its base's key by key; `base` itself removed), and the problems met on the way: a missing, unreadable,
    empty or invalid file, a top level that is not a mapping, a `base` that is not a path, an inheritance
    cycle. Never raises for bad input: `({}, problems)` then. `chain` is the files that led here (for the
    cycle check). `missing`: the Problem for a `path` that does not exist (default: "file not found" at this
    file), e.g. at the `base` key that named it.

    Given `origins` (a dict), fills it with each key path of the merged mapping (`model.dim`; see
    `origin_of`) -> the file that set it: `names[-1]` (default: `path`), or `e2.yaml (base of b8.yaml)`
    for a key from a base; `names` are the files that led here as the user wrote them, this one last, and
    problems name files by them (a resolved absolute path is not what the user typed)."""
    names = names or (str(path),)
    source = names[-1]
    if path in chain:
        return {}, [Problem(names[-2], "base", source, "inheritance cycle: " + " -> ".join(names))]
    data, problems = read_yaml_file(path, missing, shown=source)
    if problems:
        return {}, problems
    if data is None:  # nothing but whitespace or comments: a mistake (a wrong path, a truncated file), not defaults
        return {}, [Problem(source, "(file)", _MISSING, "the file is empty; expected a mapping of sections "
                                                         "(model, backend, ...); write `model: {}` for every default")]
    if not isinstance(data, dict):
        return {}, [Problem(source, "(top level)", data, "expected a mapping of sections (model, backend, ...)")]
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        return {}, [Problem(source, "base", base, "expected a path to another YAML file")]
    label = names[-1] + (f" ({', '.join(f'base of {n}' for n in reversed(names[:-1]))})" if len(names) > 1 else "")
    ambiguous = resolve_file_keys(data, path, names[-1], label)
    parent, problems = {}, []
    if base is not None:
        # the base's name as the user would write it: beside the file that names it
        base_name = os.path.normpath(Path(names[-1]).parent / base)
        parent, problems = read_yaml_chain((path.parent / base).resolve(), (*chain, path), origins, (*names, base_name),
                                           missing_base(source, base, base_name))
    if origins is not None:  # after the base's keys, so this file's own keys win as they do in the merge
        _record_origins(data, label, origins)
    for key, value in data.items():  # as documented, but one keystroke from keeping it: said, not silent
        if value is None and isinstance(parent.get(key), dict) and parent[key]:
            log.warning(f"{source}: `{key}:` is empty (null), so it replaces the whole `{key}` section of its base "
                        f"{base_name} with the defaults; leave the key out, or write `{key}: {{}}`, to keep it")
    return deep_merge(parent, data), _replaced(problems, data) + ambiguous  # a child's value replaces its base's


def missing_base(source: str, base: str, looked_for: str) -> Problem:
    """The problem at file `source`'s `base:` key, whose value `base` names no file: "file not found", with where it
    was looked for (`looked_for`, relative to the working directory) when that is not `base` as written."""
    where = f" (looked for {looked_for}, beside {source})" if looked_for != os.path.normpath(base) else ""
    return Problem(source, "base", base, f"file not found{where}")


# Keys naming the user's own files. A relative one is tried from the working directory, then from the folder of
# the YAML file that sets it, so a config (or a base) kept beside its text works from anywhere.
FILE_KEYS = (("data", "text"),)


def resolve_file_keys(data: dict, path: Path, name: str, label: str) -> list[Problem]:
    """Rewrite each relative FILE_KEYS value of `data` (YAML file `path`, which the user named `name`) that does
    not exist from the working directory but does beside `path` into that file's absolute path, so the run's
    config.yaml names it from anywhere. A relative path that exists in both places, as two different files,
    is an AmbiguousPath problem, named `label` (the file, and those it is a base of); the rest stays as
    written, for the section to check."""
    problems = []
    for section, key in FILE_KEYS:
        value = data[section].get(key) if isinstance(data.get(section), dict) else None
        here = Path(value).expanduser() if isinstance(value, str) and value else None
        if here is None or here.is_absolute():
            continue
        beside = path.parent / here
        if here.exists() and beside.exists() and here.resolve() != beside.resolve():
            problems.append(AmbiguousPath(label, f"{section}.{key}", value, f"names two different files: {here.resolve()} "
                                    f"(from the working directory) and {beside.resolve()} (beside {name}); write the "
                                    "path of the one you mean"))
        elif not here.exists() and beside.exists():
            data[section][key] = str(beside.resolve())
    return problems


def _record_origins(data: dict, label: str, origins: dict[str, str], prefix: str = "") -> None:
    """Record `label` as the origin of every key path in `data` (mappings and what is in them); a key whose
    value is not a mapping replaces what lay below it, so the origins recorded below it go."""
    for key, value in data.items():
        path = f"{prefix}{key}"
        if not isinstance(value, dict):
            for below in [p for p in origins if p.startswith((f"{path}.", f"{path}["))]:
                del origins[below]
        origins[path] = label
        if isinstance(value, dict):
            _record_origins(value, label, origins, f"{path}.")


def origin_of(path: str, origins: dict[str, str], default: str) -> str:
    """The file (or override) that set key path `path` (a Problem's: `model.layers[0].at`), else that of its
    longest recorded prefix (a key left to its default belongs to the file with its section), else `default`."""
    while path:
        if path in origins:
            return origins[path]
        path = path[:max(path.rfind("."), path.rfind("["), 0)]
    return default


def config_file(path: str) -> str:
    """`path` itself, or for a run or checkpoint folder the config.yaml it holds (a run folder's, else its
    checkpoint/'s): what train, validate and describe read. UserError for a folder without one."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    for candidate in (folder / "config.yaml", folder / "checkpoint" / "config.yaml"):
        if candidate.is_file():
            return str(candidate)
    raise UserError(f"{path}: a folder without config.yaml; give a config file, a run folder or a checkpoint folder")


def deep_merge(base: dict, override: dict) -> dict:
    """Mappings merge key by key; anything else (lists included) is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        both_mappings = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = deep_merge(out[key], value) if both_mappings else copy.deepcopy(value)
    return out


def apply_override(data: dict, override: str, source: str) -> Problem | None:
    """`a.b.c=value` (value parsed as YAML); list items by index: `model.layers.0.at=[1]`."""
    if "=" not in override:
        return Problem(source, "(override)", override, "expected KEY.PATH=VALUE, e.g. model.depth=6")
    key, raw = override.split("=", 1)
    if not key.strip():
        return Problem(source, "(override)", override, "the key is missing; expected KEY.PATH=VALUE, e.g. model.depth=6")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (column {mark.column + 1})" if mark else ""
        return Problem(source, key, raw, f"value is not valid YAML: {getattr(exc, 'problem', None) or exc}{where}")
    parts = key.strip().split(".")
    if not all(parts):
        return Problem(source, key, raw, "the key path has an empty part; expected KEY.PATH=VALUE, e.g. model.depth=6")
    def no_item(path: str, part: str, items: list) -> Problem:
        have = f"it has {len(items)} item{'s' if len(items) != 1 else ''}" + (f", 0 to {len(items) - 1}" if items else "")
        return Problem(source, path, _MISSING, f"no list item {part!r} ({have}); set the whole list to add one")

    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return no_item(".".join(parts[: i + 1]), part, node)
            node = node[int(part)]
        else:
            if part not in node and parts[i + 1].isdigit():  # an index into a list the config does not have
                return Problem(source, ".".join(parts[: i + 1]), _MISSING, f"no list to take item {parts[i + 1]} of; "
                               f"set the whole list, e.g. {'.'.join(parts[: i + 1])}=[...]")
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                return Problem(source, ".".join(parts[: i + 1]), node, "cannot set a key inside a non-mapping")
    if isinstance(node, list):
        if not parts[-1].isdigit() or int(parts[-1]) >= len(node):
            return no_item(key, parts[-1], node)
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value
    return None


def _load_section_modules() -> None:
    for module in SECTION_MODULES:
        importlib.import_module(module)


TOP_LEVEL = ("plugins", "backend", "model")


def load_config(path_or_dict: str | Path | dict, overrides: Iterable[str] = ()) -> Config:
    """Load and validate a config: a YAML path (with its `base:` chain) or a dict, then `a.b=value` overrides.
    Imports the `plugins:` modules. Returns a Config (nested dicts, defaults filled in, `.source` the path).

    Raises ConfigError (a ValueError and a UserError) listing every problem at once, each with the file, the
    key path, the bad value and what is valid: a missing, unreadable, empty or invalid YAML file, unknown keys
    or sections, wrong types, non-finite numbers, values out of range, unknown variants or parameters, and a
    state flow that does not hold. A plugin that fails to import is not raised: it is logged, kept in the
    Config's `plugin_failures` and named in the error of a layer that needs its variant."""
    _load_section_modules()
    origins: dict[str, str] = {}  # key path -> the file or override that set it, to name it in a problem
    if isinstance(path_or_dict, dict):
        source, data, problems = "<dict>", copy.deepcopy(path_or_dict), []
        if "base" in data:
            base = data.pop("base")
            parent, problems = read_yaml_chain(Path(base).resolve(), origins=origins, names=(source, str(base)))
            _record_origins(data, source, origins)
            data = deep_merge(parent, data)
    else:
        source = str(path_or_dict)
        data, problems = read_yaml_chain(Path(path_or_dict).resolve(), origins=origins, names=(source,))
        if problems and problems[0].path == "(file)" and problems[0].message == "file not found":
            problems[0].source = source
    override_source = f"override (on {source})"
    for override in overrides:
        if (p := apply_override(data, override, override_source)) is not None:
            problems.append(p)
        else:  # `model.layers.0.at` is named `model.layers[0].at` in problems
            key, raw = override.split("=", 1)
            key = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", key.strip())
            _record_origins({key: yaml.safe_load(raw)}, override_source, origins)
            problems = [p for p in problems if not (isinstance(p, AmbiguousPath) and  # the override replaced it
                                                   (p.path == key or p.path.startswith(f"{key}.")))]
    if problems:
        raise ConfigError(problems)

    config = Config()
    config.source = source
    known = (*TOP_LEVEL, *SECTIONS)
    for key in data:
        if key not in known:
            problems.append(Problem(source, str(key), data[key], f"unknown section; {valid_choices(str(key), list(known))}"))

    plugins = data.get("plugins", []) or []
    plugin_failures: list[str] = []
    if not isinstance(plugins, list) or not all(isinstance(m, str) for m in plugins):
        problems.append(Problem(source, "plugins", plugins, "expected a list of importable module names"))
    else:  # imported here only: `validate` names the failures from config.plugin_failures, not a second try
        config.plugin_failures = {module: f for module in dict.fromkeys(plugins) for f in import_plugins([module])}
        plugin_failures = [f"{f.source}: {f.error}" for f in config.plugin_failures.values()]
        plugin_failures += [f"{f.source}: {f.error}" for f in VARIANTS.failures]
    config["plugins"] = plugins

    backend = data.get("backend", "auto")
    if backend not in _backend_choices():
        problems.append(Problem(source, "backend", backend, valid_choices(str(backend), list(_backend_choices()))))
    config["backend"] = backend

    try:
        config["model"], model_problems = _validate_model(data.get("model"), source, plugin_failures)
    except RegistryError as exc:  # a broken built-in registration: report, don't crash
        config["model"], model_problems = {}, [Problem(source, "model", _MISSING, str(exc))]
    problems += model_problems
    for name, validator in SECTIONS.items():
        config[name], section_problems = validator(data.get(name), source)
        problems += section_problems
    if problems:  # plan_run compares them in a valid config; in an invalid one here, so that all problems come at once
        problems += _seq_len_problems(config, problems, source)
    for problem in problems:  # the validators name the config; name the base file or override that set the value
        if problem.source == source:
            problem.source = origin_of(problem.path, origins, source)
    if problems:
        raise ConfigError(problems)
    return config


def seq_len_problem(source: str, seq_len: int, max_seq_len: int) -> Problem | None:
    """The problem of a train.seq_len longer than model.max_seq_len (the training length the model is built for:
    learned positions end there), else None."""
    if seq_len <= max_seq_len:
        return None
    return Problem(source, "train.seq_len", seq_len, f"longer than model.max_seq_len ({max_seq_len}); raise "
                                                     "model.max_seq_len")


def _seq_len_problems(config: Config, problems: list[Problem], source: str) -> list[Problem]:
    """[seq_len_problem] of a config with other `problems`, when train.seq_len is set and it and model.max_seq_len
    hold valid values (no problem at those keys or a section above them): that check needs only these two values,
    so a wrong model.dim does not hide it until it is fixed (a null seq_len depends on the dataset: plan_run's)."""
    def valid(key: str) -> bool:
        return not any(key == p.path or key.startswith(f"{p.path}.") for p in problems)

    train, model = config.get("train"), config.get("model")
    if not (isinstance(train, dict) and isinstance(model, dict) and valid("train.seq_len") and valid("model.max_seq_len")):
        return []
    seq_len, max_seq_len = train.get("seq_len"), model.get("max_seq_len")
    if not all(is_whole(v) for v in (seq_len, max_seq_len)):
        return []
    problem = seq_len_problem(source, seq_len, max_seq_len)
    return [problem] if problem is not None else []


def build_model(config_or_path: str | Path | dict | Config, overrides: Iterable[str] = ()):
    """A CausalLM from a config (a path, a dict or a loaded Config; validated here unless it already is, or
    when `overrides` are given). Raises ConfigError as `load_config` does; weights are allocated on the
    current default device."""
    from .model import CausalLM

    config = config_or_path if isinstance(config_or_path, Config) and not overrides else load_config(config_or_path, overrides)
    from .components import MLPS, NORMS, POSITIONS

    m = config["model"]
    shape = stack_shape(m)

    def build() -> CausalLM:
        mlps = [MLPS.build(m["mlp"], shape, m) for _ in range(m["depth"])]
        return CausalLM(build_attentions(m, config["backend"]), mlps,
                        make_norm=lambda: NORMS.build(m["norm"], shape, m),
                        position_embedding=POSITIONS.build(m["position"], shape, m), vocab_size=m["vocab_size"],
                        dim=m["dim"], max_seq_len=m["max_seq_len"], dropout=m["dropout"],
                        tie_embeddings=m["tie_embeddings"])

    try:
        model = build()
    # a layer: the real device met what the meta check did not; a plug-in MLP, norm or positional scheme: built
    # here only (the state-flow check builds none)
    except PluginBuildFailed as exc:
        raise ConfigError([exc.problem(config.source)]) from exc.exc
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        with torch.device("meta"):  # shapes only: how large the model that did not fit is
            count = sum(p.numel() for p in build().parameters())
        raise UserError(f"{config.source}: the model does not fit in memory: {count:,} parameters "
                        f"({count * 4 / 2**30:,.1f} GiB in float32) from model.vocab_size {m['vocab_size']:,}, dim "
                        f"{m['dim']:,}, depth {m['depth']:,}; make it smaller") from None
    model.config = config
    from .backends import BACKENDS

    BACKENDS.names()  # the forward's lookups would load the registry (entry points: a graph break under compile)
    return model
