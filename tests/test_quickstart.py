"""The README quickstart sweep and every command written in docs/training.md, docs/ablations.md and
docs/results.md run, in order, as documented, with only tiny-budget overrides added (fewer steps,
smaller batches, a sweep's first seed only) so they finish in seconds."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from attention_zoo.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["docs/training.md", "docs/ablations.md", "docs/results.md"]
TINY_TRAIN = ["train.steps=2", "train.eval_every=1", "train.eval_batches=1", "train.batch_size=4", "train.checkpoint_every=1",
              "train.log_every=1"]
TINY_SWEEP = [a for o in ("train.steps=2", "train.eval_every=1", "train.eval_batches=1", "train.batch_size=4")
              for a in ("--set", o)]
QUICKSTART_LABELS = ["vanilla", "gqa (kv_heads=2)", "selective", "selective+gqa", "residual", "cross-layer selective (share)",
                     "vanilla (learned positions)"]


def documented_commands(doc: str) -> list[str]:
    """Shell lines of ```bash blocks that run attention-zoo or torchrun (comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / doc).read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith(("attention-zoo ", "torchrun ")):
                    commands.append(part)
    return commands


def tiny(argv: list[str]) -> list[str]:
    """The same command on a tiny budget."""
    command = argv[argv.index("train") if "train" in argv else 0]
    if command == "train":
        argv = [("1" if prev == "--stop-after" else a) for prev, a in zip(["", *argv], argv)]
        return argv + TINY_TRAIN
    if argv[0] == "eval":
        return argv + ["--batches", "1"]
    if argv[0] == "ablate" and "--dry-run" not in argv and "--summarize" not in argv:
        first_seed = (yaml.safe_load((ROOT / argv[1]).read_text()).get("seeds") or [0])[0]
        return argv + TINY_SWEEP + ["--seeds", str(first_seed)]  # every run's config, once
    return argv


# Two groups, each on one worker: the sweeps' tests share the runs that `workdir` accumulates (the quickstart
# sweep, the results sweeps), which another worker would train again; docs/training.md's commands share their
# own. The two groups run side by side (one group was ~70 s of serial work). A test whose runs a group did not
# make trains them itself.
SWEEPS, TRAINING = pytest.mark.xdist_group("docs-sweeps"), pytest.mark.xdist_group("docs-training")
pytestmark = SWEEPS


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch folder that sees the repository's configs, so documented relative paths work and
    everything they write (runs/...) stays out of the repository."""
    work = tmp_path_factory.mktemp("docs")
    (work / "configs").symlink_to(ROOT / "configs")
    return work


def run_documented(command: str, work: Path, capsys) -> tuple[int, str]:
    words = shlex.split(command)
    if words[0] == "torchrun":  # a real multi-process launch
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", *tiny(words[1:])], cwd=work, env=env,
                                capture_output=True, text=True, timeout=300)
        return result.returncode, result.stdout + result.stderr
    cwd = os.getcwd()
    os.chdir(work)
    try:
        code = main(tiny(words[1:]))
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    return code, out + err


@pytest.mark.parametrize("doc", [pytest.param(doc, marks=TRAINING if doc == "docs/training.md" else SWEEPS)
                                 for doc in DOCS])
def test_documented_commands_run(doc, workdir, capsys):
    commands = documented_commands(doc)
    assert commands, f"{doc} shows no commands"
    for command in commands:
        code, output = run_documented(command, workdir, capsys)
        assert code == 0, f"{doc}: `{command}` failed:\n{output}"
        assert "Traceback" not in output


@TRAINING
def test_training_doc_python_blocks_run(workdir, monkeypatch):
    from attention_zoo.train import aux_losses

    monkeypatch.chdir(workdir)
    for block in re.findall(r"```python\n(.*?)```", (ROOT / "docs/training.md").read_text(), flags=re.S):
        block = block.replace('["train.steps=2"]', '["train.steps=2", "train.batch_size=4"]')
        exec(compile(block, "docs/training.md", "exec"), {})
    aux_losses.AUX_LOSSES.pop("mean_penalty", None)


def test_results_doc_python_block_runs(workdir, capsys, monkeypatch):
    """The snippet that measures the learned penalty by distance, on the (tiny) results checkpoint."""
    command = "attention-zoo ablate configs/ablations/results_small.yaml --out runs/results_small"
    assert command in documented_commands("docs/results.md")
    if not (workdir / "runs/results_small/selective/seed0/checkpoint").is_dir():
        code, output = run_documented(command, workdir, capsys)
        assert code == 0, output
    monkeypatch.chdir(workdir)
    (block,) = re.findall(r"```python\n(.*?)```", (ROOT / "docs/results.md").read_text(), flags=re.S)
    exec(compile(block, "docs/results.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["0", "1", "2", "3"]  # one line per layer


def test_quickstart_sweep_prints_the_table_and_writes_the_plots(workdir, capsys):
    readme = (ROOT / "docs/ablations.md").read_text()
    command = "attention-zoo ablate configs/ablations/quickstart.yaml --out runs/quickstart"
    assert command in readme
    out = workdir / "runs" / "quickstart"
    if not (out / "results.md").exists():  # normally already run by the docs test above
        code, output = run_documented(command, workdir, capsys)
        assert code == 0, output
    table = (out / "results.md").read_text()
    rows = [line.split(" | ")[0].removeprefix("| ") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == QUICKSTART_LABELS  # rows[0] is the header
    for name in ("curves.png", "final.png", "results.csv", "results.jsonl"):
        assert (out / name).stat().st_size > 0
    sweep = yaml.safe_load((ROOT / "configs/ablations/quickstart.yaml").read_text())
    assert sweep["base"]["data"]["name"] == "shakespeare" and sweep["seeds"] == [0]
    stack = {k: sweep["base"]["model"][k] for k in ("position", "norm", "mlp")}
    assert stack == {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}  # stated, not left to defaults
    # the learned-positions run differs from vanilla in its positions only
    learned, vanilla = sweep["runs"]["vanilla (learned positions)"], sweep["runs"]["vanilla"]
    assert learned == {**vanilla, "model.position": "learned"}


def test_documented_tensorboard_sweep_writes_event_files_per_run(workdir, capsys):
    pytest.importorskip("tensorboard")
    command = ("attention-zoo ablate configs/ablations/quickstart.yaml --out runs/quickstart-tensorboard "
               "--set train.tensorboard=true --no-progress")
    assert command in documented_commands("docs/ablations.md")
    out = workdir / "runs" / "quickstart-tensorboard"
    if not (out / "results.md").exists():  # normally already run by the docs test above
        code, output = run_documented(command, workdir, capsys)
        assert code == 0, output
    with_events = sorted(p.parent.relative_to(out).as_posix() for p in out.glob("*/seed0/events.out.tfevents.*"))
    slugs = sorted(p.parent.relative_to(out).as_posix() for p in out.glob("*/seed0/run.yaml"))
    assert with_events == slugs and len(slugs) == len(QUICKSTART_LABELS)
