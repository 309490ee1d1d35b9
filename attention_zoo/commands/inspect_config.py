"""`list`, `validate` and `describe`: look at variants and configs without training anything.

Like every command module, this one imports torch and the model code inside its commands, not at the top:
building the parser (`attention-zoo --help`, a mistyped flag) then takes a fraction of a second."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import logging
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from ..config import Problem


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="registered variants with descriptions and parameters")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style wildcard, e.g. 'sel*'")
    p.add_argument("--plugins", action="append", default=[], metavar="MOD[,MOD]",
                   help="import these modules first (as a config's `plugins:` does), so their variants are listed; "
                   "repeatable; the modules' folder must be importable (e.g. PYTHONPATH=.)")
    p.set_defaults(run=cmd_list)

    p = sub.add_parser("validate", help="check config files; report every problem")
    p.add_argument("files", nargs="+", metavar="FILE_OR_OVERRIDE",
                   help="config files or run/checkpoint folders, and KEY.PATH=VALUE overrides applied to each of "
                   "them (e.g. model.depth=6)")
    p.set_defaults(run=cmd_validate)

    p = sub.add_parser("describe", help="per layer: variant, parameters, state flow, backend; parameter count")
    p.add_argument("file", help="config file, or a run or checkpoint folder (its config.yaml)")
    p.add_argument("overrides", nargs="*", help="KEY.PATH=VALUE overrides, e.g. model.depth=6")
    p.add_argument("--device", default="cpu", help="device to plan the backend for: auto, cpu, cuda, cuda:N or mps "
                   "(need not be on this machine; default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--train", action="store_true", help="plan the backend for training (gradients on)")
    p.set_defaults(run=cmd_describe)


def cmd_list(args) -> int:
    """Print the variants matching args.pattern (with their Params), plugin failures and, for `*`, the stack
    components. Raises UserError (exit 2) naming every `--plugins` module that cannot be imported."""
    from ..components import KINDS
    from ..config import STACK_DEFAULTS
    from ..registry import import_required_plugins
    from ..variant_registry import VARIANTS, get_variant, list_variants, summary

    import_required_plugins(args.plugins)
    names = list_variants(args.pattern)
    if not names:
        print(f"no variant matches {args.pattern!r}; registered: {', '.join(list_variants())}")
        return 1
    for name in names:
        print(f"{name}: {summary(name)}")
        for key, p in get_variant(name).params.items():
            default = "required" if p.required else f"default {p.default!r}"
            choices = f", one of {', '.join(map(str, p.choices))}" if p.choices else ""
            print(f"    {key} ({p.type_name()}, {default}{choices}): {p.doc}")
    for failure in VARIANTS.failures:
        print(f"(plugin not loaded: {failure.source}: {failure.error})")
    for key, kind in KINDS.items() if args.pattern == "*" else ():
        print(f"\nmodel.{key} ({kind.doc}; default {STACK_DEFAULTS[key]}):")
        for name in kind.names():
            cls = kind.get(name)
            print(f"  {name}: {(inspect.getdoc(cls) or '').splitlines()[0] if inspect.getdoc(cls) else ''}")
            for param_key, p in cls.params.items():
                print(f"    model.{param_key} ({p.type_name()}, default {p.default!r}): {p.doc}")
        for failure in kind.registry.failures:
            print(f"  (plugin not loaded: {failure.source}: {failure.error})")
    return 0


def cmd_validate(args) -> int:
    from ..config import ConfigError, config_file, load_config
    from ..dry_run import dry_run

    # KEY.PATH=VALUE is an override unless a file of that name exists (as `train` and `describe` read them)
    overrides = [a for a in args.files if "=" in a and not Path(a).exists()]
    files = [a for a in args.files if a not in overrides]
    if not files:
        raise UserError("validate: no config file given, only overrides: " + " ".join(overrides))
    failed = 0
    for path in files:
        try:
            file = config_file(path)
            if _is_sweep(Path(file)):  # checked as ablate reads it: every run's config, one dry run per distinct model
                from ..ablate import read_sweep_file

                sweep = read_sweep_file(file, overrides)
                print(f"{path}: ok (a sweep file: {len(sweep.runs)} runs)")
                continue
            with _quiet(logging.getLogger("attention_zoo.registry")):  # its failures are reported below, once
                config = load_config(file, overrides)
            # load_config lets a config whose layers need none of a broken plugin's variants load; validate names it
            broken = [f"{file}: plugins[{i}] = {module!r}: cannot be imported ({failure.error}); train would run "
                      "without it" for i, module in enumerate(config["plugins"])
                      if (failure := config.plugin_failures.get(module)) is not None]
            trains = _trains(file)  # a training config: its dry run with gradients on, as train's steps run
            # a plug-in's broken contract (a bias's shape, its state), found by one forward on the meta device
            problems = _problems_of(functools.partial(dry_run, train=trains), config, args.verbose)
            if trains:  # also what needs model, data and train together, as train checks
                from ..train.loop import plan_run

                problems += _problems_of(plan_run, config, args.verbose)
            if problems:
                raise ConfigError(problems)
            if broken:
                raise UserError("\n".join(broken))
            print(f"{path}: ok")
        except UserError as exc:  # ConfigError, DataError, a folder without config.yaml: report, go on
            failed += 1
            print(exc)
    return 2 if failed else 0


def _problems_of(check, config, verbose: bool) -> list[Problem]:
    """The problems `check(config)` raises as a ConfigError (none if it returns), so that validate reports those of
    every check together; another UserError (a DataError) passes through. `verbose`: also print the traceback of
    what caused it (a plug-in's failing forward)."""
    from ..config import ConfigError

    try:
        check(config)
    except ConfigError as exc:
        if verbose and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__)
        return list(exc.problems)
    return []


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    """`logger`'s warnings held back inside the block (for a caller that reports the same thing as an error)."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _plan(backend: str, call) -> tuple[str, str]:
    """(the backend `backend` picks for `call`, or `none: why`; the backends skipped before it and why). A separable
    bias is planned as dispatch runs it: read by the chosen backend's kernels, folded into q and k, or dense, and
    the plan says which."""
    from ..backends import BackendRefused, choose, separable_route

    note = ""
    if call.separable_width:
        route = separable_route(backend, call)
        note = {"read": " (separable bias read by its kernels)",
                "folded": f" (separable bias folded into q/k: head dim {call.head_dim} -> {route.call.head_dim})",
                "dense": f" (separable bias made dense: {route.why})"}[route.how]
        call = route.call
    try:
        chosen, skipped = choose(backend, call)
        return chosen.name + note, "; ".join(skipped)
    except BackendRefused as exc:
        return f"none: {exc}", ""


def _is_sweep(path: Path) -> bool:
    """Whether the file is an ablation sweep (a key only sweep files have: grid, runs, seeds, ...), which `ablate`
    reads, rather than a config. An unreadable file is left to load_config to report."""
    import yaml

    from ..ablate.sweep import SWEEP_FIELDS

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and any(key in raw for key in SWEEP_FIELDS.keys() - {"base", "name", "description"})


def _trains(path: str) -> bool:
    """Whether the file (with its bases) has a train or data section: a model-only config (for bench,
    import-hf, a sweep's base) is not checked against the default data set it would never train on."""
    from ..config import read_yaml_chain

    data, _ = read_yaml_chain(Path(path).resolve())
    return "train" in data or "data" in data


def cmd_describe(args) -> int:
    import torch

    from ..config import config_file, head_dim_of, layer_specs, load_config
    from ..dry_run import dry_run
    from ..inference.checkpoints import check_device
    from ..variant_registry import resolved_params

    device = check_device(args.device, auto=True, present=False)  # planning for a device this machine may lack is fine
    config = load_config(config_file(args.file), args.overrides)
    m = config["model"]
    model, per_layer, dense_residual = dry_run(config, train=args.train, device=device.type)  # what each layer asks for
    head_dim = head_dim_of(m)
    dtype = getattr(torch, args.dtype)
    print(f"{args.file}: depth {m['depth']}, dim {m['dim']}, heads {m['heads']} x {head_dim}, "
          f"vocab {m['vocab_size']}, max_seq_len {m['max_seq_len']}")
    print(f"stack: position {m['position']}, norm {m['norm']}, mlp {m['mlp']}")
    print(f"parameters: {model.num_parameters():,}")
    plans = []  # per layer: (backend chosen or a refusal, the backends skipped and why)
    for layer_calls in per_layer:
        if not layer_calls:  # the variant's own attend() computes attention without a backend
            plans.append(("none: the variant computes attention in its own attend(), so `backend:` does not apply "
                          "to this layer", ""))
            continue
        # the device's type, as a run's calls carry it (q.device.type): the backends check for "cuda", so a plan
        # for cuda:1 made with "cuda:1" refused Triton and xformers as "not on CUDA"
        per_call = [_plan(config["backend"], dataclasses.replace(c, device=device.type, dtype=dtype))
                    for c in layer_calls]
        if len(set(per_call)) == 1:
            plans.append(per_call[0])
        else:  # the layer's calls differ (e.g. in their value width) and so may their backends: each is said
            plans.append(("; ".join(f"call {i + 1}: {chosen}" + (f" (skipped {skipped})" if skipped else "")
                                    for i, (chosen, skipped) in enumerate(per_call)), ""))
    # the same skip reasons on every layer are said once, below, not repeated per layer
    shared_skip = plans[0][1] if len(plans) > 1 and len({skip for _, skip in plans}) == 1 and plans[0][1] else ""
    for spec, block, layer_calls, (backend, skipped), dense_why in zip(layer_specs(m), model.blocks, per_layer, plans,
                                                                      dense_residual):
        attn = block.attention
        params = resolved_params(spec.variant, spec.params)
        if skipped and not shared_skip:
            backend += f" (skipped {skipped})"
        reads = ", ".join(attn.reads) or "-"
        optional = ", ".join(attn.optional_reads)
        print(f"layer {spec.index}: {spec.variant} {params}")
        print(f"    state read: {reads}{f' (optional: {optional})' if optional else ''}; "
              f"written: {', '.join(attn.writes) or '-'}")
        call = layer_calls[0] if layer_calls else None
        bias = "none" if call is None or not call.has_bias else ("with grad" if call.bias_requires_grad else "constant")
        bias = f"separable, {bias}" if call is not None and call.separable_width else bias
        times = f"; {len(layer_calls)} calls" if len(layer_calls) > 1 else ""
        print(f"    backend ({config['backend']}, {device}, {args.dtype}{', train' if args.train else ''}; "
              f"bias {bias}{times}): {backend}")
        if dense_why:  # RealFormer's R went from q/k concatenated over layers to a (B, H, N, N) tensor here
            print(f"    residual scores R carried as a dense (B, H, N, N) tensor: {dense_why}")
    if shared_skip:
        print(f"skipped on every layer: {shared_skip}")
    return 0
