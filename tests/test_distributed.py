"""Several processes (torchrun, gloo on CPU) train exactly what one process trains with the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from attention_zoo.config import load_config
from attention_zoo.train import train
from attention_zoo.train.distributed import World, rank_rows
from attention_zoo.train.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {
    "model": {"dim": 32, "depth": 2, "heads": 2, "max_seq_len": 32, "attention": {"variant": "selective", "kv_heads": 1}},
    "data": {"name": "shakespeare"},
    "train": {"steps": 5, "batch_size": 8, "seq_len": 32, "lr": 3e-3, "warmup": 1, "eval_every": 2, "eval_batches": 3,
              "checkpoint_every": 0, "log_every": 1, "device": "cpu"},
}


def test_rank_rows_partition_the_global_batch():
    rows = [rank_rows(12, World(rank, 3)) for rank in range(3)]
    assert [list(range(12))[r] for r in rows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def losses(run: Path, kind: str) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == kind]


def test_two_processes_match_one(tmp_path):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(CONFIG))
    # 2 processes x 2 accumulation steps x 2 rows against 1 process x 8 rows: the same 8 examples per step.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "attention_zoo",
               "train", str(config_file), "train.grad_accum=2", "--out", str(tmp_path / "two"), "--no-progress"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 process(es)" in result.stdout and result.stdout.count("final:") == 1  # rank 0 alone reports

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(CONFIG), tmp_path / "one", progress=False)
    finally:
        torch.set_num_threads(threads)
    for kind in ("train", "val"):
        one, two = losses(tmp_path / "one", kind), losses(tmp_path / "two", kind)
        assert [s for s, _ in one] == [s for s, _ in two] and len(one) >= 2
        assert [loss for _, loss in two] == pytest.approx([loss for _, loss in one], abs=1e-5)
    assert (tmp_path / "two" / "checkpoint" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoint", "config.yaml", "final.json", "metrics.jsonl"]
