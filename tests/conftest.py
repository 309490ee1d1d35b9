"""Fixtures shared by the test files: the repository root, the CLI in a subprocess, and a registry that
forgets whatever a test registers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch  # importing torch does not import triton

# Triton reads TRITON_INTERPRET when it is first imported (xformers imports it too): set before anything
# can import it, so the triton backend's kernels run in Triton's interpreter on a machine without CUDA.
# Only tests that name the triton backend run them; `auto` never picks the interpreter.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """ATTENTION_ZOO_TEST_PLUGINS=mod1,mod2: import those plug-in modules (as a config's `plugins:` does) before
    any test file is collected, so the tests that loop over the registry (tests/cases.py: the contract, cache,
    reference tests) cover their variants as they cover an installed one. A module that cannot be imported stops
    the run with one message (pytest.UsageError)."""
    from attention_zoo.env import TEST_PLUGINS, module_list
    from attention_zoo.errors import UserError
    from attention_zoo.registry import import_plugins

    try:
        modules = module_list(TEST_PLUGINS)
    except UserError as exc:
        raise pytest.UsageError(str(exc)) from None
    failures = import_plugins(modules, warn=False)
    if failures:
        raise pytest.UsageError(f"{TEST_PLUGINS}: " + "; ".join(f"{f.source} cannot be imported ({f.error})"
                                                                 for f in failures))


# pytest-xdist hands tests out in collection order, so a long test collected last runs alone at the end
# while the other worker idles (the sm_90 compile tests, 30-50 s each, ended a 6-minute run 40 s after the
# other worker had finished). The files holding the longest tests go first; the many short ones fill the end.
LONGEST_FIRST = ("tests/test_triton.py", "tests/test_quickstart.py", "tests/test_compile.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not item.nodeid.startswith(LONGEST_FIRST))  # stable: each part keeps its order


@pytest.fixture
def run_cli():
    """Run `python -m attention_zoo ARGS` in a fresh interpreter; `path` entries go first on PYTHONPATH."""

    def run(*args: str, path: tuple[Path | str, ...] = (), cwd: Path = ROOT) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([*map(str, path), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return subprocess.run([sys.executable, "-m", "attention_zoo", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=120)

    return run


@pytest.fixture
def isolated_registry(monkeypatch):
    """Variant registrations, plugin failures and plugin modules made during the test are undone after it."""
    from attention_zoo.variant_registry import VARIANTS

    VARIANTS.names()  # load built-ins and entry points first, so they are part of the snapshot
    entries, failures, loaded = dict(VARIANTS._entries), list(VARIANTS.failures), VARIANTS._loaded
    modules = set(sys.modules)
    yield VARIANTS
    VARIANTS._entries.clear()
    VARIANTS._entries.update(entries)
    VARIANTS.failures[:] = failures
    VARIANTS._loaded = loaded
    for name in set(sys.modules) - modules:
        if name.startswith(("zoo_", "my_")):
            del sys.modules[name]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine the idle threads'
    spinning made each matmul ~10-100x slower. Every test, and every process a test starts (through
    OMP_NUM_THREADS), runs with one thread; a test that checks threading sets its own and restores one."""
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture
def triton_backend():
    """The triton backend, runnable here: on a CPU-only machine through Triton's interpreter (see the
    top of this file). Skips without triton."""
    pytest.importorskip("triton")
    from attention_zoo.backends import BACKENDS
    from attention_zoo.backends.triton import load_kernels

    kernels, error = load_kernels()
    if kernels is None:
        pytest.skip(f"triton kernels do not import: {error}")
    if kernels.INTERPRETED == torch.cuda.is_available():
        pytest.fail(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')} does not suit this machine "
                    f"(CUDA available: {torch.cuda.is_available()}); unset it")
    if kernels.INTERPRETED and kernels.VERSION < kernels.INTERPRETER_MIN_VERSION:
        pytest.skip(f"Triton's interpreter runs the kernels from {kernels.INTERPRETER_MIN_VERSION} on; this is {kernels.VERSION}")
    return BACKENDS.get("triton")
