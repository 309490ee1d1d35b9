"""`ablate`: run a sweep file (base config x grid x named runs x seeds) and summarise it."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..paths import check_output_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="run a sweep of configs and seeds; table and plots of the results",
                       description="Run every run of SWEEP (skipping finished ones) and write OUT/results.jsonl, "
                       "results.csv, results.md, curves.png and final.png.")
    p.add_argument("sweep", help="sweep YAML: base, grid, runs, seeds, metric")
    p.add_argument("--out", help="output folder (default runs/<sweep name>)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a key of every run, e.g. --set train.steps=50 (repeatable)")
    p.add_argument("--seeds", type=_seed_list, metavar="S[,S...]",
                   help="only these of the sweep's seeds, e.g. --seeds 0 to see every run once before the rest")
    p.add_argument("--dry-run", action="store_true", help="validate every run's config and list the runs; train nothing")
    p.add_argument("--summarize", action="store_true", help="only rebuild the table and plots from results.jsonl")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar and no estimate of the time left (the bar shows only on a terminal anyway)")
    p.set_defaults(run=cmd_ablate)


def _seed_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 0,1; got {text!r}") from None


def cmd_ablate(args) -> int:
    from ..ablate import read_sweep_file, run_sweep, write_summaries
    from ..ablate.records import current_records, read_records
    from ..ablate.runner import run_dir_for

    sweep = read_sweep_file(args.sweep, args.sets)  # every run's config is validated here, before any training
    if args.seeds is not None:
        sweep = sweep.only_seeds(args.seeds)
    out = check_output_path("--out", args.out or Path("runs") / Path(args.sweep).stem, "folder")
    if args.dry_run:
        print(f"{args.sweep}: {len(sweep.runs)} runs, all configs valid; metric {sweep.metric}")
        for run in sweep.runs:
            print(f"  {run.label} (seed {run.seed}) -> {run_dir_for(out, run)}")
        return 0
    if args.summarize:
        records = current_records(read_records(out), sweep.runs) if out.is_dir() else []
        if not records:
            raise UserError(f"--summarize: {out} holds no finished run of this sweep (results.jsonl); run the sweep "
                            "first, or give its --out and the same --set options it ran with (they change the runs)")
        print(write_summaries(out, sweep, records))
        return 0
    return 1 if run_sweep(sweep, out, progress=False if args.no_progress else None) else 0
