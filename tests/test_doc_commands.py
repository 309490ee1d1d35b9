"""Every `attention-zoo` command written in README.md or docs/ must at least parse and point at files
that exist; the cheap ones (list, validate, describe) run here for real. Expensive ones (train,
ablate, bench, calibrate, generate) are run with tiny overrides by their own feature tests."""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from attention_zoo.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CHEAP = {"list", "validate", "describe"}


def shell_commands(path: Path) -> list[str]:
    """Lines of ```bash blocks that invoke attention-zoo (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip().removeprefix("$ ")
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith(("attention-zoo ", "python -m attention_zoo ")):
                    commands.append(part)
    return commands


CASES = [(p.relative_to(ROOT).as_posix(), c) for p in DOCS for c in shell_commands(p)]


def argv_of(command: str) -> list[str]:
    words = shlex.split(command)
    return words[1:] if words[0] == "attention-zoo" else words[3:]


def test_readme_has_commands():
    assert any(doc == "README.md" for doc, _ in CASES)


@pytest.mark.parametrize("doc,command", CASES, ids=[f"{d}:{c[:60]}" for d, c in CASES])
def test_documented_command_parses_and_its_files_exist(doc, command):
    argv = argv_of(command)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    assert all("=" in e for e in extra), f"{doc}: `{command}` has unknown arguments {extra}"
    for word in (part for arg in argv for part in arg.split(",")):  # bench --variants takes a list
        if word.endswith((".yaml", ".yml")) and "*" not in word and "=" not in word:
            assert (ROOT / word).is_file(), f"{doc}: `{command}` names {word}, which does not exist"


@pytest.mark.parametrize("doc,command", [c for c in CASES if argv_of(c[1])[0] in CHEAP],
                         ids=[f"{d}:{c[:60]}" for d, c in CASES if argv_of(c)[0] in CHEAP])
def test_cheap_documented_command_runs(doc, command, capsys, monkeypatch):
    """In this process through cli.main, from the repository root (an exception escaping main fails the test, as a
    traceback would); `python -m attention_zoo` itself, exit codes and stderr as a user sees them, is run in
    subprocesses by test_config.py, test_plugins.py, test_generate.py and test_non_finite.py."""
    argv = argv_of(command)
    expanded = []
    for word in argv:  # the shell would expand globs
        expanded += sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(word)) if "*" in word else [word]
    monkeypatch.chdir(ROOT)
    code = main(expanded)
    out, err = capsys.readouterr()
    assert code == 0, f"{doc}: `{command}` failed:\n{out}\n{err}"
    assert out.strip() and "Traceback" not in err, f"{doc}: `{command}`:\n{out}\n{err}"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README.md should show Python usage"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)


def test_gpu_script_is_valid_bash_and_runs_the_documented_gpu_benchmark():
    """`.ci/gpu` (what a session lent a GPU runs) parses, and its benchmark is one of docs/benchmarks.md's GPU
    commands with only the output folder changed, so what it measures is documented and figures recorded
    there come from documented commands. Its results must come back from the device tool whole: at most 8
    files, two folders deep."""
    script = ROOT / ".ci" / "gpu"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    documented = [c for c in shell_commands(ROOT / "docs" / "benchmarks.md") if "--device cuda" in c]
    in_script = [c for c in shell_commands_in_script(script) if c.startswith("attention-zoo bench")]
    assert len(in_script) == 1

    def without_out(command: str) -> list[str]:
        words = shlex.split(command)
        return words[:words.index("--out")]

    assert without_out(in_script[0]) in [without_out(c) for c in documented]
    text = script.read_text()
    files = len(set(re.findall(r'"\$out/([\w.]+)"', text)))
    bench_files = 3 + ("--profile" in in_script[0])  # results.json, .md, .png (+ profiles.md)
    assert files - 1 + bench_files <= 8


def shell_commands_in_script(path: Path) -> list[str]:
    """The `attention-zoo ...` commands of a bash script, continuation lines joined, a leading `timeout N` dropped."""
    lines = path.read_text().replace("\\\n", " ").splitlines()
    return [line[line.index("attention-zoo "):] for line in lines
            if "attention-zoo " in line and not line.lstrip().startswith(("#", "command "))]
