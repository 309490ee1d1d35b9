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
    for name in ("garbage", "mismatch", "not_yaml", "bad_value", "newer_format", "odd_format", "odd_digit"):
        shutil.copytree(root / "good", root / name)
        broken[name] = root / name
    ckpt = lambda name: root / name / "checkpoint"  # noqa: E731
    (ckpt("garbage") / "model.safetensors").write_text("garbage\n")
    shutil.copy(ckpt("shallow") / "model.safetensors", ckpt("mismatch") / "model.safetensors")
    (ckpt("not_yaml") / "config.yaml").write_text("model: {dim: [\n")
    saved = yaml.safe_load((ckpt("bad_value") / "config.yaml").read_text())
    saved["model"]["dim"] = -5
    (ckpt("bad_value") / "config.yaml").write_text(yaml.safe_dump(saved))
    for name, version in (("newer_format", "99"), ("odd_format", "two"), ("odd_digit", "\u00b2")):
        with_format(ckpt(name) / "model.safetensors", version)
    return {"root": root, **broken}


def with_format(file: Path, version: str | None) -> None:
    """Rewrite weights `file` with checkpoint format `version` in its metadata (None: no metadata, as before
    formats were versioned)."""
    from safetensors.torch import load_file, save_file

    save_file(load_file(file), file, metadata=None if version is None else {"attention_zoo_format": version})


EXPECTED = {
    "garbage": ("model.safetensors", "not a readable safetensors file"),
    "mismatch": ("model.safetensors", "missing keys: blocks.1."),
    "not_yaml": ("config.yaml", "invalid YAML"),
    "bad_value": ("config.yaml", "model.dim = -5"),
    "newer_format": ("model.safetensors", "checkpoint format 99, written by a newer attention-zoo; this one reads "
                     "formats up to 2: upgrade"),
    "odd_format": ("model.safetensors", "attention_zoo_format = 'two' is not a checkpoint format"),
    "odd_digit": ("model.safetensors", "attention_zoo_format = '\u00b2' is not a checkpoint format"),  # isdigit() takes it
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


def test_a_checkpoint_carries_its_format_and_an_older_one_says_what_changed(runs, tmp_path, caplog):
    """The weights' metadata holds the checkpoint format; a file without one (format 1, written before formats)
    still loads, and says so where the code changed under it: differential attention under rope rotates each half
    of a head on its own since format 2 (whole heads before). Other format-1 checkpoints load without a word."""
    from safetensors import safe_open

    from attention_zoo.checkpoint import FORMAT_VERSION, load_model, save_checkpoint
    from attention_zoo.config import build_model

    with safe_open(str(runs["root"] / "good" / "checkpoint" / "model.safetensors"), "pt") as f:
        assert f.metadata()["attention_zoo_format"] == str(FORMAT_VERSION)

    def saved_as_format_1(attention: dict, position: str) -> Path:
        config = tiny()
        config["model"].update(attention=attention, position=position, depth=3,
                               layers=[{"at": 1, "attention": {"variant": "vanilla"}}])
        folder = tmp_path / f"{attention['variant']}_{position}"
        save_checkpoint(folder, build_model(config))
        with_format(folder / "model.safetensors", None)
        return folder

    caplog.set_level("WARNING", logger="attention_zoo.checkpoint")
    load_model(saved_as_format_1({"variant": "differential"}, "rope"))
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "format 1 with differential attention under rope (layers 0, 2)" in warned[0], warned
    assert "model.safetensors" in warned[0], warned
    caplog.clear()
    for attention, position in (({"variant": "differential"}, "learned"), ({"variant": "vanilla"}, "rope")):
        load_model(saved_as_format_1(attention, position))
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_a_replaced_checkpoint_is_on_the_disk_before_the_old_one_goes(tmp_path, monkeypatch):
    """atomic_folder renamed the new folder into place and removed the old one without an fsync: after a power loss
    the new folder could hold empty files while the previous checkpoint was already gone. Every file, the folder
    and the parent (the renames) are now flushed before the old folder is removed."""
    import os
    import shutil

    from attention_zoo import checkpoint

    target = tmp_path / "checkpoint"
    with checkpoint.atomic_folder(target) as tmp:
        (tmp / "a").write_text("first")
    events = []
    real_fsync, real_rmtree = os.fsync, shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rmtree(path, *args, **kwargs):
        events.append(("remove", str(path)))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    with checkpoint.atomic_folder(target) as tmp:
        (tmp / "model.safetensors").write_text("weights")
        (tmp / "config.yaml").write_text("model: {}")
    # the last removal of .checkpoint.old is the old checkpoint's (the first clears a leftover before the swap)
    removed_old = max(i for i, event in enumerate(events) if event == ("remove", str(tmp_path / ".checkpoint.old")))
    synced = {path.replace(str(tmp), str(target)) for kind, path in events[:removed_old] if kind == "fsync"}
    assert {str(target / "model.safetensors"), str(target / "config.yaml"), str(target), str(tmp_path)} <= synced
    assert (target / "model.safetensors").read_text() == "weights"
