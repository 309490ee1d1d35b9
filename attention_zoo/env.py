"""The ATTENTION_ZOO_* switches read from the environment, parsed one way: a typo is an error, never a
silent "on" (`ATTENTION_ZOO_CPU_KERNEL=off` used to mean enabled, since only "0" turned it off)."""
from __future__ import annotations

import os

from .errors import UserError

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


# Every switch the library reads, with its default.
SWITCHES = {"ATTENTION_ZOO_CPU_KERNEL": True, "ATTENTION_ZOO_SPLIT_BACKWARD": True,
            "ATTENTION_ZOO_TRITON_AUTOTUNE": True}
TEST_PLUGINS = "ATTENTION_ZOO_TEST_PLUGINS"
# The variables that are not on/off switches, with what they take.
OTHER_VARIABLES = {
    "ATTENTION_ZOO_TRITON_SHARED_DQ": "atomic, recompute or fastest: the triton backward's shared-dQ path (checked "
                                      "where read, backends/triton)",
    TEST_PLUGINS: "comma-separated plug-in modules (mod1,mod2) the test suite imports before collecting "
                  "(tests/conftest.py), so the registry-looping tests cover their variants; checked here, read by "
                  "the tests only",
}


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




def module_list(name: str) -> list[str]:
    """Environment variable `name` as comma-separated module names (`mod1, pkg.mod2`); [] when unset or empty.
    Raises UserError naming the variable and every entry that is not a dotted Python identifier."""
    modules = [m.strip() for m in os.environ.get(name, "").split(",") if m.strip()]
    bad = [m for m in modules if not all(part.isidentifier() for part in m.split("."))]
    if bad:
        raise UserError(f"{name}: {', '.join(map(repr, bad))} not a module name; expected comma-separated module "
                        "names such as my_alibi,pkg.variants")
    return modules


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
        elif name == TEST_PLUGINS:
            try:
                module_list(name)
            except UserError as exc:
                problems.append(str(exc))
        elif name not in OTHER_VARIABLES:
            known = [*SWITCHES, *OTHER_VARIABLES]
            problems.append(f"{name}: no such setting; {did_you_mean(name, known)}known: {', '.join(known)}")
    if problems:
        raise UserError("environment: " + "; ".join(problems))
