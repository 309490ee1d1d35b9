"""The ATTENTION_ZOO_* switches read from the environment, parsed one way: a typo is an error, never a
silent "on" (`ATTENTION_ZOO_CPU_KERNEL=off` used to mean enabled, since only "0" turned it off)."""
from __future__ import annotations

import os

from .errors import UserError

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


# Every switch the library reads, with its default (ATTENTION_ZOO_TRITON_SHARED_DQ takes words, checked where read).
SWITCHES = {"ATTENTION_ZOO_CPU_KERNEL": True, "ATTENTION_ZOO_SPLIT_BACKWARD": True,
            "ATTENTION_ZOO_TRITON_AUTOTUNE": True}
OTHER_VARIABLES = ("ATTENTION_ZOO_TRITON_SHARED_DQ",)


def switch(name: str) -> bool:
    """Library switch `name` (a key of SWITCHES) as set in the environment, else its default there."""
    return env_flag(name, SWITCHES[name])


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




def check_environment() -> None:
    """Every ATTENTION_ZOO_* variable set, checked before a command does any work (a switch is otherwise read only
    where its code runs, after a run has started, or never): a bad value, or a name no code reads (a typo such as
    ATTENTION_ZOO_CPU_KERNAL=0 would be ignored), raises one UserError listing them all."""
    from .registry import did_you_mean

    problems = []
    for name in sorted(n for n in os.environ if n.startswith("ATTENTION_ZOO_")):
        if name in SWITCHES:
            try:
                switch(name)
            except UserError as exc:
                problems.append(str(exc))
        elif name not in OTHER_VARIABLES:
            known = [*SWITCHES, *OTHER_VARIABLES]
            problems.append(f"{name}: no such setting; {did_you_mean(name, known)}known: {', '.join(known)}")
    if problems:
        raise UserError("environment: " + "; ".join(problems))
