"""`train.tensorboard: true`: the run's metrics as TensorBoard scalars in the run folder (read back with
TensorBoard's own reader), resume without doubled steps, and a clear error when the package is missing."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from test_train import tiny

from attention_zoo.cli import main
from attention_zoo.config import load_config
from attention_zoo.train import train
from attention_zoo.train.metrics import read_jsonl


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] in file order, as TensorBoard reads the folder (all event files, purges applied)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def logged(run: Path, kind: str, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == kind and key in r}


def test_event_files_hold_the_logged_losses_lr_and_speed(tmp_path):
    pytest.importorskip("tensorboard")
    train(load_config(tiny(tensorboard=True)), tmp_path, progress=False)
    assert list(tmp_path.glob("events.out.tfevents.*")), "no event file in the run folder"
    board = scalars(tmp_path)
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm", "val/loss", "val/bpb"} <= set(board)
    for kind, key in [("train", "loss"), ("train", "lr"), ("val", "loss"), ("val", "bpb")]:
        expected = logged(tmp_path, kind, key)
        assert list(expected) == (list(range(1, 9)) if kind == "train" else [4, 8])
        assert [s for s, _ in board[f"{kind}/{key}"]] == list(expected)
        # event files store float32
        assert [v for _, v in board[f"{kind}/{key}"]] == pytest.approx(list(expected.values()), rel=1e-6)


def test_a_resumed_run_shows_each_step_once_with_the_redone_values(tmp_path):
    pytest.importorskip("tensorboard")
    config = load_config(tiny(tensorboard=True))
    train(config, tmp_path, stop_after=5, progress=False)  # checkpoint at 5 (stop), the last regular one at 3
    # as if killed after logging steps 6 and 7 past the checkpoint at 5: points TensorBoard must drop on resume
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as stale:
        for step in (6, 7):
            stale.add_scalar("train/loss", 123.0, step)
    train(config, tmp_path, resume=True, progress=False)
    points = scalars(tmp_path)["train/loss"]
    assert [s for s, _ in points] == list(range(1, 9))  # each step once: the stale 6 and 7 are gone
    assert [v for _, v in points] == pytest.approx(list(logged(tmp_path, "train", "loss").values()), rel=1e-6)



def test_a_run_resumed_before_its_first_checkpoint_shows_each_step_once(tmp_path):
    """A run killed before its first checkpoint (the first 500 steps by default) restarts at step 0 on --resume,
    and metrics.jsonl drops what it had logged; its event files kept those points, so TensorBoard drew steps
    1..k twice (no purge when resuming "from step 0")."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 123.0}\n')  # as the killed run left it
    with SummaryWriter(str(tmp_path)) as stale:
        for step in (1, 2):
            stale.add_scalar("train/loss", 123.0, step)
    train(load_config(tiny(tensorboard=True)), tmp_path, resume=True, progress=False)
    points = scalars(tmp_path)["train/loss"]
    assert [s for s, _ in points] == list(range(1, 9))
    assert [v for _, v in points] == pytest.approx(list(logged(tmp_path, "train", "loss").values()), rel=1e-6)

def test_without_the_package_the_config_is_refused_naming_the_key_and_the_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # find_spec -> None: as if not installed
    cfg = tmp_path / "tb.yaml"
    cfg.write_text(yaml.safe_dump(tiny(tensorboard=True)))
    code = main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "train.tensorboard" in err and "pip install tensorboard" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": tiny(), "runs": {"a": {}, "b": {"model.attention.variant": "selective"}}}))
    code = main(["ablate", str(sweep), "--out", str(tmp_path / "sweep"), "--set", "train.tensorboard=true"])
    err = capsys.readouterr().err
    assert code == 2 and "train.tensorboard" in err and err.count("pip install tensorboard") == 1  # once, for every run
    code = main(["validate", str(cfg)])  # validate reports on stdout
    assert code == 2 and "pip install tensorboard" in capsys.readouterr().out


def test_tensorboard_must_be_a_boolean(tmp_path):
    from attention_zoo.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(tiny(tensorboard="yes"))
    assert [p.path for p in err.value.problems] == ["train.tensorboard"]
