"""`train`: train a model from a YAML config, on one process or, under torchrun, many."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import config_file, load_config
from ..errors import UserError
from ..paths import check_output_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a config (torchrun for several processes)",
                       description="Train from CONFIG; KEY.PATH=VALUE overrides any key, e.g. train.steps=200. "
                       "Writes OUT/metrics.jsonl, OUT/checkpoint/ and OUT/final.json.")
    p.add_argument("config", help="YAML config (model, data, train sections), or a checkpoint folder (its config.yaml, "
                   "e.g. one import-hf wrote, fine-tuned with train.init_from=FOLDER)")
    p.add_argument("overrides", nargs="*", help="KEY.PATH=VALUE overrides, e.g. train.lr=3e-4 model.depth=6")
    p.add_argument("--out", help="run folder (default runs/<config name>; with --resume and a run folder as CONFIG, that "
                   "folder)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (start fresh if there is none)")
    p.add_argument("--stop-after", type=int, metavar="STEP",
                   help="checkpoint after STEP and exit, as if the run were killed there (resume with --resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_train)


def cmd_train(args) -> int:
    from ..train import train
    from ..train.loop import holds_run

    if args.stop_after is not None and args.stop_after < 1:
        raise UserError(f"--stop-after {args.stop_after}: must be a step >= 1 (the run checkpoints after it and exits)")
    path = Path(args.config)
    config = load_config(config_file(args.config), args.overrides)  # a run or checkpoint folder: its saved config
    if args.out is None and args.resume and path.is_dir() and holds_run(path):  # `train RUN --resume`: RUN itself
        out = str(path)
    else:
        out = args.out or str(Path("runs") / (path.name if path.is_dir() else path.stem))
    out = str(check_output_path("--out", out, "folder"))
    if hint := busy_cpu_hint(config["train"]["device"]):
        print(hint)
    train(config, out, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress)
    return 0


def busy_cpu_hint(device: str) -> str | None:
    """A line for a CPU run on a machine already busy (1-minute load average at least the core count) while
    OMP_WAIT_POLICY is unset: torch's OpenMP threads then wait by spinning, which made a quickstart step 20x
    slower on 2 shared cores (docs/training.md, "CPU threads"). `ablate` sets PASSIVE for its runs; a lone
    `train` leaves the choice to the user (PASSIVE costs ~1.2x on a quiet machine), so it only says so."""
    import os

    if device not in ("cpu", "auto") or "OMP_WAIT_POLICY" in os.environ or not hasattr(os, "getloadavg"):
        return None
    import torch

    if device == "auto" and torch.cuda.is_available():
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load < cores:
        return None
    return (f"attention-zoo train: this CPU is busy (load {load:.1f} on {cores} cores): torch's threads wait by "
            "spinning and may run many times slower; OMP_WAIT_POLICY=PASSIVE attention-zoo train ... avoids it "
            "(docs/training.md, CPU threads)")
