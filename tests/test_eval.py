"""`attention-zoo eval` on a checkpoint: problems named by the flag that caused them."""
from __future__ import annotations

import pytest
import torch

from attention_zoo import build_model
from attention_zoo.checkpoint import save_checkpoint
from attention_zoo.cli import main
from attention_zoo.commands.eval import _split_named
from attention_zoo.config import ConfigError, Problem, load_config
from attention_zoo.train import plan_run
from attention_zoo.train.loop import ShortSplit


def test_a_seq_len_longer_than_the_data_is_named_by_the_flag_for_the_split_evaluated(tmp_path, capsys):
    """`eval --seq-len 10000000` listed one problem per split of the data (train and test too, which eval does not
    read), each naming data.name and the run's train.seq_len, the flag the user typed nowhere."""
    torch.manual_seed(0)
    model = build_model({"model": {"dim": 16, "depth": 1, "heads": 2, "max_seq_len": 16, "position": "rope"}})
    save_checkpoint(tmp_path / "run" / "checkpoint", model)
    assert main(["eval", str(tmp_path / "run"), "--device", "cpu", "--batches", "1", "--seq-len", "10000000"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "train.seq_len" not in err and "data.name" not in err
    assert "--seq-len = 10000000: split 'val' of dataset 'shakespeare' has" in err and "give a shorter --seq-len" in err
    assert "split 'train'" not in err and "split 'test'" not in err


def test_a_short_split_is_told_by_its_type_not_by_its_wording():
    """eval found plan_run's "split shorter than one window" problems by matching their message with a regex, so
    rewording the message in train.loop would have made eval refuse a split it does not read. plan_run now gives
    each such problem as a ShortSplit naming its split; eval goes by that type alone."""
    config = load_config({"model": {"dim": 16, "depth": 1, "heads": 2, "max_seq_len": 16, "position": "rope"},
                          "train": {"seq_len": 10_000_000}})
    with pytest.raises(ConfigError) as caught:
        plan_run(config)
    short = [p for p in caught.value.problems if isinstance(p, ShortSplit)]
    assert sorted(p.split for p in short) == ["test", "train", "val"]
    assert all(_split_named(p) == p.split and "fewer than one window" in p.message for p in short)
    same_words = Problem("x.yaml", "data.name", "shakespeare", short[0].message)  # another problem, same text
    assert _split_named(same_words) is None
    reworded = ShortSplit("x.yaml", "data.name", "shakespeare", "too short to sample", "val")
    assert _split_named(reworded) == "val"


def test_a_checkpoint_with_nan_weights_is_named_not_evaluated(tmp_path, capsys):
    """eval printed `"loss": NaN` (not JSON) and exited 0 on a run that had diverged."""
    torch.manual_seed(0)
    model = build_model({"model": {"dim": 16, "depth": 1, "heads": 2, "max_seq_len": 16}})
    with torch.no_grad():
        model.blocks[0].attention.out_proj.weight[0, 0] = float("nan")
    save_checkpoint(tmp_path / "run" / "checkpoint", model)
    argv = ["eval", str(tmp_path / "run"), "--device", "cpu", "--batches", "1", "--json", str(tmp_path / "m.json")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == "" and not (tmp_path / "m.json").exists()
    assert "model.safetensors: 1 weight tensor(s) hold NaN or infinite values" in captured.err


def test_a_loss_that_is_not_a_number_is_refused_not_printed(tmp_path, capsys, monkeypatch):
    """With finite weights the loss can still overflow in low precision: eval printed `"loss": NaN` (not JSON)
    and exited 0."""
    import attention_zoo.train as train

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "run" / "checkpoint",
                    build_model({"model": {"dim": 16, "depth": 1, "heads": 2, "max_seq_len": 16}}))
    monkeypatch.setattr(train, "evaluate", lambda *args, **kwargs: {"loss": float("nan"), "tokens": 16, "bpb": float("nan")})
    assert main(["eval", str(tmp_path / "run"), "--device", "cpu", "--batches", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "val loss is nan" in captured.err and "train.precision=float32" in captured.err


@pytest.mark.parametrize("name", ["checkpoint/model.safetensors", "checkpoint/config.yaml", "checkpoint/eval.json",
                                  "final.json", "metrics.jsonl", "config.yaml"])
def test_the_metrics_are_not_written_over_the_checkpoint_or_its_run(tmp_path, capsys, name):
    """`--json RUN/checkpoint/model.safetensors` replaced the weights by the metrics (exit 0; the checkpoint never
    loaded again); the run's final.json, metrics.jsonl and config.yaml were as easy to lose."""
    torch.manual_seed(0)
    model = build_model({"model": {"dim": 16, "depth": 1, "heads": 2, "max_seq_len": 16}})
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint", model)
    for record in ("final.json", "metrics.jsonl", "config.yaml"):
        (run / record).write_text("kept\n")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["eval", str(run), "--device", "cpu", "--batches", "1", "--json", str(run / name)]) == 2
    captured = capsys.readouterr()
    assert f"--json {run / name}: " in captured.err and "would destroy it" in captured.err and captured.out == ""
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert main(["eval", str(run), "--device", "cpu", "--batches", "1", "--json", str(run / "eval.json")]) == 0
