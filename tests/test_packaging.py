"""The built-in variants install inside the package, as `attention_zoo.variants`, from the repository's
top-level `variants/` folder: in a wheel, in an editable install, and from a bare checkout on PYTHONPATH.
No top-level `variants` module is installed (an unrelated PyPI package has that name)."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def subpackages() -> set[str]:
    """attention_zoo and every folder below it that is a package, plus the variants."""
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "attention_zoo").rglob("__init__.py")}
    return found | {"attention_zoo.variants"}


def test_a_wheel_holds_every_package_and_the_variants_inside_attention_zoo(tmp_path):
    """Built offline from a copy of the checkout: the build writes build/ and *.egg-info where it runs, which
    other tests' processes (with the checkout on PYTHONPATH) would otherwise read mid-write."""
    pytest.importorskip("setuptools")
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                                 "runs", ".pytest_cache"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "-w", str(tmp_path / "dist"),
                             "--no-deps", "--no-build-isolation", "--no-index", "-q"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    folders = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert folders == subpackages()  # pyproject.toml lists the packages: a new one must be added there
    for module in ("__init__", "vanilla", "gqa", "residual", "selective", "cross_layer_selective"):
        assert f"attention_zoo/variants/{module}.py" in names
    assert not [n for n in names if n.startswith("variants/")]
    assert "attention_zoo/data/shakespeare/works.tar.gz" in names


def test_a_bare_checkout_on_pythonpath_imports_the_variants():
    """No install at all: `python -S` reads no .pth file (so no editable finder); PYTHONPATH holds the
    checkout and, for torch and the other dependencies, this interpreter's site-packages."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]]))
    code = ("import sys, attention_zoo.variants as v; from attention_zoo import list_variants; "
            "from attention_zoo.variants.selective import ACCUMULATOR; "
            "assert not any('Editable' in getattr(f, '__name__', '') for f in sys.meta_path); "
            "print(v.__file__); print(list_variants())")
    result = subprocess.run([sys.executable, "-S", "-c", code], env=env, cwd="/", capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    folder, names = result.stdout.splitlines()
    assert folder == str(ROOT / "variants" / "__init__.py")
    builtins = sorted(p.stem for p in (ROOT / "variants").glob("*.py") if p.stem != "__init__")
    assert set(builtins) <= set(ast.literal_eval(names)) and "selective" in builtins  # every built-in module registered


def test_another_checkout_on_pythonpath_imports_its_own_variants(tmp_path):
    """A second checkout (a git worktree, another clone) on PYTHONPATH beside this interpreter's editable install
    of this one: `attention_zoo` came from the second, and so must its variants. The install's finder answered
    first and gave this checkout's variants, so changes to the second's variants/ were never run."""
    other = tmp_path / "other"
    for folder in ("attention_zoo", "variants"):
        shutil.copytree(ROOT / folder, other / folder, ignore=shutil.ignore_patterns("__pycache__"))
    code = "import attention_zoo, attention_zoo.variants as v; print(attention_zoo.__file__); print(v.__file__)"
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(other)), cwd="/",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [str(other / "attention_zoo" / "__init__.py"),
                                          str(other / "variants" / "__init__.py")]
