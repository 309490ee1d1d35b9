"""The ATTENTION_ZOO_* switches read from the environment, parsed one way: a typo is an error, never a
silent "on" (`ATTENTION_ZOO_CPU_KERNEL=off` used to mean enabled, since only "0" turned it off)."""
from __future__ import annotations

import os

from .errors import UserError

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """Environment variable `name` as a switch: 1/true/yes/on or 0/false/no/off (any case); `default` when
    unset or empty. Read at each call, so a test or a long-lived process may change it. Raises UserError naming
    the variable, its value and the valid words for anything else."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise UserError(f"{name}={raw!r}: expected {'/'.join(_TRUE)} or {'/'.join(_FALSE)} (unset: "
                    f"{'on' if default else 'off'})")
