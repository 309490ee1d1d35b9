"""The code in docs/adding-a-variant.md runs as written, and the config examples in docs/config.md and
docs/variants.md validate (the broken one fails with the messages the page shows).

Convention in those pages: a ```python or ```yaml block whose first line is `# NAME.py` or
`# NAME.yaml` is a file the reader saves; every other ```python block is run, in page order.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from attention_zoo import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def blocks(page: Path) -> list[tuple[str, str]]:
    """(language, code) of every fenced block, in order."""
    return re.findall(r"^```(\w+)\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def saved_name(code: str) -> str | None:
    match = re.match(r"# ([\w.-]+\.(?:py|yaml))\n", code)
    return match.group(1) if match else None


def test_adding_a_variant_tutorial_runs(tmp_path, monkeypatch, isolated_registry):
    page = DOCS / "adding-a-variant.md"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {"__name__": "tutorial"}
    ran = {"python": 0, "bash": 0, "toml": 0}
    for lang, code in blocks(page):
        if (name := saved_name(code)) is not None:
            (tmp_path / name).write_text(code)
        elif lang == "python":
            exec(compile(code, f"{page.name} block {ran['python']}", "exec"), namespace)
            ran["python"] += 1
        elif lang == "bash":
            for line in filter(None, (line.split(" #")[0].strip() for line in code.splitlines())):
                words = shlex.split(line)
                if words[0].startswith("ATTENTION_ZOO_TEST_PLUGINS="):
                    run_contract_command(words, tmp_path)
                    continue
                assert words[:2] == ["PYTHONPATH=.", "attention-zoo"], f"unexpected command in {page.name}: {line}"
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
                result = subprocess.run([sys.executable, "-m", "attention_zoo", *words[2:]], cwd=tmp_path, env=env,
                                        capture_output=True, text=True, timeout=120)
                assert result.returncode == 0 and "Traceback" not in result.stderr, f"`{line}`:\n{result.stderr}"
                assert "alibi" in result.stdout
            ran["bash"] += 1
        elif lang == "toml":
            entry_points = tomllib.loads(code)["project"]["entry-points"]["attention_zoo.variants"]
            assert entry_points == {"alibi": "my_alibi"}
            ran["toml"] += 1
    assert ran["python"] >= 3 and ran["bash"] and ran["toml"]
    assert (tmp_path / "my_alibi.py").exists() and (tmp_path / "alibi.yaml").exists()
    # The page's Forgetting Attention is a template: it must pass the contract tests too (float64 gradcheck
    # included: a float32 cast of its gates failed it).
    run_contract_command(["ATTENTION_ZOO_TEST_PLUGINS=my_fox", "PYTHONPATH=path/to/my_variants", "python", "-m",
                          "pytest", "-q", "tests/test_contract.py", "tests/test_cache.py", "-k", "fox"], tmp_path)


def run_contract_command(words: list[str], folder: Path) -> None:
    """The page's contract-test command, from the checkout, with `folder` (holding the page's my_alibi.py) as
    the documented PYTHONPATH; in one process (-n0). The plug-in's cases must be collected and pass."""
    assert words[1:5] == ["PYTHONPATH=path/to/my_variants", "python", "-m", "pytest"], words
    env = {**os.environ, "ATTENTION_ZOO_TEST_PLUGINS": words[0].split("=", 1)[1],
           "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)])}
    result = subprocess.run([sys.executable, "-m", "pytest", *words[5:], "-n0", "-p", "no:cacheprovider"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    tail = (result.stdout + result.stderr)[-3000:]
    assert result.returncode == 0 and re.search(r"\b\d+ passed", result.stdout), tail
    assert not re.search(r"\b\d+ (failed|error)", result.stdout), tail


def config_examples() -> list[tuple[str, int, str]]:
    return [(page, n, code) for page in ("config.md", "variants.md")
            for n, (lang, code) in enumerate(blocks(DOCS / page)) if lang == "yaml"]


@pytest.mark.parametrize("page,index,code", config_examples(), ids=[f"{p}-block{n}" for p, n, _ in config_examples()])
def test_config_example(page, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = saved_name(code) or "example.yaml"
    Path(name).write_text(code)
    base = (yaml.safe_load(code) or {}).get("base")
    if base:  # the examples inherit from files in configs/
        shutil.copy(ROOT / "configs" / base, tmp_path / base)
    if name != "broken.yaml":
        load_config(name)
        return
    with pytest.raises(ConfigError) as info:
        load_config(name)
    shown = next(c for lang, c in blocks(DOCS / page)[index + 1:] if lang == "text")
    actual = str(info.value).splitlines()
    for line in shown.splitlines():
        if line.endswith("..."):
            assert any(a.startswith(line[:-3]) for a in actual), f"{page} shows {line!r}; actual:\n{info.value}"
        else:
            assert line in actual, f"{page} shows {line!r}; actual:\n{info.value}"


def test_config_page_python_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    code = [c for lang, c in blocks(DOCS / "config.md") if lang == "python"]
    assert code
    for n, block in enumerate(code):
        exec(compile(block, f"config.md block {n}", "exec"), {"__name__": "config_doc"})
