"""`ablate`'s overall progress: the time-left estimate from given durations, reading the running run's
step from its metrics.jsonl, and the bar and estimate lines appearing (or not, with --no-progress)."""
from __future__ import annotations

import json

import pytest
from test_ablate import one_thread_children, sweep_file  # noqa: F401 (one_thread_children: a fixture)

from attention_zoo.ablate import progress as P
from attention_zoo.ablate.progress import (
    SweepProgress,
    estimate_remaining,
    format_duration,
    latest_train_record,
    seconds_per_step,
)
from attention_zoo.cli import main


def test_rate_is_wall_time_over_trained_steps_of_finished_runs():
    assert seconds_per_step([(100, 50.0), (300, 110.0)]) == pytest.approx(0.4)  # 160 s / 400 steps
    assert estimate_remaining([(100, 50.0), (300, 110.0)], (10, 99.0), 500) == pytest.approx(200.0)  # finished runs win
    assert estimate_remaining([], (20, 10.0), 300) == pytest.approx(150.0)  # before any finished: the running run's
    assert estimate_remaining([], (0, 10.0), 300) is None and estimate_remaining([], None, 300) is None
    assert estimate_remaining([(10, 5.0)], None, -3) == 0.0


def test_tracker_counts_steps_of_running_failed_and_resumed_runs(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(P.time, "perf_counter", lambda: now[0])
    p = SweepProgress([100, 100, 200], bar=False, eta=True)
    assert p.remaining() is None and p.steps_left() == 400
    p.start_run("a")
    now[0] = 25.0
    p.update(50)
    assert p.steps_left() == 350 and p.remaining() == pytest.approx(0.5 * 350)  # 25 s / 50 steps so far
    p.end_run(60.0)  # 100 steps in 60 s, start-up and evaluation included
    assert p.steps_left() == 300 and p.remaining() == pytest.approx(0.6 * 300)
    p.start_run("b", steps_done=40)  # resumed: 40 steps were trained by an earlier, killed sweep
    assert p.steps_left() == 260
    p.end_run(30.0)  # 60 steps trained now, in 30 s
    assert p.finished == [(100, 60.0), (60, 30.0)]
    assert p.remaining() == pytest.approx(90.0 / 160 * 200)
    p.start_run("c")
    p.end_run(None)  # failed: its steps are no longer ahead, its time is no measurement
    assert p.steps_left() == 0 and p.finished == [(100, 60.0), (60, 30.0)]
    assert p.status().startswith("sweep: 400/400 steps")


def test_format_duration():
    assert [format_duration(s) for s in (44.6, 250, 3600 + 5 * 60 + 9)] == ["45 s", "4 min 10 s", "1 h 05 min"]


def test_latest_train_record_reads_the_tail_and_skips_val_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert latest_train_record(path) is None
    lines = [json.dumps({"kind": "train", "step": s, "loss": 1.0 / s, "pad": "x" * 100}) for s in range(1, 400)]
    path.write_text("\n".join(lines + [json.dumps({"kind": "val", "step": 399, "loss": 0.5})]) + '\n{"kind": "tra')
    assert path.stat().st_size > 4 * P.TAIL_BYTES  # only the tail is read, and it holds the answer
    assert latest_train_record(path)["step"] == 399


@pytest.mark.usefixtures("one_thread_children")
def test_ablate_shows_the_bar_and_the_time_left_and_no_progress_silences_both(tmp_path, capsys):
    from attention_zoo.ablate import read_sweep_file, run_sweep

    path = sweep_file(tmp_path, runs={"a": {}, "b": {"model.attention.variant": "selective"}}, metric="val.bpb")
    assert run_sweep(read_sweep_file(path), tmp_path / "bar", progress=True) == 0
    out, err = capsys.readouterr()
    first = next(line for line in out.splitlines() if line.startswith("[1/2] a (seed 0): val.bpb"))
    assert "; sweep: 2/4 steps, about " in first and first.endswith(" left")  # 2 steps per run: one run of two done
    last = next(line for line in out.splitlines() if line.startswith("[2/2] b (seed 0): val.bpb"))
    assert "left" not in last  # nothing is left after the last run
    assert "sweep: 100%" in err and "4/4 steps" in err  # the bar, on stderr

    assert main(["ablate", str(path), "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "[1/2] a (seed 0): val.bpb" in out and "left" not in out and "sweep:" not in err


@pytest.mark.usefixtures("one_thread_children")
def test_a_resumed_run_is_measured_from_its_checkpoint_not_its_last_logged_step(tmp_path, monkeypatch):
    # A sweep killed at step 3 of 4 whose run last checkpointed at step 2: the rerun trains steps 3 and 4
    # again, so its wall time is over 2 steps; counting the logged step 3 as done made it 1 (2x the rate).
    from attention_zoo.ablate import read_sweep_file, run_sweep
    from attention_zoo.ablate import runner as R

    sweep = read_sweep_file(sweep_file(tmp_path, runs={"a": {"train.steps": 4}}))
    out = tmp_path / "out"
    run_dir = R.run_dir_for(out, sweep.runs[0])
    R._prepare(sweep.runs[0], run_dir)
    assert main(["train", str(run_dir / R.RUN_CONFIG), "--out", str(run_dir), "--stop-after", "2", "--no-progress"]) == 0
    with (run_dir / "metrics.jsonl").open("a") as f:  # what the killed process logged after its checkpoint
        f.write(json.dumps({"kind": "train", "step": 3, "loss": 5.0}) + "\n")
    assert R.checkpoint_step(run_dir) == 2 and R.checkpoint_step(tmp_path) == 0

    trackers, losses = [], []
    monkeypatch.setattr(R, "SweepProgress", lambda *a, **k: trackers.append(SweepProgress(*a, **k)) or trackers[-1])
    monkeypatch.setattr(SweepProgress, "update", lambda self, step, loss=None: losses.append(loss))
    monkeypatch.setattr(R, "POLL_S", 0.01)  # the bar reads metrics.jsonl many times while the run starts up
    assert run_sweep(sweep, out, progress=True) == 0
    assert [steps for steps, _ in trackers[0].finished] == [2]
    assert losses and 5.0 not in losses  # the killed process's step 3 is never shown as this run's
