"""`eval`: metrics of a checkpoint on a split of its own data or of other data."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..env import say_if_cpu_is_busy
from ..errors import UserError
from ..paths import check_output_path

if TYPE_CHECKING:  # imported where used: the parser is built without torch
    from ..config import Problem


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (loss, bits per byte, task accuracy)",
                       description="Evaluate CHECKPOINT (a run folder or its checkpoint/ folder) on the data it was "
                       "trained on, or on --data.")
    p.add_argument("checkpoint", help="checkpoint folder, or a run folder holding checkpoint/")
    p.add_argument("--data", nargs="+", action="extend", default=[], metavar="YAML|KEY=VALUE",
                   help="other data: a YAML file (its data: section, or the mapping itself) and/or KEY=VALUE items, "
                   "e.g. --data name=variable_assignment num_vars=4")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--batches", type=int, help="evaluation batches (default: the run's train.eval_batches)")
    p.add_argument("--batch-size", type=int, help="sequences per batch (default: the run's)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--json", metavar="PATH", help="also write the metrics to this JSON file (atomically)")
    p.set_defaults(run=cmd_eval)


def data_spec(items: list[str], base: dict) -> dict:
    """`--data` items on top of `base`: a YAML file replaces the spec, KEY=VALUE items edit it. Items that switch
    to another dataset (`name=...`, or `text=...` alone) drop the keys of the old one that the new one does not
    read: the run's `text` is no key of variable_assignment."""
    from ..config import ConfigError, Problem, apply_override, read_yaml_chain
    from ..data import DEFAULT_DATASET
    from ..data.base import DATASET_KEYS

    spec, problems, given = dict(base), [], set()
    for item in items:
        if "=" in item:
            if item.startswith("data."):  # the items are the data section's own keys
                problems.append(Problem("--data", item.split("=", 1)[0], item.split("=", 1)[1], "items are keys of the "
                                        f"data section: write {item.removeprefix('data.')}"))
                continue
            if (p := apply_override(spec, item, "--data")) is not None:
                problems.append(p)
            given.add(item.split("=", 1)[0].strip().split(".")[0])
            continue
        path = Path(item)
        if not path.is_file():
            problems.append(Problem("--data", "(file)", item, "no such YAML file; give a file or KEY=VALUE items"))
            continue
        # as train reads a config: its base: chain, a relative data.text beside the file that sets it
        loaded, unreadable = read_yaml_chain(path.resolve(), names=(item,))
        problems += unreadable
        spec = dict(loaded.get("data", loaded) if isinstance(loaded, dict) else {})
        base, given = spec, set()
    if problems:
        raise ConfigError(problems)
    if "text" in given and "name" not in given:
        spec["name"] = "text"
    name_of = lambda s: s.get("name", "text" if "text" in s else DEFAULT_DATASET)  # noqa: E731
    if name_of(spec) != name_of(base) and name_of(spec) in DATASET_KEYS:
        spec = {k: v for k, v in spec.items() if k in given or k in DATASET_KEYS[name_of(spec)]}
    return spec


def cmd_eval(args) -> int:
    import torch

    from ..checkpoint import atomic_write_text, load_model, resolve_checkpoint
    from ..config import ConfigError, load_config
    from ..data import build_dataset
    from ..inference.checkpoints import check_device, check_finite_weights
    from ..train import evaluate, plan_run
    from ..train.distributed import local_device
    from ..train.loop import CHECKPOINT_DIR, TOKENS, autocast_context, holds_run

    for flag, value in (("--batches", args.batches), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value is not None and value < 1:  # None: the run's own value
            raise UserError(f"{flag} {value}: must be >= 1 (leave it out for the run's own value)")
    if args.json is not None:  # "" too: refused, not taken for "no file"
        args.json = str(check_output_path("--json", args.json, "file"))
    path = resolve_checkpoint(args.checkpoint)
    if args.json is not None:
        _refuse_writing_into_the_checkpoint(Path(args.json), path)
    device = local_device(str(check_device(args.device, auto=True)))
    say_if_cpu_is_busy("eval", args.device)
    model = load_model(path, map_location=device)
    check_finite_weights(model, path)
    saved = model.config
    raw = {k: v for k, v in saved.items()}
    raw["data"] = data_spec(args.data, saved.get("data") or {}) if args.data else saved.get("data")
    train = dict(saved["train"])
    for key, value in (("eval_batch_size", args.batch_size), ("seq_len", args.seq_len)):
        if value is not None:
            train[key] = value
    raw["train"] = train
    label = f"{path / 'config.yaml'}" + (" with --data" if args.data else "")
    try:
        config = load_config(raw)
        config.source = label
        # a run's tokenized corpora (data.tokenizer) are cached in the run folder: reuse its token files, and
        # cache what it lacks there; a checkpoint folder of no run (a copy, import-hf's) is only read
        in_run = path.name == CHECKPOINT_DIR and holds_run(path.parent)
        run_folder = path.parent if in_run else path
        dataset = build_dataset(config["data"], source=label, cache_dir=run_folder / TOKENS, write_cache=in_run)
        if args.data and args.seq_len is None and dataset.fixed_seq_len:  # a task's examples set their own length;
            config["train"]["seq_len"] = None  # a corpus is read at the length the run trained at
        plan = plan_run(config, dataset=dataset)
    except ConfigError as exc:
        problems = [p for p in exc.problems if _split_named(p) in (None, args.split)]  # eval reads one split
        if not problems:
            problems = exc.problems
        raise ConfigError([_named_by_flag(problem, label, args) for problem in problems]) from None
    batches = train["eval_batches"] if args.batches is None else args.batches
    with torch.no_grad():
        metrics = evaluate(model, plan.dataset, args.split, plan.eval_batch_size, plan.seq_len, batches, device,
                           autocast_context(train, device))
    if not math.isfinite(metrics["loss"]):  # json would print NaN, which is not JSON, and exit 0
        raise UserError(f"{path}: the {args.split} loss is {metrics['loss']}: the model's logits are not all finite "
                        f"numbers (an overflow in low precision: try train.precision=float32)")
    result = {"checkpoint": str(path), "dataset": plan.dataset.name, "split": args.split, "seq_len": plan.seq_len, **metrics}
    print(json.dumps(result, indent=2))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


def _refuse_writing_into_the_checkpoint(target: Path, checkpoint: Path) -> None:
    """UserError when --json lies in the checkpoint folder being evaluated, or is a record of its run
    (config.yaml, metrics.jsonl, final.json): `eval run --json run/checkpoint/model.safetensors` replaced the
    weights by the metrics, and the checkpoint no longer loaded."""
    from ..train.loop import CHECKPOINT_DIR, CONFIG, FINAL, METRICS, holds_run

    target, folder = target.resolve(), checkpoint.resolve()
    run = folder.parent if folder.name == CHECKPOINT_DIR and holds_run(folder.parent) else None
    if target == folder or folder in target.parents:
        what = f"inside the checkpoint folder {checkpoint}, which holds only what the checkpoint is made of"
    elif run is not None and target in {run / name for name in (CONFIG, METRICS, FINAL)}:
        what = f"the run's own {target.name}"
    else:
        return
    beside = (run or folder.parent) / "eval.json"
    raise UserError(f"--json {target}: {what}; writing the metrics there would destroy it: give another path, "
                    f"e.g. {beside}")


def _split_named(problem: Problem) -> str | None:
    """The split a "split shorter than one window" problem (train.loop.ShortSplit) is about, else None. plan_run
    checks every split, as training reads them all; eval reads only --split, so a short train split is no reason to
    refuse it."""
    from ..train.loop import ShortSplit

    return problem.split if isinstance(problem, ShortSplit) else None


def _named_by_flag(problem: Problem, label: str, args) -> Problem:
    """A problem with a value eval's flags set is named by the flag, not by the checkpoint's train section
    (`--seq-len 64: longer than model.max_seq_len (32)`, not the checkpoint's train.seq_len)."""
    problem.source = label
    flags = {"train.seq_len": ("--seq-len", args.seq_len), "train.eval_batch_size": ("--batch-size", args.batch_size)}
    if problem.path == "data" and args.data:  # the --data dataset's examples do not fit this model
        problem.source, problem.path = f"eval of {label}", "--data"
        problem.message = problem.message.replace(" or raise model.max_seq_len", "")
    if args.seq_len is not None and _split_named(problem):  # `--seq-len 10000000` on a rope model: the split is short
        problem.source, problem.path, problem.value = f"eval of {label}", "--seq-len", args.seq_len
        problem.message = (problem.message.replace(f"train.seq_len = {args.seq_len}", "--seq-len")
                           .replace("give more text or lower train.seq_len", "give a shorter --seq-len"))
    flag, value = flags.get(problem.path, (None, None))
    if value is not None:
        problem.source, problem.path = f"eval of {label}", flag
        problem.message = problem.message.replace(
            "raise model.max_seq_len", "give a shorter --seq-len (`attention-zoo stream` measures the loss past the "
            "training length)")
    return problem
