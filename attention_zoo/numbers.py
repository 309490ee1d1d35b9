"""The one rule every configured number follows: finite.

YAML reads `.nan`, `.inf` and `-.inf` as floats, and every comparison with NaN is false, so a bound such
as `minimum=0` lets NaN through and an upper bound lets +inf through; the run then fails far from the
config, with a traceback. The shared field checks (`config.validate_fields` for `Field`s, and
`variant_registry.check_params` for variant `Param`s) apply this rule to every value before its bounds,
unless the field declares `finite=False` (its doc then says what NaN or an infinity means there).
"""
from __future__ import annotations

import argparse
import math
import numbers
from typing import Any

FINITE_MESSAGE = "must be a finite number (NaN and infinities are not accepted)"


def non_finite(value: Any) -> str | None:
    """Where `value` holds a NaN or an infinity: "" for the value itself, "[i]" (or "[i][j]") for an item of
    a list; None when it holds none. Lists are walked; mappings are not (their keys are checked each by its
    own field, with its own key path)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else ""
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            where = non_finite(item)
            if where is not None:
                return f"[{i}]{where}"
    return None


def finite_problem(value: Any, spec: Any = None) -> str | None:
    """The message for a value that breaks the rule, or None. `spec` (a Field or Param) opts out with
    `finite=False`."""
    if spec is not None and not getattr(spec, "finite", True):
        return None
    where = non_finite(value)
    if where is None:
        return None
    return FINITE_MESSAGE if not where else f"item {where} {FINITE_MESSAGE}"






def is_whole(value: Any) -> bool:
    """Whether `value` is an integer a user meant as a count or an id: any Integral but a bool (True is an int
    to Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


SEED_MAX = 2**64 - 1
SEED_RANGE = "must be an integer from 0 to 2**64 - 1 (torch's seed range)"


def seed_problem(value: int) -> str | None:
    """The message for a seed (an int) outside 0 to 2**64 - 1, else None. torch's generators take unsigned 64-bit
    seeds: a larger one raised inside torch ("Overflow when unpacking long long"), and a negative one is read modulo
    2**64 (manual_seed(-1) is manual_seed(2**64 - 1)), so it would silently repeat another seed's run."""
    if 0 <= value <= SEED_MAX:
        return None
    if -(2**63) <= value < 0:
        return (f"must be an integer from 0 to 2**64 - 1: torch would read {value} as {value % 2**64}, the seed of "
                "another run")
    return SEED_RANGE


def finite_float(text: str) -> float:
    """argparse `type=` for a command-line number under the same rule: argparse prints
    `argument --x: 'nan' must be a finite number ...` and exits with status 2."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} {FINITE_MESSAGE}")
    return value


__all__ = ["FINITE_MESSAGE", "SEED_MAX", "SEED_RANGE", "finite_float", "finite_problem", "is_whole", "non_finite",
           "seed_problem"]
