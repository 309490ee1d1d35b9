"""`attention_zoo.variants` from a source checkout that is on PYTHONPATH but not installed.

The built-in variants live in the repository's top-level `variants/` folder (the layout is fixed) and are
installed inside the package as `attention_zoo.variants` (pyproject.toml's `package-dir`); a wheel holds
them at `attention_zoo/variants/`, and an editable install maps the name to the folder. A bare checkout
has neither, so this finder maps that one name to the folder. It sits first on `sys.meta_path`, because
the variants must be the ones beside the package that was imported: a checkout on PYTHONPATH (a git
worktree, a second clone) next to an editable install of another checkout would otherwise get that
other checkout's variants from the install's finder, silently. No other name is affected.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

NAME = "attention_zoo.variants"
PACKAGE = Path(__file__).resolve().parent
FOLDER = PACKAGE.parent / "variants"


class SourceVariantsFinder(importlib.abc.MetaPathFinder):
    """Finds `attention_zoo.variants` in the checkout's `variants/` folder; its submodules follow from the
    package's `__path__` by the ordinary path finder."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != NAME:
            return None
        return importlib.util.spec_from_file_location(fullname, FOLDER / "__init__.py",
                                                      submodule_search_locations=[str(FOLDER)])


def install() -> None:
    """Add the finder where the package sits in a checkout without its variants inside (not a wheel)."""
    if (PACKAGE / "variants").exists() or not (FOLDER / "__init__.py").is_file():
        return
    if not any(isinstance(f, SourceVariantsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, SourceVariantsFinder())
