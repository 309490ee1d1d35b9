"""Every distinct model of a sweep run once on the meta device before anything trains, as `validate` runs a
training config (dry_run.py: a forward with gradients on, then a backward): a plug-in variant that fails in either,
or settings that fail only once the model is built, are reported for every run at once, rather than each in its
own train.log when the sweep reaches it (perhaps hours in)."""
from __future__ import annotations

import json

from ..config import Config, ConfigError, Problem


def model_key(config: Config) -> str:
    """What the dry run reads of `config`: its plug-ins, backend and model section. Runs that differ only in
    their seed, data or train settings (a learning-rate grid) share one dry run."""
    return json.dumps({key: config[key] for key in ("plugins", "backend", "model")}, sort_keys=True, default=str)


def dry_run_problems(config: Config) -> list[Problem]:
    """The problems the meta-device dry run of `config` finds (a plug-in's forward or backward that raises, a layer
    that refuses its settings), each at the key that chose what failed; [] when it passes. Takes a fraction of a
    second whatever the model's size (no weights). A failure in the zoo's own code is raised as it is (a bug, as
    `validate` raises it)."""
    from ..dry_run import dry_run

    try:
        dry_run(config, train=True)  # planned for a CPU, as validate plans it
    except ConfigError as exc:
        return list(exc.problems)
    return []
