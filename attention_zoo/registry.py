"""A name -> object registry with wildcards and entry points (variants, backends, stack components).

Unlike timm's registry, a second registration under a taken name is an error that names both
definitions, and third-party packages join through an entry-point group without being imported
by hand.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import logging
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class RegistryError(LookupError):
    """An unknown, duplicate or broken registry entry."""


def _where(obj: Any) -> str:
    """`module.qualname (file:line)`: enough to find a definition when two collide."""
    try:
        file = inspect.getsourcefile(obj)
        line = inspect.getsourcelines(obj)[1]
        loc = f" ({file}:{line})"
    except (OSError, TypeError):
        loc = ""
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}{loc}"


def _definition(obj: Any) -> tuple[str, int, str] | None:
    """(file, line, qualified name) of a class or function; None when its source cannot be found.

    The module name is left out on purpose: one file imported under two module names (a script run as
    `__main__` that also lists itself under `plugins:`) makes two objects of one definition."""
    try:
        return inspect.getsourcefile(obj), inspect.getsourcelines(obj)[1], obj.__qualname__
    except (OSError, TypeError, AttributeError):
        return None


def did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    return f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""


def valid_choices(name: str, choices: list[str]) -> str:
    """`did you mean 'x'? valid: a, b, c`: the end of a message about a name that is not one of `choices`."""
    return f"{did_you_mean(name, choices)}valid: {', '.join(choices)}"


@dataclass
class PluginFailure:
    source: str  # entry point or module name
    error: str


class Registry(Generic[T]):
    """Objects by name. The built-in modules and the entry-point group are imported on the first lookup
    (`names`, `in`, `get`), not at construction.

    Raises RegistryError: `add` for a name that is not an identifier or is taken by another definition;
    `get` for an unknown name (with close matches and every known name). A plugin that fails to load is
    not raised: it is logged and kept in `failures`."""

    def __init__(self, kind: str, entry_point_group: str | None = None, builtin_modules: tuple[str, ...] = ()):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._builtin_modules = builtin_modules
        self._entries: dict[str, T] = {}
        self._loaded = False
        self.failures: list[PluginFailure] = []

    # -- registration ------------------------------------------------------------------------
    def add(self, name: str, obj: T) -> None:
        """Register `obj` under `name` and set its `registered_name`. Raises RegistryError for a name that is
        not an identifier, or one taken by another definition (the message names both)."""
        if not isinstance(name, str) or not name.isidentifier():
            raise RegistryError(f"{self.kind} name must be an identifier, got {name!r}")
        old = self._entries.get(name)
        if old is not None and old is not obj:
            # The same definition registered again (a reload, or one file imported under two module names)
            # is no duplicate: the newer object replaces the older.
            same = _definition(old) is not None and _definition(old) == _definition(obj)
            if not same and _where(old) != _where(obj):
                raise RegistryError(
                    f"duplicate {self.kind} {name!r}: already registered by {_where(old)}, "
                    f"registered again by {_where(obj)}"
                )
        self._entries[name] = obj
        try:
            obj.registered_name = name  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            pass

    # -- discovery ---------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # first: importing a built-in module registers into this registry, which must not recurse
        try:
            for module in self._builtin_modules:
                importlib.import_module(module)
        except BaseException:  # a broken built-in (or Ctrl-C mid-import): the next lookup tries again, not a partial registry
            self._loaded = False
            raise
        if self.entry_point_group:
            for ep in metadata.entry_points(group=self.entry_point_group):
                try:
                    ep.load()
                except Exception as exc:  # a broken plugin must not break runs that don't use it
                    self.failures.append(PluginFailure(f"entry point {ep.name} = {ep.value}", f"{type(exc).__name__}: {exc}"))
                    log.warning("attention-zoo: could not load plugin %s (%s): %s", ep.name, ep.value, exc)

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching a shell-style wildcard."""
        self._ensure_loaded()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: str) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def get(self, name: str) -> T:
        """The object registered as `name`. Raises RegistryError naming close matches and every known name."""
        self._ensure_loaded()
        try:
            return self._entries[name]
        except KeyError:
            known = sorted(self._entries)
            raise RegistryError(
                f"unknown {self.kind} {name!r}; {did_you_mean(name, known)}known: {', '.join(known)}"
            ) from None


def import_required_plugins(values: list[str], flag: str = "--plugins") -> list[str]:
    """The modules named in `values` (each one module or a comma-separated list, as a repeatable `--plugins`
    option gives them), imported. Raises UserError naming `flag` and every module that cannot be imported."""
    modules = [m.strip() for value in values for m in value.split(",") if m.strip()]
    if failures := import_plugins(modules, warn=False):
        from .errors import UserError

        raise UserError(f"{flag}: " + "; ".join(f"{f.source} cannot be imported ({f.error})" for f in failures))
    return modules


def import_plugins(modules: list[str], *, warn: bool = True) -> list[PluginFailure]:
    """Import user-listed plugin modules; report failures by name instead of raising. Each failure is also
    logged as a warning (the only word of it where nothing needs the module), unless `warn` is False: for a
    caller that reports the failures itself. A module that is not found gets a hint about PYTHONPATH; one that
    was found but failed does not."""
    failures = []
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            missing = isinstance(exc, ModuleNotFoundError) and exc.name is not None and module.startswith(exc.name)
            hint = " (is its folder on PYTHONPATH?)" if missing else ""
            failures.append(PluginFailure(f"plugin module {module!r}", f"{type(exc).__name__}: {exc}{hint}"))
            if warn:
                log.warning("attention-zoo: could not import plugin module %r: %s: %s%s", module, type(exc).__name__,
                            exc, hint)
    return failures
