"""The ATTENTION_ZOO_* switches read from the environment, parsed one way: a typo is an error, never a
silent "on" (`ATTENTION_ZOO_CPU_KERNEL=off` used to mean enabled, since only "0" turned it off)."""
from __future__ import annotations

import os
from typing import Mapping

from .errors import UserError

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


# Every switch the library reads, with its default.
SWITCHES = {"ATTENTION_ZOO_CPU_KERNEL": True, "ATTENTION_ZOO_SPLIT_BACKWARD": True,
            "ATTENTION_ZOO_TRITON_AUTOTUNE": True}
TEST_PLUGINS = "ATTENTION_ZOO_TEST_PLUGINS"
# Variables that take one word of a list (read where they are used; checked here with the rest).
WORDS = {"ATTENTION_ZOO_TRITON_SHARED_DQ": ("atomic", "recompute", "fastest")}
# The variables that are not on/off switches, with what they take.
OTHER_VARIABLES = {
    "ATTENTION_ZOO_TRITON_SHARED_DQ": f"{', '.join(WORDS['ATTENTION_ZOO_TRITON_SHARED_DQ'])}: the triton backward's "
                                      "shared-dQ path (backends/triton_tuning.py)",
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
    return _flag(name, os.environ.get(name, ""), default)


def _flag(name: str, raw: str, default: bool) -> bool:
    raw = raw.strip()
    if not raw:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise UserError(f"{name}={raw!r}: expected {'/'.join(_TRUE)} or {'/'.join(_FALSE)} (unset: "
                    f"{'on' if default else 'off'})")


def env_word(name: str) -> str | None:
    """Environment variable `name` (a key of WORDS) as one of its words; None when unset or empty. Raises
    UserError naming the variable, its value and the words."""
    return _word(name, os.environ.get(name, ""))


def _word(name: str, raw: str) -> str | None:
    raw = raw.strip()
    if raw and raw not in WORDS[name]:
        raise UserError(f"{name}={raw!r}: expected one of {', '.join(WORDS[name])}")
    return raw or None


def module_list(name: str) -> list[str]:
    """Environment variable `name` as comma-separated module names (`mod1, pkg.mod2`); [] when unset or empty.
    Raises UserError naming the variable and every entry that is not a dotted Python identifier."""
    return _modules(name, os.environ.get(name, ""))


def _modules(name: str, raw: str) -> list[str]:
    modules = [m.strip() for m in raw.split(",") if m.strip()]
    bad = [m for m in modules if not all(part.isidentifier() for part in m.split("."))]
    if bad:
        raise UserError(f"{name}: {', '.join(map(repr, bad))} not a module name; expected comma-separated module "
                        "names such as my_alibi,pkg.variants")
    return modules


def check_environment(environ: Mapping[str, str] | None = None, where: str = "environment") -> None:
    """Every ATTENTION_ZOO_* variable of `environ` (default: this process's environment), checked before a command
    does any work (a switch is otherwise read only where its code runs, after a run has started, or never): a bad
    value, or a name no code reads (a typo such as ATTENTION_ZOO_CPU_KERNAL=0 would be ignored), raises one
    UserError listing them all, headed by `where` (`bench --env` checks what it hands its worker processes)."""
    from .registry import did_you_mean

    environ = os.environ if environ is None else environ
    problems = []
    for name in sorted(n for n in environ if n.startswith("ATTENTION_ZOO_")):
        raw = environ[name]
        try:
            if name in SWITCHES:
                _flag(name, raw, SWITCHES[name])
            elif name in WORDS:
                _word(name, raw)
            elif name == TEST_PLUGINS:
                _modules(name, raw)
            else:
                known = [*SWITCHES, *OTHER_VARIABLES]
                problems.append(f"{name}: no such setting; {did_you_mean(name, known)}known: {', '.join(known)}")
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        raise UserError(f"{where}: " + "; ".join(problems))


def busy_cpu_hint(command: str, device: str) -> str | None:
    """A line for `attention-zoo COMMAND` on a CPU that is already busy (1-minute load average within half a core
    of the core count) while OMP_WAIT_POLICY is unset: torch's OpenMP threads then wait by spinning, which made a
    quickstart step 20x slower on 2 shared cores, and train 22x and generate 4x slower at a load of 1.8
    (docs/training.md, "CPU threads"). `ablate` sets PASSIVE for its runs; elsewhere the choice stays the
    user's (PASSIVE costs ~1.2x on a quiet machine), so this only says so. None on a quiet CPU or a GPU."""
    if device not in ("cpu", "auto") or "OMP_WAIT_POLICY" in os.environ or not hasattr(os, "getloadavg"):
        return None
    import torch

    if device == "auto" and torch.cuda.is_available():
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load < cores - 0.5:
        return None
    return (f"attention-zoo {command}: this CPU is busy (load {load:.1f} on {cores} cores): torch's threads wait by "
            f"spinning and may run many times slower; OMP_WAIT_POLICY=PASSIVE attention-zoo {command} ... avoids it "
            "(docs/training.md, CPU threads)")


def say_if_cpu_is_busy(command: str, device: str) -> None:
    """Print busy_cpu_hint(command, device), if any, on stderr (stdout may be the command's output)."""
    import sys

    if hint := busy_cpu_hint(command, device):
        print(hint, file=sys.stderr)
