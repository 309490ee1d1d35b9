"""`attention-zoo bench`: forward / forward+backward time and peak memory over a sweep (see docs/benchmarks.md)."""
from __future__ import annotations

import argparse
import shlex
import sys

from ..env import check_environment
from ..errors import UserError
from ..numbers import finite_float
from ..paths import check_output_path


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, except where there is none to show (None, an empty list): a required
    --out, or --threads whose help says what unset means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default in (None, []) else super()._get_help_string(action)


def _list(kind):
    """An argparse type: comma-separated items of `kind`, each once in the order given (a point measured twice
    would give two vanilla rows, and ratios to whichever came last)."""
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        if kind is int:
            try:
                items = [int(t) for t in items]
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        return list(dict.fromkeys(items))

    return parse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time and peak memory of variants x backends x sequence lengths x batch sizes",
                       description="Each point runs in its own process; ratios to vanilla come from the same run. "
                                   "Writes results.json, results.md and results.png to --out and prints the table.",
                       formatter_class=_DefaultsShown)
    p.add_argument("--variants", type=_list(str), default=["vanilla", "selective"],
                   help="comma-separated presets (vanilla, gqa, mqa, residual, selective, selective_gqa, "
                        "selective_residual, cross_layer_share, cross_layer_accumulate), registered variant names, "
                        "or YAML config paths (their attention/layers, with the dims below); vanilla is always added")
    p.add_argument("--backends", type=_list(str), default=["sdpa"],
                   help="comma-separated: auto, triton, xformers, sdpa, math, flex")
    p.add_argument("--seq-lens", type=_list(int), default=[256, 1024], help="comma-separated sequence lengths")
    p.add_argument("--batch", type=_list(int), default=[4], help="comma-separated batch sizes")
    p.add_argument("--mode", type=_list(str), default=["fwdbwd"],
                   help="comma-separated: fwd (forward, no grad), fwdbwd (forward + cross-entropy + backward)")
    p.add_argument("--compile", type=_list(str), default=["off"],
                   help="comma-separated: off (eager), on (the model under torch.compile with inductor, as "
                        "train.compile; compiled by one untimed step first). off,on measures both in one run and "
                        "reports each compiled point's time over its eager twin's")
    p.add_argument("--dim", type=int, default=256, help="model width of the benchmark model")
    p.add_argument("--depth", type=int, default=4, help="transformer blocks")
    p.add_argument("--heads", type=int, default=8, help="query heads per layer")
    p.add_argument("--head-dim", type=int, default=64, help="per-head width, kept when --dim changes (heads x "
                   "head-dim need not equal dim: the projections map between them)")
    p.add_argument("--vocab-size", type=int, default=256, help="tokens in the vocabulary")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps, or auto (cuda when available)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per point (the median is kept)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole sweep in interleaved order and keep each point's median round "
                        "(evens out background load on shared machines)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per point (default: torch's)")
    p.add_argument("--plugins", action="append", default=[], metavar="MOD[,MOD]",
                   help="plug-in modules to import first, so --variants may name the variants they register "
                        "(repeatable; their folder must be importable, e.g. PYTHONPATH=.)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for every point's process, e.g. OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads "
                        "sleep instead of spinning: steadier timings on a shared machine)")
    p.add_argument("--timeout", type=finite_float, default=600.0, help="seconds before a point is recorded as failed")
    p.add_argument("--profile", action="store_true",
                   help="also run one step per point under torch.profiler and write profiles.md (where the time went)")
    p.add_argument("--peer", action="append", default=[], metavar="NAME",
                   help="also measure the equivalent models of NAME (x-transformers) in the same run")
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, results.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_bench)


def cmd_bench(args) -> int:
    from ..bench import BenchSettings, benchmark
    from ..bench.report import markdown
    from ..inference.checkpoints import check_device

    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads: must be >= 1, got {args.threads}")
    if args.timeout <= 0:
        raise UserError(f"--timeout: must be > 0, got {args.timeout}")
    args.out = str(check_output_path("--out", args.out, "folder"))
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env: expected KEY=VALUE, got {item!r}")
        env[key] = value
    check_environment(env, where="--env")  # what the worker processes get: a typo there would be ignored
    args.device = str(check_device(args.device, auto=True))  # auto resolved: the results record the device used
    settings = BenchSettings(
        variants=args.variants, backends=args.backends, seq_lens=args.seq_lens, batches=args.batch, modes=args.mode,
        compiles=args.compile,
        dim=args.dim, depth=args.depth, heads=args.heads, head_dim=args.head_dim, vocab_size=args.vocab_size,
        dtype=args.dtype, device=args.device, repeats=args.repeats, warmup=args.warmup, rounds=args.rounds,
        threads=args.threads, timeout=args.timeout, profile=args.profile, peers=args.peer, env=env,
        plugins=args.plugins)
    command = "attention-zoo " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "attention-zoo bench"
    result = benchmark(settings, args.out, command=command, progress=not args.no_progress)
    failed = [r for r in result["results"] if r["status"] != "ok"]
    written = "results.md, results.json, results.png" + (", profiles.md" if args.profile else "")
    print(table_of(markdown(result)))
    print(f"wrote {args.out}/{written}: {len(result['results'])} points"
          + (f", {len(failed)} failed" if failed else ""))
    for r in failed:
        print(f"  failed: {r['impl']} {r['variant']} {r['backend']} N={r['seq_len']} B={r['batch']} {r['mode']}: {r['reason']}")
    return 0


def table_of(report: str) -> str:
    """results.md's text from its first table on (the tables, and the peer comparison if any): what a terminal
    shows; the file also keeps the command and the machine."""
    lines = report.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    return "\n".join(lines[first:])
