"""`attention-zoo eval` on a checkpoint: problems named by the flag that caused them."""
from __future__ import annotations

import torch

from attention_zoo import build_model
from attention_zoo.checkpoint import save_checkpoint
from attention_zoo.cli import main


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
