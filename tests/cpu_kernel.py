"""The fused CPU kernel in tests: it must build wherever a C++ compiler is found (CI has one), so a build
failure there fails the test that needs it, with the build's reason; without a compiler those tests skip
(and the blocked op serves, tested in test_selection_op.py)."""
from __future__ import annotations

import shutil

import pytest

from attention_zoo.ops.selection import cpu_fused

HAS_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None
needs_cpu_kernel = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler to build the fused CPU kernel")


def require_kernel():
    """The built kernel module; fails the calling test with the build's reason if it did not build."""
    module = cpu_fused.kernel()
    assert module is not None, f"the fused CPU kernel did not build: {cpu_fused.refusal()}"
    return module
