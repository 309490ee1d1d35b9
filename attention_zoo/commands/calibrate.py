"""`calibrate`: per-layer pruning budgets that keep validation loss within a tolerance of the unpruned
model, the KV-memory ratio they give, and the sliding-window baseline at the same memory."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..env import say_if_cpu_is_busy
from ..errors import UserError
from ..numbers import finite_float
from ..paths import check_output_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="search context-pruning budgets within a loss tolerance",
                       description="Search per-layer budgets K_l (keys kept per layer) that keep the streamed "
                       "validation loss within --tolerance of the unpruned model; report the KV-memory ratio "
                       "(L * N) / sum K_l beside a sliding window of the same memory. Writes OUT/calibration.json "
                       "and OUT/calibration.png.")
    p.add_argument("checkpoint", help="checkpoint folder, or a run folder holding checkpoint/")
    p.add_argument("--tolerance", type=finite_float, default=0.01, help="relative loss increase allowed (0.01 = 1%%)")
    p.add_argument("--context", type=int,
                   help="tokens per evaluation sequence (default model.max_seq_len; a task's: its example length)")
    p.add_argument("--batches", type=int, default=2, help="evaluation batches (default 2)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default 4)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="data to calibrate on (default val)")
    p.add_argument("--check-split", choices=["none", "train", "val", "test"],
                   help="re-measure the calibrated budgets and the window on other sequences, a split other than "
                   "--split (default test; val when --split is test)")
    p.add_argument("--threshold", type=finite_float, default=1.0, help="also report threshold:TAU pruning (0 = skip)")
    p.add_argument("--no-curve", action="store_true", help="skip the uniform-budget curve for the plot")
    p.add_argument("--measure", nargs="+", metavar="POLICY", help="no search: just measure these pruning policies "
                   "(e.g. budget:32 window:32) against the unpruned model on --split; writes OUT/measure-SPLIT.json")
    p.add_argument("--out", help="output folder (default: calibration/ beside the checkpoint)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_calibrate)


def cmd_calibrate(args) -> int:
    from ..data import build_dataset
    from ..figures import save_report_and_figure
    from ..inference.calibration import calibrate, check_tolerance
    from ..inference.calibration_plot import plot_calibration
    from ..inference.checkpoints import checkpoint_label, load_for_inference
    from ..inference.journal import Journal, fingerprint

    for name in ("batches", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.check_split is None:
        args.check_split = "val" if args.split == "test" else "test"
    elif args.check_split == args.split and not args.measure:  # the same sequences: it reported them as "held out"
        raise UserError(f"--check-split {args.check_split}: the same split as --split, so nothing would be held out "
                        f"(the same sequences, the same losses); give another split, or none")
    check_tolerance(args.tolerance)  # before any work, and with --measure too (it was taken and ignored there)
    if args.threshold < 0:
        raise UserError(f"--threshold {args.threshold}: must be > 0, or 0 to skip")
    if args.out:  # before any work; the default (beside the checkpoint) is checked once the checkpoint is found
        args.out = str(check_output_path("--out", args.out, "folder"))
    model, path = load_for_inference(args.checkpoint, args.device)
    say_if_cpu_is_busy("calibrate", args.device)
    dataset = build_dataset(model.config.get("data"), source=str(path / "config.yaml"))
    fixed = dataset.fixed_seq_len  # a task's examples: one per sequence, padded to the context
    default = fixed or model.max_seq_len
    context = default if args.context is None else args.context  # 0 is refused below, not the default
    if context < 4 or model.max_positions is not None and context > model.max_positions:
        limit = f"between 4 and model.max_seq_len ({model.max_positions}; learned positions)" if model.max_positions else ">= 4"
        raise UserError(f"--context {context}: must be {limit}")
    if fixed and context != fixed:  # past the example only padding streams: the memory ratio counted it as context
        raise UserError(f"--context {context}: dataset {dataset.name!r} has examples of {fixed} tokens, one per "
                        f"sequence: " + ("a shorter context cuts them" if context < fixed else "a longer context only "
                        "streams padding, which the KV-memory ratio would count as context") +
                        f"; give --context {fixed} (the default for this dataset)")
    batches = _sequences(dataset, args.split, args, context, "--split")
    out = Path(args.out) if args.out else check_output_path("--out", path.parent / "calibration", "folder")
    if args.measure:
        return measure(model, batches, args, context, out, path, dataset.name)
    check = None
    if args.check_split != "none":
        check = _sequences(dataset, args.check_split, args, context, "--check-split")
    # every evaluation journaled as it finishes: an interrupted calibration resumes where it stopped
    journal = Journal(out / "calibration.partial.jsonl", fingerprint(model, batches + (check or []), context=context),
                      say=print)
    report = calibrate(model, batches, context=context, tolerance=args.tolerance, progress=not args.no_progress,
                       curve=not args.no_curve, threshold=args.threshold or None, check_batches=check,
                       journal=journal)
    report = {"checkpoint": str(path), "dataset": dataset.name, "split": args.split,
              "check_split": None if check is None else args.check_split, **report}
    # an interrupt between the two files must not leave this run's JSON beside an earlier run's figure
    save_report_and_figure(out / "calibration.json", json.dumps(report, indent=2) + "\n", out / "calibration.png",
                           lambda png: plot_calibration(report, png,
                                                        title=f"{checkpoint_label(path)}: context pruning at {context}"))
    journal.close()

    best, window = report["calibrated"], report["window_same_memory"]
    print(f"unpruned {args.split} loss {report['base_loss']:.4f} (tolerance {args.tolerance:.2%}: <= "
          f"{report['target_loss']:.4f}), {report['sequences']} sequences of {context}")
    print(f"calibrated budgets K_l: {', '.join(map(str, best['budgets']))}: loss {best['loss']:.4f} "
          f"({best['relative_increase']:+.2%}), KV memory {best['memory_ratio']:.1f}x less")
    print(f"sliding window, same memory: loss {window['loss']:.4f} ({window['relative_increase']:+.2%})")
    if report["threshold"]:
        t = report["threshold"]
        print(f"{t['policy']}: loss {t['loss']:.4f} ({t['relative_increase']:+.2%}), KV memory {t['memory_ratio']:.1f}x "
              f"less; {kept(t)}")
    if report["held_out"]:
        h = report["held_out"]
        print(f"held out ({args.check_split}): calibrated {h['calibrated_relative_increase']:+.2%}, "
              f"window {h['window_relative_increase']:+.2%} vs unpruned {h['base_loss']:.4f}")
    print(f"wrote {out / 'calibration.json'} and {out / 'calibration.png'}")
    return 0


def _sequences(dataset, split: str, args, context: int, flag: str) -> list:
    """The evaluation batches of `split`; UserError naming --context when the split is shorter than one sequence
    (the dataset's ValueError was a traceback: `calibrate --context 10000000` on a rope model)."""
    try:
        return list(dataset.eval_batches(split, args.batch_size, context, args.batches))
    except ValueError as exc:
        raise UserError(f"--context {context} ({flag} {split}): {exc}") from None


def kept(row: dict) -> str:
    """Keys held per layer, at most and on average over the stream, as a report row has them."""
    return (f"keys kept per layer at most {', '.join(map(str, row['peak_kept']))}, on average "
            f"{', '.join(f'{k:.1f}' for k in row['mean_kept'])}")


def measure(model, batches, args, context: int, out: Path, path: Path, dataset: str) -> int:
    """Streamed loss of each --measure policy beside the unpruned model, on the same sequences."""
    from ..checkpoint import atomic_write_text
    from ..inference import Pruner, parse_prune_spec, streaming_loss
    from ..inference.journal import Journal, fingerprint

    # every spec checked before any work
    pruners = [Pruner(model, parse_prune_spec(spec, f"--measure {spec!r}"), f"--measure {spec!r}") for spec in args.measure]
    journal = Journal(out / f"measure-{args.split}.partial.jsonl",
                      fingerprint(model, batches, context=context), say=print)
    base = journal.get("unpruned", lambda: streaming_loss(model, batches)).loss
    depth = len(model.blocks)
    rows = []
    print(f"unpruned {args.split} loss {base:.4f}, {sum(b.inputs.shape[0] for b in batches)} sequences of {context}")
    for spec, pruner in zip(args.measure, pruners):
        measured = lambda pruner=pruner: streaming_loss(model, batches, pruner, progress=not args.no_progress)  # noqa: E731
        result = journal.get(pruner.policy.spec(), measured)
        # the memory to provision is the most keys a layer held (a budget's K; a threshold's varies): the mean over a
        # stream that starts from one token is lower for any policy, unpruned included ((N + 1) / 2)
        ratio = depth * context / sum(result.peak_kept)
        row = {"policy": spec, "loss": result.loss, "relative_increase": result.loss / base - 1,
               "memory_ratio": ratio, "mean_kept": result.mean_kept, "peak_kept": result.peak_kept}
        rows.append(row)
        print(f"{spec}: loss {result.loss:.4f} ({result.loss / base - 1:+.2%}), KV memory {ratio:.1f}x less; "
              f"{kept(row)}")
    report = {"checkpoint": str(path), "dataset": dataset, "split": args.split, "context": context, "base_loss": base,
              "sequences": sum(b.inputs.shape[0] for b in batches), "policies": rows}
    atomic_write_text(out / f"measure-{args.split}.json", json.dumps(report, indent=2) + "\n")
    journal.close()
    print(f"wrote {out / f'measure-{args.split}.json'}")
    return 0
