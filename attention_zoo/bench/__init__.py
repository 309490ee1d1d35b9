"""`attention-zoo bench`: time and peak memory of variants x backends x lengths x batch sizes.

Each point runs in its own process (`worker.py`), so peak memory is that point's alone; ratios to
vanilla are measured in the same run (and with `--compile off,on`, each compiled point's time to its eager
twin's); `--peer x-transformers` measures the equivalent x-transformers
models alongside. Outputs: results.json, results.md and results.png in the output folder, and
profiles.md with `--profile`.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .points import (
    BASELINE,
    COMPILE,
    DTYPES,
    MODES,
    OURS,
    PEER,
    PRESETS,
    Point,
    VariantSpec,
    model_config,
    peer_kwargs,
    resolve_variant,
)
from .report import machine, write_json, write_markdown, write_plot, write_profiles
from .runner import Outcome, peer_comparison, run_sweep, with_ratios

PEERS = (PEER,)


@dataclass
class BenchSettings:
    variants: list[str]
    backends: list[str] = field(default_factory=lambda: ["sdpa"])
    seq_lens: list[int] = field(default_factory=lambda: [256, 1024])
    batches: list[int] = field(default_factory=lambda: [4])
    modes: list[str] = field(default_factory=lambda: ["fwdbwd"])
    compiles: list[str] = field(default_factory=lambda: ["off"])  # "off", "on": eager, torch.compile
    dim: int = 256
    depth: int = 4
    heads: int = 8
    head_dim: int = 64
    vocab_size: int = 256
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 5
    warmup: int = 2
    rounds: int = 1
    threads: int | None = None
    timeout: float = 600.0
    profile: bool = False  # each point also writes where one step's time went (profiles.md)
    peers: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every point's process
    plugins: list[str] = field(default_factory=list)  # modules (or "a,b" lists) registering variants in `variants`


def plan(settings: BenchSettings) -> list[Point]:
    """Every point of the sweep, checked before anything runs. Vanilla is always included: the ratios
    need it. Raises UserError (or ConfigError) naming the bad value."""
    from ..backends import BACKEND_CHOICES
    from ..config import load_config
    from ..inference.checkpoints import check_device

    problems = []
    for backend in settings.backends:
        if backend not in BACKEND_CHOICES:
            problems.append(f"--backends: unknown backend {backend!r}; valid: {', '.join(BACKEND_CHOICES)}")
    for mode in settings.modes:
        if mode not in MODES:
            problems.append(f"--mode: unknown mode {mode!r}; valid: {', '.join(MODES)}")
    for value in settings.compiles:
        if value not in COMPILE:
            problems.append(f"--compile: unknown value {value!r}; valid: {', '.join(COMPILE)}")
    if settings.dtype not in DTYPES:
        problems.append(f"--dtype: {settings.dtype!r} is not one of {', '.join(DTYPES)}")
    for peer in settings.peers:
        if peer not in PEERS:
            problems.append(f"--peer: unknown peer {peer!r}; valid: {', '.join(PEERS)}")
        elif importlib.util.find_spec("x_transformers") is None:
            problems.append("--peer x-transformers: the x_transformers package is not installed (pip install x-transformers)")
    for name, values in (("--seq-lens", settings.seq_lens), ("--batch", settings.batches)):
        if not values or any(v < 1 for v in values):
            problems.append(f"{name}: expected positive integers, got {values}")
    for name in ("dim", "depth", "heads", "head_dim", "vocab_size", "repeats", "rounds"):
        if getattr(settings, name) < 1:
            problems.append(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(settings, name)}")
    if settings.warmup < 0:
        problems.append(f"--warmup: must be >= 0, got {settings.warmup}")
    try:
        check_device(settings.device)  # generate's and eval's check: cpu, cuda, cuda:N on a machine that has it
    except UserError as exc:
        problems.append(str(exc))
    if problems:
        raise UserError("\n".join(problems))

    names = list(dict.fromkeys(settings.variants))
    if BASELINE not in names:
        names.insert(0, BASELINE)
    from ..registry import import_required_plugins

    plugins = tuple(import_required_plugins(settings.plugins))
    specs = []
    for name in names:
        spec = resolve_variant(name, plugins)
        if spec not in specs:  # one config file given twice, e.g. as a.yaml and ./a.yaml
            specs.append(spec)
    _check_labels(specs)
    common = dict(dim=settings.dim, depth=settings.depth, heads=settings.heads, head_dim=settings.head_dim,
                  vocab_size=settings.vocab_size, dtype=settings.dtype, device=settings.device, warmup=settings.warmup,
                  repeats=settings.repeats, threads=settings.threads, profile=settings.profile)
    points = []
    for spec in specs:  # validate each variant's config once, at the largest length
        probe = Point(OURS, spec, settings.backends[0], max(settings.seq_lens), settings.batches[0], settings.modes[0], **common)
        try:
            load_config(model_config(probe))
        except UserError as exc:
            raise UserError(f"variant {spec.label!r}: {exc}") from None
    for n in settings.seq_lens:
        for b in settings.batches:
            for mode in settings.modes:
                for compiled in (value == "on" for value in settings.compiles):
                    for spec in specs:
                        for backend in settings.backends:
                            points.append(Point(OURS, spec, backend, n, b, mode, **common, compiled=compiled))
                        if PEER in settings.peers:
                            kwargs, path = peer_kwargs(spec, settings.depth)
                            if kwargs is not None:
                                points.append(Point(PEER, spec, path, n, b, mode, **common, compiled=compiled,
                                                    extra={"peer_kwargs": kwargs}))
    return points


def _check_labels(specs: list[VariantSpec]) -> None:
    """Raise UserError where two variants share a label: a point's rows, its rounds' medians and its ratios are
    keyed by label, so a config file named `vanilla.yaml` (labelled by its file name) became the ratios'
    baseline in place of vanilla, and two `a.yaml` files from two folders pooled their rounds."""
    by_label: dict[str, list[str]] = {}
    for spec in specs:
        shown = spec.config_path or spec.label
        by_label.setdefault(spec.label, []).append(shown)
    clashes = [f"--variants: {' and '.join(map(repr, shown))} share the label {label!r}"
               + (" (vanilla is always measured: the ratios' baseline)" if label == BASELINE else "")
               + "; a config file is labelled by its file name: rename one" for label, shown in by_label.items()
               if len(shown) > 1]
    if clashes:
        raise UserError("\n".join(clashes))


def summarize(outcomes: list[Outcome]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = with_ratios([o.summary() for o in outcomes])
    return rows, peer_comparison(rows)


def benchmark(settings: BenchSettings, out: str | Path, *, command: str = "", progress: bool = True) -> dict[str, Any]:
    """Run the sweep and write results.json (after every point), results.md and results.png."""
    points = plan(settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = {"command": command, "machine": machine(), "settings": {**vars(settings)}}

    def payload(outcomes: list[Outcome], done: bool) -> dict[str, Any]:
        rows, comparison = summarize(outcomes)
        return {**base, "complete": done, "results": rows, "comparison": comparison}

    def write_all(result: dict[str, Any]) -> None:
        write_json(out, result)
        write_markdown(out, result)
        write_plot(out, result)
        if settings.profile:
            write_profiles(out, result)

    so_far: list[Outcome] = []

    def record(outcomes: list[Outcome]) -> None:
        so_far[:] = outcomes
        write_json(out, payload(outcomes, False))

    try:
        outcomes = run_sweep(points, rounds=settings.rounds, timeout=settings.timeout, progress=progress,
                             env=settings.env, on_result=record)
    except KeyboardInterrupt:  # Ctrl-C, or a time limit's SIGINT: the points that finished still get their report
        if so_far:
            write_all(payload(so_far, False))
        raise
    final = payload(outcomes, True)
    write_all(final)
    return final


__all__ = ["BenchSettings", "PRESETS", "VariantSpec", "Point", "benchmark", "plan", "summarize"]
