"""Loading checkpoints: every broken checkpoint is one exit-2 message naming the file at fault, whichever
command loads it (eval, generate, train.init_from, a resume: all go through checkpoint.load_model /
load_weights / load_saved_config)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from attention_zoo.cli import main


def tiny(depth: int = 2) -> dict:
    return {"model": {"dim": 32, "depth": depth, "heads": 2, "max_seq_len": 32, "attention": {"variant": "vanilla"}},
            "data": {"name": "shakespeare"},
            "train": {"steps": 1, "batch_size": 2, "seq_len": 16, "eval_every": 0, "eval_batches": 1, "device": "cpu"}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A good run and broken copies of it: garbage weights, weights of another model, config.yaml not YAML,
    config.yaml with a bad value."""
    root = tmp_path_factory.mktemp("runs")
    for name, depth in (("good", 2), ("shallow", 1)):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(tiny(depth)))
        assert main(["train", str(root / f"{name}.yaml"), "--out", str(root / name), "--no-progress"]) == 0
    broken = {}
    for name in ("garbage", "mismatch", "not_yaml", "bad_value"):
        shutil.copytree(root / "good", root / name)
        broken[name] = root / name
    ckpt = lambda name: root / name / "checkpoint"  # noqa: E731
    (ckpt("garbage") / "model.safetensors").write_text("garbage\n")
    shutil.copy(ckpt("shallow") / "model.safetensors", ckpt("mismatch") / "model.safetensors")
    (ckpt("not_yaml") / "config.yaml").write_text("model: {dim: [\n")
    saved = yaml.safe_load((ckpt("bad_value") / "config.yaml").read_text())
    saved["model"]["dim"] = -5
    (ckpt("bad_value") / "config.yaml").write_text(yaml.safe_dump(saved))
    return {"root": root, **broken}


EXPECTED = {
    "garbage": ("model.safetensors", "not a readable safetensors file"),
    "mismatch": ("model.safetensors", "missing keys: blocks.1."),
    "not_yaml": ("config.yaml", "invalid YAML"),
    "bad_value": ("config.yaml", "model.dim = -5"),
}


@pytest.mark.parametrize("broken", list(EXPECTED))
def test_a_broken_checkpoint_is_one_message_naming_its_file(runs, broken, capsys):
    root, run = runs["root"], runs[broken]
    file, what = EXPECTED[broken]
    commands = [("eval", str(run)), ("generate", str(run), "--prompt", "ab", "--max-tokens", "2"),
                ("train", str(root / "good.yaml"), f"train.init_from={run}", "--out", str(root / f"init_{broken}"),
                 "--no-progress")]
    for argv in commands:
        code = main(list(argv))  # an exception escaping main fails the test: no traceback
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert f"{run / 'checkpoint' / file}" in err and what in err, (argv, err)
        assert "<dict>" not in err
    if broken == "mismatch":
        assert "do not match" in err
    assert not (root / f"init_{broken}").exists()  # the refused run wrote nothing


def test_a_checkpoint_reads_like_any_other_file(runs):
    """Its folder was 0700 (mkdtemp) and model.safetensors 0600 (safetensors) while other files were 0644:
    another user or a web server could read the config but not the weights. Now every entry has the modes
    the umask gives new files (the run here was written under the test process's umask)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    checkpoint = runs["root"] / "good" / "checkpoint"
    assert checkpoint.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.name: p.stat().st_mode & 0o777 for p in checkpoint.iterdir()} == {
        name: 0o666 & ~umask for name in ("config.yaml", "model.safetensors", "state.pt")}


def test_atomic_folder_replaces_whole_and_clears_what_killed_saves_left(tmp_path):
    """A failed write leaves the folder as it was; a successful one replaces it whole and removes the staging
    folders a SIGKILLed save left beside it (they survived every later save before)."""
    from attention_zoo.checkpoint import atomic_folder

    target = tmp_path / "checkpoint"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("first")
    stale = tmp_path / ".checkpoint.k1ll3d.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_text("half")
    other = tmp_path / ".other.k1ll3d.tmp"  # another path's staging folder is not this save's to remove
    other.mkdir()
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "a").write_text("second")
        raise RuntimeError("interrupted")
    assert (target / "a").read_text() == "first" and stale.exists()
    with atomic_folder(target) as tmp:
        (tmp / "b").write_text("third")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert not stale.exists() and other.exists() and not (tmp_path / ".checkpoint.old").exists()
