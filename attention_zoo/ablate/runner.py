"""Run a sweep: each unfinished run in its own `attention-zoo train` process, one after another.

A process per run keeps runs independent (a crash stays in its run; peak memory is that run's own)
and runs the exact `attention-zoo train` command a user would type. Layout of OUT:

    results.jsonl, results.csv, results.md, curves.png, final.png
    <run slug>/seed<k>/   run.yaml (the run's config), train.log, and the train run folder

Restarting a sweep skips runs whose record is in results.jsonl and resumes a run that was killed
(its checkpoint is continued with `train --resume`).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import yaml

from ..checkpoint import STATE, atomic_write_text
from ..errors import UserError
from ..train.loop import CHECKPOINT_DIR, METRICS
from .plots import write_plots
from .progress import SweepProgress, latest_train_record
from .records import RESULTS, append_record, current_records, make_record, metric_of, read_records
from .summary import write_csv, write_markdown
from .sweep import Run, Sweep

RUN_CONFIG, LOG = "run.yaml", "train.log"


def run_dir_for(out: Path, run: Run) -> Path:
    return out / run.slug / f"seed{run.seed}"


def _run_yaml(run: Run) -> str:
    return yaml.safe_dump(dict(run.config), sort_keys=False)


def _holds_other_config(run: Run, run_dir: Path) -> bool:
    """Whether `run_dir` trained (or began training) a config other than `run`'s."""
    existing = run_dir / RUN_CONFIG
    return existing.exists() and existing.read_text() != _run_yaml(run)


def _check_folders(out: Path, runs: list[Run]) -> None:
    """Raise UserError naming every run folder of `runs` that holds a different config, before anything trains:
    found one run at a time, a changed sweep trained its runs up to the first such folder (hours, perhaps) and
    then stopped."""
    stale = [str(run_dir_for(out, run)) for run in runs if _holds_other_config(run, run_dir_for(out, run))]
    if stale:
        which = stale[0] if len(stale) == 1 else f"each of {len(stale)} run folders ({', '.join(stale)})"
        raise UserError(f"{which} holds a run of a different config (the sweep or its --set changed); remove "
                        f"{'it' if len(stale) == 1 else 'them'} or choose another --out; nothing was trained")


def _prepare(run: Run, run_dir: Path) -> None:
    """Write the run's config; refuse to continue a folder that trained a different config."""
    if _holds_other_config(run, run_dir):
        raise UserError(f"{run_dir} holds a run of a different config (the sweep or its --set changed); "
                        "remove that folder or choose another --out")
    atomic_write_text(run_dir / RUN_CONFIG, _run_yaml(run))


_CONTEXT = None


def _context():
    """Runs are forked from a forkserver that imported torch and the train loop once: each run is a
    fresh process (its own memory peak, a crash stays inside it) without paying the interpreter and
    torch start-up again. The server never computes anything, so forking it is safe."""
    global _CONTEXT
    if _CONTEXT is None:
        # OpenMP threads that wait by spinning make torch's default 2 threads many times slower than 1 on
        # a 2-core CPU that anything else is using (docs/benchmarks.md); waiting by sleeping costs a
        # wake-up per parallel region, ~1.2x on a quiet machine for a 1024-token step of the benchmark
        # model: the smaller risk for sweeps, which often share the machine. Read once, when the server
        # imports torch.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["torch", "torch._dynamo", "torch.optim", "attention_zoo.cli", "attention_zoo.train.loop",
                                          "attention_zoo.ablate.runner"])  # runs keep the code the sweep started with
    return _CONTEXT


def _stop_when_gone(sweep_pid: int) -> None:
    """A run's parent is the fork server, not the sweep: if the sweep is killed, stop the run too
    (SIGTERM; the checkpoint it last wrote is where a rerun of the sweep resumes)."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(sweep_pid, 0)
        except ProcessLookupError:
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _child(argv: list[str], log_path: str, environ: dict[str, str], sweep_pid: int) -> None:
    """In the run's process: the parent's environment, stdout and stderr to train.log, then `attention-zoo train`."""
    threading.Thread(target=_stop_when_gone, args=(sweep_pid,), daemon=True).start()
    os.environ.clear()
    os.environ.update(environ)  # the server was started with an older environment
    if environ.get("OMP_NUM_THREADS", "").isdigit():
        import torch

        torch.set_num_threads(int(environ["OMP_NUM_THREADS"]))
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from ..cli import main

    try:
        code = main(argv)
    finally:
        sys.stdout.flush(), sys.stderr.flush()
    sys.exit(code)


POLL_S = 1.0  # how often the sweep's bar reads the running run's metrics.jsonl


def checkpoint_step(run_dir: Path) -> int:
    """The step a resumed run continues from: its checkpoint's (or that of the `.checkpoint.old` which train
    recovers when a save was cut short), 0 without one. Raises nothing: an unreadable checkpoint is 0 here
    (train then refuses it, and a failed run's time is no measurement anyway).

    Not the last step of metrics.jsonl: a killed run logged past its last checkpoint, and train redoes those
    steps; counting them as done made seconds per step the resumed run's time over too few steps."""
    for folder in (run_dir / CHECKPOINT_DIR, run_dir / f".{CHECKPOINT_DIR}.old"):
        if (folder / STATE).is_file():
            try:
                # memory-mapped: only the step is read, not the optimizer state beside it
                step = torch.load(folder / STATE, map_location="cpu", weights_only=False, mmap=True)["step"]
            except Exception:  # noqa: BLE001 - a damaged pickle raises many types; see the docstring
                return 0
            return step if isinstance(step, int) else 0
    return 0


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size


def _train(run_dir: Path, progress: SweepProgress) -> int:
    # The run's own bar is off: the sweep's bar shows its step and loss (read from metrics.jsonl), and
    # two bars from two processes on one terminal line would garble each other.
    argv = ["train", str(run_dir / RUN_CONFIG), "--out", str(run_dir), "--resume", "--no-progress"]
    process = _context().Process(target=_child, args=(argv, str(run_dir / LOG), dict(os.environ), os.getpid()))
    # A killed run's metrics.jsonl ends with steps past its checkpoint, which train rewrites away (a new file) before
    # it logs anything: until the file changes, its last record is not this run's step.
    stale = _file_identity(run_dir / METRICS)
    process.start()
    try:
        while process.exitcode is None:
            process.join(POLL_S)
            if progress.bar is None or _file_identity(run_dir / METRICS) == stale:
                continue
            if (record := latest_train_record(run_dir / METRICS)) is not None:
                progress.update(record["step"], record.get("loss"))
    except KeyboardInterrupt:
        process.terminate()
        process.join()
        raise
    return process.exitcode


PLOT_INTERVAL_S = 60.0  # plots are redrawn after a run at most this often (and always at the end)


def write_summaries(out: Path, sweep: Sweep, records: list[dict], plots: bool = True) -> str:
    write_csv(out / "results.csv", records)
    if plots:
        write_plots(out, sweep, records)
    return write_markdown(out / "results.md", sweep, records)


def run_sweep(sweep: Sweep, out: Path, *, progress: bool | None = None) -> int:
    """Run what is not finished; rewrite the summaries after every run. Returns the number of failed runs.
    Raises UserError, before training anything, when a run's folder holds a different config.

    progress: True shows a bar of the whole sweep (steps, the running run and its loss, the time left)
    on stderr and the estimated time left after each finished run's line; None (default) does the
    latter, and the bar only when stderr is a terminal; False neither."""
    out.mkdir(parents=True, exist_ok=True)
    finished = {(r.get("label"), r.get("seed"), r.get("fingerprint")) for r in read_records(out)}
    todo = [run for run in sweep.runs if (run.label, run.seed, run.fingerprint) not in finished]
    _check_folders(out, todo)
    tracker = SweepProgress([run.config["train"]["steps"] for run in todo], eta=progress is not False,
                            bar=sys.stderr.isatty() if progress is None else progress)
    try:
        failed = _run_all(sweep, out, finished, tracker)
    finally:
        tracker.close()

    records = current_records(read_records(out), sweep.runs)
    table = write_summaries(out, sweep, records)
    print()
    print(table)
    print(f"wrote {out / RESULTS}, results.csv, results.md" + (", curves.png, final.png" if records else ""))
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; fix and rerun the same command to retry them")
    return len(failed)


def _run_all(sweep: Sweep, out: Path, finished: set, progress: SweepProgress) -> list[str]:
    """Train each unfinished run in turn, recording and summarising each; the failed runs' names."""
    failed: list[str] = []
    total = len(sweep.runs)
    last_plot = time.monotonic()
    for i, run in enumerate(sweep.runs, 1):
        name = f"[{i}/{total}] {run.label} (seed {run.seed})"
        if (run.label, run.seed, run.fingerprint) in finished:
            progress.say(f"{name}: finished earlier, skipped")
            continue
        run_dir = run_dir_for(out, run)
        _prepare(run, run_dir)
        progress.say(f"{name}: training -> {run_dir}")
        # A killed run resumes from its checkpoint: the steps before it are done, those it logged after are redone.
        progress.start_run(run.label, checkpoint_step(run_dir))
        start = time.perf_counter()
        code = _train(run_dir, progress)
        wall = time.perf_counter() - start
        if code != 0:
            progress.end_run(None)
            failed.append(f"{run.label} (seed {run.seed})")
            log = run_dir / LOG
            log_tail = "".join(log.read_text().splitlines(keepends=True)[-15:]) if log.exists() else "(no log)\n"
            progress.say(f"{name}: FAILED (exit {code}); end of {run_dir / LOG}:\n{log_tail}")
            continue
        progress.end_run(wall)
        record = make_record(run, run_dir, wall)
        append_record(out, record)  # durable before anything else happens
        value = metric_of(record, sweep.metric)
        shown = "-" if value is None else f"{value:.4f}"
        line = f"{name}: {sweep.metric} {shown}, {record['tokens_per_s']:,.0f} tokens/s, {wall:.0f} s"
        if progress.eta and progress.steps_left():
            line += f"; {progress.status()}"
        progress.say(line)
        redraw = time.monotonic() - last_plot >= PLOT_INTERVAL_S
        write_summaries(out, sweep, current_records(read_records(out), sweep.runs), plots=redraw)
        last_plot = time.monotonic() if redraw else last_plot
    return failed
