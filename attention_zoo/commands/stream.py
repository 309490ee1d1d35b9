"""`stream`: held-out text streamed token by token far past the training length through (pruned) KV
caches; the loss and the keys held at every position, for several models and pruning policies at once."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..env import say_if_cpu_is_busy
from ..errors import UserError
from ..paths import check_output_path

ENTRY_FORM = "CHECKPOINT or CHECKPOINT=POLICY (POLICY: budget:K, window:K, threshold:TAU, or none)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stream", help="stream text past the training length through pruned caches: loss and KV memory "
                       "against position",
                       description="Feed the same held-out sequences, one token at a time, through each model and its "
                       "pruning policy (budget:K and threshold:TAU prune by selection, window:K keeps BOS and the "
                       "K - 1 latest keys, none keeps every key), and record the loss and the keys held at every "
                       "position. Writes OUT/stream.json and OUT/stream.png.")
    p.add_argument("entries", nargs="+", metavar="CHECKPOINT[=POLICY]",
                   help="a checkpoint or run folder, with the pruning policy to stream it with (default none)")
    p.add_argument("--length", type=int, required=True, help="tokens per sequence (e.g. 8 x model.max_seq_len)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="data to stream (default test)")
    p.add_argument("--batches", type=int, default=1, help="batches of sequences (default 1)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default 4)")
    p.add_argument("--bucket", type=int, help="positions averaged per point of the loss curve (default length / 32)")
    p.add_argument("--out", required=True, help="output folder for stream.json and stream.png")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_stream)


def parse_entry(text: str) -> tuple[str, str]:
    """'runs/a=budget:32' -> ('runs/a', 'budget:32'); 'runs/a' -> ('runs/a', 'none')."""
    path, sep, policy = text.partition("=")
    if not path or (sep and not policy):
        raise UserError(f"{text!r}: expected {ENTRY_FORM}")
    return path, policy or "none"


def bucket_means(values: list[float], size: int) -> list[float]:
    """Means of consecutive runs of `size` values (the last run may be shorter), NaN-free runs only."""
    out = []
    for start in range(0, len(values), size):
        run = [v for v in values[start:start + size] if not math.isnan(v)]
        out.append(sum(run) / len(run) if run else float("nan"))
    return out


def entry_labels(runs: list[tuple], checkpoint_label) -> list[str]:
    """`RUN POLICY` per entry (runs: (path as given, policy, model, checkpoint folder, pruner)), the path as given
    where two checkpoints share a run name (a/run and b/run made one legend entry of two curves). Raises
    UserError for two entries naming the same checkpoint (however written) with the same policy."""
    seen: dict[tuple[Path, str], str] = {}
    for path_text, policy, _, path, pruner in runs:
        key = (path.resolve(), "none" if pruner is None else pruner.policy.spec())
        if key in seen:
            raise UserError(f"'{seen[key]}' and '{path_text}={policy}' stream the same checkpoint with the same "
                            "policy; list it once")
        seen[key] = f"{path_text}={policy}"
    short = [checkpoint_label(path) for _, _, _, path, _ in runs]
    folders: dict[str, set[Path]] = {}
    for name, (_, _, _, path, _) in zip(short, runs):
        folders.setdefault(name, set()).add(path.resolve())
    return [f"{name if len(folders[name]) == 1 else path_text} {policy}"
            for name, (path_text, policy, _, _, _) in zip(short, runs)]


def cmd_stream(args) -> int:
    from ..data import build_dataset
    from ..figures import save_report_and_figure
    from ..inference import Pruner, parse_prune_spec, streaming_loss
    from ..inference.checkpoints import checkpoint_label, load_for_inference
    from ..inference.stream_plot import plot_stream

    args.out = str(check_output_path("--out", args.out, "folder"))
    for name in ("length", "batches", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    bucket = max(1, args.length // 32) if args.bucket is None else args.bucket
    if bucket < 1:
        raise UserError(f"--bucket {bucket}: must be >= 1")
    entries = [(*parse_entry(text), text) for text in args.entries]
    loaded = {}  # a checkpoint named with several policies is loaded once
    runs = []  # every model loaded and every policy checked before any streaming
    for path_text, policy, text in entries:
        if path_text not in loaded:
            loaded[path_text] = load_for_inference(path_text, args.device)
        model, path = loaded[path_text]
        if model.max_positions is not None and args.length > model.max_positions:
            raise UserError(f"{path_text}: --length {args.length} is past model.max_seq_len ({model.max_positions}) "
                            "of a model with learned positions; rope or none positions stream past it")
        where = f"argument {text!r}"
        pruner = None if policy == "none" else Pruner(model, parse_prune_spec(policy, where), where)
        runs.append((path_text, policy, model, path, pruner))
    labels = entry_labels(runs, checkpoint_label)
    say_if_cpu_is_busy("stream", args.device)
    datas = {json.dumps(run[2].config.get("data"), sort_keys=True) for run in runs}
    if len(datas) > 1:
        raise UserError("the checkpoints were trained on different data sections; stream models of one dataset together")
    first_path = runs[0][3]
    dataset = build_dataset(runs[0][2].config.get("data"), source=str(first_path / "config.yaml"))
    if dataset.fixed_seq_len and args.length > dataset.fixed_seq_len:  # shorter: eval_batches names the length needed
        raise UserError(f"--length {args.length}: dataset {dataset.name!r} has examples of {dataset.fixed_seq_len} "
                        "tokens, one per sequence: past them only padding would stream (no loss, yet counted in the "
                        f"keys held); give --length {dataset.fixed_seq_len}")
    try:
        batches = list(dataset.eval_batches(args.split, args.batch_size, args.length, args.batches))
    except ValueError as exc:  # the split is shorter than one sequence
        raise UserError(f"--length {args.length}: {exc}") from None
    rows = []
    for (_, policy, model, path, pruner), label in zip(runs, labels):
        result = streaming_loss(model, batches, pruner, progress=not args.no_progress, track_positions=True)
        train_len = model.max_seq_len
        inside = [v for v in result.position_loss[:train_len] if not math.isnan(v)]
        past = [v for v in result.position_loss[train_len:] if not math.isnan(v)]
        row = {"checkpoint": str(path), "label": label, "policy": policy,
               "train_length": train_len, "loss": result.loss,
               "loss_within_train_length": sum(inside) / len(inside) if inside else None,
               "loss_past_train_length": sum(past) / len(past) if past else None,
               "peak_keys": max(result.position_keys), "final_keys": result.position_keys[-1],
               "bucket": bucket, "bucket_loss": bucket_means(result.position_loss, bucket),
               "position_keys": result.position_keys}
        rows.append(row)
        past_text = "-" if row["loss_past_train_length"] is None else f"{row['loss_past_train_length']:.4f}"
        print(f"{row['label']}: loss {result.loss:.4f} nats/token (within {train_len}: "
              f"{row['loss_within_train_length']:.4f}, past it: {past_text}), keys held (all layers) at the end "
              f"{row['final_keys']}, at most {row['peak_keys']}")
    report = {"dataset": dataset.name, "split": args.split, "length": args.length,
              "sequences": sum(b.inputs.shape[0] for b in batches), "entries": rows}
    out = Path(args.out)
    # an interrupt between the two files must not leave this run's JSON beside an earlier run's figure
    save_report_and_figure(out / "stream.json", json.dumps(report, indent=2) + "\n", out / "stream.png",
                           lambda png: plot_stream(report, png))
    print(f"wrote {out / 'stream.json'} and {out / 'stream.png'}")
    return 0
