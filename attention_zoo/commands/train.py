"""`train`: train a model from a YAML config, on one process or, under torchrun, many."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..env import say_if_cpu_is_busy
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
    from ..config import config_file, load_config
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
    say_if_cpu_is_busy("train", config["train"]["device"])
    train(config, out, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress)
    return 0
