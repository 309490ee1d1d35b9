"""The train loop: one config in, a run folder out.

    out/
      config.yaml      the validated config (defaults filled in)
      metrics.jsonl    {"kind": "train"|"val", "step": ..., ...}, appended as the run goes
      checkpoint/      the latest checkpoint (checkpoint.save_checkpoint: atomic folder)
      final.json       summary of a finished run (written atomically, last)
      events.out.tfevents.*   with train.tensorboard: true, the metrics.jsonl records as TensorBoard scalars

Determinism: weight init, dropout and the batch sampler are seeded from `train.seed`, and a
checkpoint holds every RNG state (the sampler's generator included), so a run stopped after step k and
resumed ends with exactly the loss of an uninterrupted one on CPU.

Batches: each optimizer step draws one global batch of `train.batch_size` rows from the sampler's
generator; a process keeps its rows (distributed.rank_rows) and splits them into `grad_accum`
micro-batches. The loss is normalised by the scored tokens of the *global* batch, so the gradient
does not depend on how the batch was split over processes or accumulation steps.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..checkpoint import (
    STATE,
    WEIGHTS,
    atomic_write_text,
    load_saved_config,
    load_training_state,
    load_weights,
    read_saved_config,
    save_checkpoint,
    with_legacy_stack,
)
from ..config import Config, ConfigError, Problem, build_model, load_config, resolved_layers, seq_len_problem
from ..data import IGNORE_INDEX, Dataset, build_dataset
from ..dry_run import dry_run, plugin_failures_reported
from ..errors import UserError
from ..model import own_attention_note
from ..numbers import SEED_MAX
from . import distributed as D
from .aux_losses import get_aux_loss
from .execution import compile_model, enable_activation_checkpointing
from .metrics import MetricsLog, evaluate, token_losses
from .optim import build_optimizer, build_schedule
from .tensorboard import TensorBoardLog

CHECKPOINT_DIR, METRICS, FINAL, CONFIG = "checkpoint", "metrics.jsonl", "final.json", "config.yaml"
TOKENS = "tokens"  # tokenized corpora's cached token files (data.tokenizer), reused by eval


@dataclass
class RunPlan:
    """What a config resolves to once the data is known."""

    dataset: Dataset
    seq_len: int
    eval_batch_size: int


def plan_run(config: Config, world: D.World = D.World(), dataset: Dataset | None = None,
             cache_dir: str | Path | None = None, write_cache: bool = True) -> RunPlan:
    """Build the dataset and check what needs model, data and process count together. Raises
    ConfigError (every problem at once) or DataError. cache_dir: where tokenized corpora keep their
    token files (data.tokenizer), e.g. OUT/tokens; with write_cache False, new ones are written only by
    `plan.dataset.write_cache()`."""
    train, model = config["train"], config["model"]
    dataset = dataset or build_dataset(config["data"], source=config.source, cache_dir=cache_dir,
                                       write_cache=write_cache)
    seq_len = train["seq_len"] or dataset.fixed_seq_len or model["max_seq_len"]
    problems = []
    if seq_len > model["max_seq_len"] and not train["seq_len"] and dataset.fixed_seq_len:  # the examples' own length
        problems.append(Problem(config.source, "data", dict(config["data"]), f"its examples are {seq_len} tokens, "
                                f"longer than model.max_seq_len ({model['max_seq_len']}); shorten them (fewer "
                                "assignments or queries) or raise model.max_seq_len"))
    elif (problem := seq_len_problem(config.source, seq_len, model["max_seq_len"])) is not None:
        problems.append(problem)  # load_config reports it too, when other keys are wrong (seq_len is set then)
    if dataset.fixed_seq_len and seq_len < dataset.fixed_seq_len:
        problems.append(Problem(config.source, "train.seq_len", seq_len, f"dataset {dataset.name!r} needs at least "
                                f"{dataset.fixed_seq_len} (one example); raise it or shorten the examples"))
    if model["vocab_size"] < dataset.vocab_size:
        problems.append(Problem(config.source, "model.vocab_size", model["vocab_size"],
                                f"dataset {dataset.name!r} has {dataset.vocab_size} tokens"))
    problems += _split_length_problems(config, dataset, seq_len)
    if train["batch_size"] % (world.size * train["grad_accum"]):
        problems.append(Problem(config.source, "train.batch_size", train["batch_size"],
                                f"must be divisible by processes x grad_accum = {world.size} x {train['grad_accum']}"))
    if problems:
        raise ConfigError(problems)
    return RunPlan(dataset, seq_len, train["eval_batch_size"] or train["batch_size"])


@dataclass
class ShortSplit(Problem):
    """The problem of a split shorter than one window, with the split it is about: a command that reads only some
    splits (eval) tells which of plan_run's problems concern it by this type, not by the message's wording."""

    split: str


def _split_length_problems(config: Config, dataset: Dataset, seq_len: int) -> list[Problem]:
    """A corpus split shorter than one window (seq_len tokens and the next one) cannot be sampled or
    evaluated: found here, before anything is written or trained, for every split (one ShortSplit each)."""
    data = config.get("data") or {}
    key = "data.text" if "text" in data else "data.name" if "name" in data else "data"
    value = data.get("text", data.get("name", data))
    how = (f"train.seq_len = {seq_len}" if config["train"]["seq_len"]
           else f"seq_len {seq_len} (train.seq_len is null: model.max_seq_len)")
    problems = []
    for split in dataset.splits:
        n = dataset.num_tokens(split)
        if n is not None and n < seq_len + 1:
            problems.append(ShortSplit(config.source, key, value, f"split {split!r} of dataset {dataset.name!r} has "
                                       f"{n} tokens, fewer than one window of {how} plus the next token ({seq_len + 1}); "
                                       "give more text or lower train.seq_len", split))
    return problems


def autocast_context(train: dict, device: torch.device) -> contextlib.AbstractContextManager:
    bf16 = train["precision"] == "bfloat16" or (train["precision"] == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _peak_memory_mb(device: torch.device) -> float:
    """GPU: peak memory allocated by tensors. CPU: the process's peak resident memory (ru_maxrss, KiB on
    Linux), which includes the Python and torch runtime."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rng_state(generator: torch.Generator, world: D.World) -> dict[str, Any]:
    local = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None}
    return {"data": generator.get_state(), "per_rank": D.gather_objects(local, world)}


def _restore_rng(state: dict[str, Any], generator: torch.Generator, world: D.World) -> None:
    generator.set_state(state["data"])
    per_rank = state["per_rank"]
    if world.rank < len(per_rank):  # resumed on more processes than saved: new ranks keep their seeds
        mine = per_rank[world.rank]
        torch.set_rng_state(mine["torch"])
        random.setstate(mine["python"])
        if mine["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda"])


def holds_run(folder: Path) -> bool:
    """Whether `folder` holds a training run: its checkpoint/ or its metrics.jsonl (which a run writes first,
    before its config.yaml, so a run killed before its first log is one too)."""
    return (folder / CHECKPOINT_DIR).exists() or (folder / METRICS).exists()


def _hold_out_dir(out: Path, world: D.World, closing: contextlib.ExitStack) -> None:
    """Hold an exclusive lock on the run folder until the run ends (`closing` releases it), so that a second
    `train` into the same --out is refused rather than interleaving its metrics and checkpoints with this
    run's: one started while this run still builds its model (nothing written yet), or a second --resume of a
    run still training. Raises UserError on every rank when another process holds the folder. The folder (and
    any missing parent) is created to be locked; what was created is removed again at exit if it is still
    empty, so a refused run leaves nothing behind. Rank 0 locks; where the file system cannot lock (no fcntl,
    some network file systems), the run goes ahead unlocked."""
    refusal = None
    if world.is_main:
        created = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
        out.mkdir(parents=True, exist_ok=True)
        closing.callback(_remove_empty_folders, created)  # registered first, so it runs after the unlock
        refusal = _lock_folder(out, closing)
    refusal = D.gather_objects(refusal, world)[0]
    if refusal is not None:
        raise UserError(refusal)


def _lock_folder(folder: Path, closing: contextlib.ExitStack) -> str | None:
    """flock `folder` (held until `closing` exits); why not when another process holds it, else None."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    closing.callback(os.close, fd)  # closing the descriptor releases the lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return (f"{folder}: another `attention-zoo train` is writing into this folder right now; wait until it "
                "ends (then --resume continues it if it stopped early), or choose another --out")
    except OSError:  # the file system has no locks: nothing to check with
        pass
    return None


def _remove_empty_folders(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) as long as each is empty: what a refused run created and left unused."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (the run wrote into it), or already gone
            return


def _diverged(what: str, step: int, last_good: int, saved_step: int | None, out: Path) -> str:
    """The message of a run stopped because `what` happened (the loss or the weights stopped being finite): at
    `step`, or somewhere after `last_good` when the steps between were not looked at; and which checkpoint is left."""
    when = f"at step {step}" if last_good >= step - 1 else (
        f"between steps {last_good + 1} and {step} (without a progress bar the loss is read on log and checkpoint "
        "steps only)")
    kept = (f"the checkpoint of step {saved_step} is kept ({out / CHECKPOINT_DIR})" if saved_step is not None
            else "no checkpoint was written")
    return f"{what} {when}; {kept}; lower train.lr or raise train.warmup"


def _prepare_out_dir(out: Path, resume: bool, world: D.World) -> Path | None:
    """The checkpoint to resume from, or None. Refuses to write over a previous run unless resuming, and to resume
    from a damaged checkpoint (which would silently start over); recovers a checkpoint whose save was cut short
    between its two renames (see checkpoint.atomic_folder: the previous one waits as .checkpoint.old)."""
    checkpoint = out / CHECKPOINT_DIR
    previous = out / f".{CHECKPOINT_DIR}.old"
    if resume and world.is_main and not checkpoint.exists() and previous.is_dir():  # incomplete: refused below
        os.replace(previous, checkpoint)
        print(f"attention-zoo train: {out}: recovered the last complete checkpoint from {previous.name} (a save was "
              "interrupted)")
    D.barrier(world)  # every rank sees the recovered folder
    is_run = holds_run(out)
    if not resume and is_run:
        raise UserError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if not is_run and (theirs := [name for name in (CONFIG, FINAL) if (out / name).exists()]):
        # e.g. `train exp/config.yaml --out exp`: the run's config.yaml would replace the user's own file
        raise UserError(f"{out} holds {' and '.join(theirs)} but no run (no {CHECKPOINT_DIR}/ or {METRICS}), with "
                        "or without --resume: training there would replace it; choose another --out (e.g. a subfolder)")
    if resume and checkpoint.exists():
        missing = [name for name in (WEIGHTS, STATE, CONFIG) if not (checkpoint / name).is_file()]
        if missing:
            raise UserError(f"{checkpoint}: the checkpoint is damaged (no {', '.join(missing)}), so --resume cannot "
                            "continue it; train again without --resume into another --out, or restore the files")
        return checkpoint
    return None


def built_differences(saved: dict, wanted: dict, ignore: tuple[str, ...] = ("model.dropout",),
                      sides: tuple[str, str] = ("checkpoint", "config")) -> list[str]:
    """model_differences of two validated model sections as the models are built: `attention` and `layers`
    compared through each layer's resolved attention (config.resolved_layers), so a variant default written
    out, or the same layers written another way, is no difference. Named `model.attention.KEY` when every
    layer of both models has one attention, else `model.attention.layer I.KEY`."""
    layers = {id(m): resolved_layers(m) for m in (saved, wanted)}
    per_layer = not all(all(a == ls[0] for a in ls) for ls in layers.values())

    def built(model: dict) -> dict:
        out = {k: v for k, v in model.items() if k not in ("attention", "layers")}
        ls = layers[id(model)]
        out["attention"] = {f"layer {i}": a for i, a in enumerate(ls)} if per_layer else ls[0]
        return out

    return model_differences(built(saved), built(wanted), ignore=ignore, sides=sides)


def model_differences(saved: dict, wanted: dict, path: str = "model", ignore: tuple[str, ...] = ("model.dropout",),
                      sides: tuple[str, str] = ("checkpoint", "config")) -> list[str]:
    """`path.key: checkpoint X, config Y` for every key where two sections differ (nested mappings
    compared key by key), the two named by `sides`. `ignore`: key paths not compared; by default model.dropout,
    which changes no weight."""
    out = []
    for key in sorted(set(saved) | set(wanted), key=str):
        a, b = saved.get(key, "(absent)"), wanted.get(key, "(absent)")
        if f"{path}.{key}" in ignore:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += model_differences(a, b, f"{path}.{key}", ignore, sides)
        elif a != b:
            out.append(f"{path}.{key}: {sides[0]} {a!r}, {sides[1]} {b!r}")
    return out


# train keys a resumed run must keep: they decide the batches (seed, batch_size, seq_len) or the updates
# (the rest; lr, betas and weight_decay also live in the saved optimizer state, which would silently win).
# steps may be raised (or lowered, above the checkpoint's step); how the run is executed and logged may change.
RESUME_KEYS = ("seed", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup", "weight_decay", "betas", "clip",
               "aux_losses")


def init_from_problem(init_from: str, config: Config, one_line: bool = False) -> str | None:
    """Why train.init_from cannot start `config`'s model: not a checkpoint folder (or a run folder holding
    checkpoint/, as eval and generate take), or its model section differs (each difference on its own line
    unless `one_line`); None if it can. Reads the checkpoint's config.yaml only, never its weights; raises
    UserError if that file is broken."""
    return _resolve_init_from(init_from, config, one_line)[1]


def check_init_from(init_from: str, config: Config) -> Path:
    """The checkpoint folder train.init_from names. Raises UserError (init_from_problem's reason) if it cannot
    start `config`'s model. Reads only: call before the run folder is written."""
    path, problem = _resolve_init_from(init_from, config, one_line=False)
    if problem is not None:
        raise UserError(f"{config.source}: train.init_from = {init_from!r}: {problem}")
    return path


def _resolve_init_from(init_from: str, config: Config, one_line: bool) -> tuple[Path | None, str | None]:
    """(the checkpoint folder, None) if `init_from` can start `config`'s model, else (folder or None, why not)."""
    from ..checkpoint import resolve_checkpoint

    try:
        path = resolve_checkpoint(init_from)
    except UserError:
        path = None
    if not Path(init_from).expanduser().exists():
        return None, "not a checkpoint folder: it does not exist"
    if path is None or not (path / WEIGHTS).is_file():
        return path, (f"not a checkpoint folder (expected {WEIGHTS} and {CONFIG}, as import-hf and train write) or "
                      "a run folder holding checkpoint/")
    differences = built_differences(load_saved_config(path)["model"], config["model"])
    if differences:
        lead, sep = (" ", "; ") if one_line else ("\n  ", "\n  ")
        return path, ("the config's model section differs from the checkpoint's (start from its config.yaml, e.g. "
                      + f"`base: {path / CONFIG}`):" + lead + sep.join(differences))
    return path, None


def _refuse_another_config(saved: dict, config: Config, where: Path, saved_side: str = "checkpoint") -> None:
    """UserError listing every difference when `config` does not continue the run whose saved config (raw
    mapping) is `saved`: the model and data sections, and RESUME_KEYS. `saved_side` names where `saved` was
    read in each difference (`model.dim: checkpoint 64, config 32`)."""
    sides = (saved_side, "config")
    saved_model = load_config({"model": with_legacy_stack(saved).get("model") or {}})["model"]
    differences = built_differences(saved_model, config["model"], ignore=(), sides=sides)
    if "data" in saved:
        differences += model_differences({"data": saved["data"]}, {"data": config["data"]}, path="", ignore=(),
                                         sides=sides)
    saved_train, train = saved.get("train") or {}, config["train"]
    differences += [f"train.{key}: {saved_side} {saved_train[key]!r}, config {train[key]!r}"
                    for key in RESUME_KEYS if key in saved_train and saved_train[key] != train[key]]
    differences = [d.removeprefix(".") for d in differences]
    if differences:
        raise UserError(f"{config.source}: --resume: {where} was trained with another config; resume with "
                        "the same model, data and train settings (see docs/training.md), or choose another --out:\n  "
                        + "\n  ".join(differences))


def check_fresh_resume(out: Path, config: Config) -> None:
    """--resume of a run without a checkpoint, which starts over at step 0: refused for a finished run (its
    final.json would be replaced by another run's) and for another config than the run's config.yaml (another
    model would train into the run's folder). Reads only."""
    if (out / FINAL).exists():
        raise UserError(f"{out}: the run finished (final.json) but its {CHECKPOINT_DIR}/ is gone, so --resume has "
                        "nothing to continue; train into another --out")
    if (out / CONFIG).is_file():  # there is no checkpoint: the run's side of each difference is its config.yaml
        _refuse_another_config(read_saved_config(out), config, out, saved_side=f"the run's {CONFIG}")


def check_resume(checkpoint: Path, config: Config) -> dict[str, Any]:
    """The training state of the run's checkpoint, after checking that `config` continues that run: the same
    model and data sections, the same RESUME_KEYS, and train.steps past the checkpoint's step (or equal
    to it when the run was meant to end there). Raises UserError listing every difference. Reads only."""
    saved = read_saved_config(checkpoint)
    state = load_training_state(checkpoint)
    if not isinstance(state, dict) or "step" not in state:
        raise UserError(f"{checkpoint / STATE}: not a training state written by train; train again without --resume")
    _refuse_another_config(saved, config, checkpoint)
    saved_train, train = saved.get("train") or {}, config["train"]
    step = state["step"]
    if train["steps"] < step or (train["steps"] == step and saved_train.get("steps", step) != step):
        raise UserError(f"{config.source}: train.steps = {train['steps']}: the run in {checkpoint.parent} is already "
                        f"at step {step}; raise train.steps above {step} to continue it")
    return state


def train(config: Config, out_dir: str | Path, *, resume: bool = False, stop_after: int | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train as `config` says, writing the run folder `out_dir`. Returns the summary (final.json),
    or, with `stop_after=k`, a partial summary after checkpointing step k (as if killed there)."""
    tcfg = config["train"]
    out = Path(out_dir)
    device = D.local_device(tcfg["device"])
    world = D.init_world(device)
    try:
        with contextlib.ExitStack() as closing:  # what _train opens (the TensorBoard writer) is closed on any exit
            summary = _train(config, out, tcfg, device, world, resume, stop_after, progress, closing)
        # Ranks tear down together: one rank destroying the process group while another (rank 0,
        # writing final.json) was still running aborted the faster one at exit now and then
        # ("terminate called without an active exception", seen in CI). Only on success: after an
        # error the other ranks may never reach this barrier.
        D.barrier(world)
        return summary
    finally:
        D.shutdown(world)


def _train(config: Config, out: Path, tcfg: dict, device: torch.device, world: D.World, resume: bool,
           stop_after: int | None, progress: bool, closing: contextlib.ExitStack) -> dict[str, Any]:
    _hold_out_dir(out, world, closing)
    plan = plan_run(config, world, cache_dir=out / TOKENS, write_cache=False)  # written once the run is accepted
    dataset, seq_len = plan.dataset, plan.seq_len
    checkpoint = _prepare_out_dir(out, resume, world)
    # Everything that can refuse the run is checked before the run folder is written: a refused run leaves
    # no config.yaml behind, and a refused resume leaves the run's own untouched.
    state = check_resume(checkpoint, config) if checkpoint is not None else None
    if resume and checkpoint is None:
        check_fresh_resume(out, config)
        if world.is_main:
            print(f"attention-zoo train: no checkpoint in {out}; starting from step 0")
            MetricsLog(out / METRICS).truncate_after(0)  # a run killed before its first checkpoint starts over
    if stop_after is not None and stop_after <= (state["step"] if state else 0):
        raise UserError(f"--stop-after {stop_after}: the run is already at step {state['step'] if state else 0}; "
                        "give a later step")
    init_from = None
    if checkpoint is None and tcfg.get("init_from"):  # resuming restores the run's own weights instead
        init_from = check_init_from(tcfg["init_from"], config)

    # A plug-in whose backward raises (its warm-up below runs no backward), found on the meta device before the
    # run folder is written rather than at step 1; what only the real device shows is left to the warm-up.
    dry_run(config, train=True, device=device.type, warm_up_follows=True)
    torch.manual_seed(tcfg["seed"])  # the same initial weights on every rank
    model = build_model(config).to(device)
    if init_from is not None:
        load_weights(model, init_from, device)
    if checkpoint is not None:
        load_weights(model, checkpoint, device)
    # dropout differs between ranks' rows; modulo 2**64, torch's seed range: train.seed may be its largest value
    rank_seed = (tcfg["seed"] + world.rank) % (SEED_MAX + 1)
    torch.manual_seed(rank_seed)
    random.seed(rank_seed)
    generator = torch.Generator().manual_seed(tcfg["seed"])  # the batch sampler: identical on every rank
    optimizer = build_optimizer(model, tcfg, device)
    schedule = build_schedule(optimizer, tcfg)
    # kernels built on first use (not in the first step's time nor the run's tokens/s), and a plug-in's broken
    # contract (its bias, its state writes, what fails only with gradients on) found and named, before the run
    # folder is written
    with plugin_failures_reported(config, model, f"the model's first forward (2 tokens on {device})"):
        note = own_attention_note(model, model.warm_up(device, grad=True), config["backend"])
    if note and world.is_main:
        print(f"attention-zoo train: note: {note}")
    D.barrier(world)  # every rank has looked at the folder before rank 0 writes into it
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS).touch()  # first: what marks the folder as a run's (a config.yaml alone may be the user's)
        atomic_write_text(out / CONFIG, yaml.safe_dump(dict(config), sort_keys=False))
        dataset.write_cache()
    log = MetricsLog(out / METRICS, enabled=world.is_main)

    start_step, tokens_seen, train_time, loss_value = 0, 0, 0.0, float("nan")
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        _restore_rng(state["rng"], generator, world)
        start_step, tokens_seen, train_time = state["step"], state["tokens_seen"], state["train_time"]
        loss_value = state["train_loss"]
        log.truncate_after(start_step)
    if tcfg["tensorboard"] and world.is_main:
        # resumed: purge what a killed process logged past start_step (0 too: killed before its first checkpoint)
        log.mirror = closing.enter_context(TensorBoardLog(out, resumed_from=start_step if resume else None))
    if world.is_main and start_step < tcfg["steps"]:
        print(f"attention-zoo train: {model.num_parameters():,} parameters, {dataset.name}, seq_len {seq_len}, "
              f"batch {tcfg['batch_size']} on {world.size} process(es), {device}, step {start_step} -> {tcfg['steps']}, "
              f"out {out}" + (f", weights from {init_from}" if init_from is not None else ""))

    raw_model = model
    if tcfg["activation_checkpointing"]:
        enable_activation_checkpointing(model)
    if world.distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if tcfg["compile"]:
        model = compile_model(model)
    autocast = autocast_context(tcfg, device)
    aux = {name: (get_aux_loss(name).fn, params) for name, params in tcfg["aux_losses"].items()}
    rows = D.rank_rows(tcfg["batch_size"], world)
    micro = (rows.stop - rows.start) // tcfg["grad_accum"]
    end = tcfg["steps"] if stop_after is None else min(stop_after, tcfg["steps"])

    saved_step = start_step if state is not None else None  # the checkpoint on disk, if any
    checked_step = start_step  # the last step whose loss was seen finite

    def checkpoint_now(step: int) -> None:
        nonlocal saved_step
        # every rank holds the same weights, so every rank refuses together
        if not torch.stack([torch.isfinite(p).all() for p in raw_model.parameters()]).all():
            raise UserError(_diverged("the weights became NaN or infinite", step, step - 1, saved_step, out))
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
                 "rng": _rng_state(generator, world), "tokens_seen": tokens_seen, "train_time": train_time,
                 "world_size": world.size, "train_loss": loss_value}
        if world.is_main:
            save_checkpoint(out / CHECKPOINT_DIR, raw_model, state)
        D.barrier(world)
        saved_step = step

    def validate(step: int) -> dict[str, float]:
        metrics = evaluate(raw_model, dataset, "val", plan.eval_batch_size, seq_len, tcfg["eval_batches"], device,
                           autocast, world)
        log.append({"kind": "val", "step": step, **metrics})
        return metrics

    bar = tqdm(total=tcfg["steps"], initial=start_step, disable=not (progress and world.is_main), desc="train",
               unit="step", dynamic_ncols=True)
    model.train()
    for step in range(start_step, end):
        t0 = time.perf_counter()
        dataset.at_step(step)  # a curriculum picks the step's examples
        batch = dataset.sample("train", tcfg["batch_size"], seq_len, generator)  # the global batch
        scored = (batch.targets != IGNORE_INDEX).sum().item()  # scored tokens in the global batch
        inputs, targets = batch.inputs[rows].to(device), batch.targets[rows].to(device)
        ce_sum = torch.zeros((), device=device, dtype=torch.float64)
        aux_sums = {name: torch.zeros((), device=device, dtype=torch.float64) for name in aux}
        for m in range(tcfg["grad_accum"]):
            x, y = inputs[m * micro:(m + 1) * micro], targets[m * micro:(m + 1) * micro]
            last = m == tcfg["grad_accum"] - 1
            with (contextlib.nullcontext() if last or not world.distributed else model.no_sync()), autocast:
                if aux:
                    logits, updates = model(x, return_state=True)
                else:
                    logits, updates = model(x), None
                ce = token_losses(logits, y)
                # DDP averages gradients over ranks: scale by world.size so the result is the global mean.
                loss = ce * (world.size / max(scored, 1))
                for name, (fn, params) in aux.items():
                    term = fn(updates, params, raw_model)
                    share = micro / tcfg["batch_size"] * world.size  # each micro-batch's share of the mean
                    loss = loss + term * share
                    aux_sums[name] += term.detach().double() * micro / tcfg["batch_size"]
            loss.backward()
            ce_sum += ce.detach().double()
        grad_norm = None
        if tcfg["clip"]:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = schedule.get_last_lr()[0]
        schedule.step()
        done = step + 1
        tokens_seen += tcfg["batch_size"] * seq_len
        log_now = done % tcfg["log_every"] == 0 or done == end
        checkpoint_due = done == end or (tcfg["checkpoint_every"] and done % tcfg["checkpoint_every"] == 0)
        # The loss is read (a device sync) only when it is shown, logged or about to be checkpointed: a run that
        # diverged must never replace its last good checkpoint.
        if log_now or progress or checkpoint_due:
            stats = D.all_sum(torch.stack([ce_sum, *aux_sums.values()]), world)
            loss_value = stats[0].item() / max(scored, 1)
            if not math.isfinite(loss_value):
                raise UserError(_diverged(f"the loss became {loss_value}", done, checked_step, saved_step, out))
            checked_step = done
        train_time += time.perf_counter() - t0
        tokens_per_s = tokens_seen / max(train_time, 1e-9)
        if log_now:
            record = {"kind": "train", "step": done, "loss": loss_value, "lr": lr, "tokens_per_s": tokens_per_s}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm.item()
            record.update({f"aux.{name}": stats[1 + i].item() for i, name in enumerate(aux)})
            log.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        if tcfg["eval_every"] and done % tcfg["eval_every"] == 0 and done < tcfg["steps"]:
            val_metrics = validate(done)
            if world.is_main and progress:
                bar.write(f"step {done}: val " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in val_metrics.items()))
        if checkpoint_due:
            checkpoint_now(done)
    bar.close()

    if end < tcfg["steps"]:  # stopped early on purpose (stop_after): a checkpoint is the only output
        if world.is_main:
            print(f"attention-zoo train: stopped after step {end} of {tcfg['steps']} (--stop-after); checkpoint in "
                  f"{out / CHECKPOINT_DIR}: continue with --resume")
        return {"stopped_at": end, "train_loss": loss_value}
    if start_step == tcfg["steps"] and (out / FINAL).exists():  # resumed a finished run: nothing to redo
        if world.is_main:
            print(f"attention-zoo train: {out} already finished at step {start_step} (train.steps); nothing to do. "
                  "Raise train.steps to train further.")
        return json.loads((out / FINAL).read_text())
    val_metrics = validate(tcfg["steps"])
    summary = {
        "steps": tcfg["steps"], "params": raw_model.num_parameters(), "train_loss": loss_value, "val": val_metrics,
        "tokens_per_s": tokens_seen / max(train_time, 1e-9), "train_time_s": train_time,
        "peak_mem_mb": max(D.gather_objects(_peak_memory_mb(device), world)), "device": str(device),
        "world_size": world.size, "dataset": dataset.name, "seq_len": seq_len,
    }
    if world.is_main:
        atomic_write_text(out / FINAL, json.dumps(summary, indent=2) + "\n")
        print("final: " + json.dumps({"train_loss": loss_value, **{f"val_{k}": v for k, v in val_metrics.items()}}))
    return summary
