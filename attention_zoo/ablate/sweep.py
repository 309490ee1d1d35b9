"""Sweep files: a base config, a grid and/or named runs, seeds, and the metric to compare.

    base: ../train/shakespeare_tiny.yaml      # required: a config file (relative to this file) or an inline mapping
    grid:                                      # every combination of these key paths
      model.attention.variant: [vanilla, selective]
      model.heads: [4, 8]
    runs:                                      # named combinations, added to the grid's
      selective+gqa: {model.attention.variant: selective, model.attention.kv_heads: 2}
    seeds: [0, 1]                              # each run once per seed (sets train.seed)
    metric: val.loss                           # val.loss | val.bpb | val.ppl | val.accuracy | train_loss
    baseline: vanilla                          # optional: a run label; the table adds each run's paired
                                               # difference to it (same seed: same init seed, same batches)
    tune: [train.lr]                           # optional: grid keys every other setting is tuned over; a second
                                               # table compares each setting at its own best value of them

With neither grid nor runs, the sweep is its base, once per seed (the spread over seeds). Every run's config
is built and validated (model, data and train together, and each distinct model's dry run on the meta device,
forward and backward, as `validate` runs it) before anything trains, and every problem of every run is reported
at once, each naming the runs it affects.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import (
    SECTIONS,
    Config,
    ConfigError,
    Field,
    Problem,
    apply_override,
    deep_merge,
    load_config,
    missing_base,
    params_kept,
    read_yaml_chain,
    read_yaml_file,
    resolve_file_keys,
    validate_fields,
)
from ..data import DataError, build_dataset
from ..numbers import is_whole, seed_problem
from ..registry import import_plugins
from .dry_runs import dry_run_problems, model_key

METRICS = ("val.loss", "val.bpb", "val.ppl", "val.accuracy", "train_loss")
HIGHER_IS_BETTER = {"val.accuracy"}

SWEEP_FIELDS = {
    "name": Field((str, type(None)), None, "a title for the results table"),
    # Required: without it every run would silently train the library's defaults, which no sweep means.
    "base": Field((str, dict), doc="the config every run starts from: a config file (relative to the sweep "
                  "file) or an inline config mapping; grid and runs say what each run changes"),
    "grid": Field(dict, {}, "key path -> list of values; every combination runs"),
    "runs": Field(dict, {}, "name -> {key path: value}; explicit runs, added to the grid's"),
    "seeds": Field(list, [0], "train.seed values; every run once per seed"),
    "metric": Field(str, "val.loss", "the number to compare", choices=METRICS),
    "description": Field(str, "", "free text, copied above the results table"),
    "baseline": Field((str, type(None)), None, "a run label: the table adds each run's paired difference to it"),
    "tune": Field(list, [], "grid key paths every other setting is tuned over: results.md adds a table of each "
                  "setting at its own best value of them (by the metric's mean over seeds)"),
}


def folder_name(label: str) -> str:
    """The folder a run of `label` trains in (OUT/<folder>/seed<k>): the label with anything unusual replaced."""
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", label).strip("_") or "base"


@dataclass
class Run:
    label: str  # shown in tables and plots: the run's name, or its grid values
    seed: int
    settings: dict[str, Any]  # key path -> value, on top of the base
    config: Config = field(repr=False, default=None)

    @property
    def slug(self) -> str:
        """A folder name: the label with anything unusual replaced."""
        return folder_name(self.label)

    @property
    def fingerprint(self) -> str:
        """Identifies the exact config, so a changed sweep never reuses an old result."""
        return hashlib.sha256(json.dumps(dict(self.config), sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Sweep:
    path: Path
    name: str
    description: str
    metric: str
    seeds: list[int]
    runs: list[Run]
    baseline: str | None = None  # a label; results.md adds each run's per-seed difference to it
    tune: list[str] = field(default_factory=list)  # grid keys each setting is tuned over (summary.tuned_table)
    setting_of: dict[str, str] = field(default_factory=dict)  # with tune: label -> its setting's label, tune keys left out
    # with tune: grid label -> {tuned key: (index of its value in that key's grid list, the list's length)}; a named
    # run has none (it is not tuned, whatever keys it sets). Positions, not values: values may be unhashable or
    # compare equal across types (1, 1.0, True), and a named run's value is not a grid value.
    tuned_at: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)

    def only_seeds(self, seeds: list[int]) -> Sweep:
        """The same sweep restricted to `seeds` (each one of its own). Raises ConfigError naming `--seeds`."""
        unknown = [s for s in seeds if s not in self.seeds]
        if unknown or not seeds:
            raise ConfigError([Problem("--seeds", "(option)", ",".join(map(str, seeds)),
                                       f"expected some of this sweep's seeds: {', '.join(map(str, self.seeds))}")])
        kept = [s for s in self.seeds if s in seeds]
        return dataclasses.replace(self, seeds=kept, runs=[r for r in self.runs if r.seed in kept])

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(r.label for r in self.runs))

    @property
    def higher_is_better(self) -> bool:
        return self.metric in HIGHER_IS_BETTER


def set_key(data: dict, path: str, value: Any) -> str | None:
    """Set `a.b.c` (list items by index) to `value`; an error message, or None."""
    parts = path.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return f"no list item {part!r} in {'.'.join(parts[:i]) or 'the config'}"
            if last:
                node[int(part)] = copy.deepcopy(value)
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = copy.deepcopy(value)
            else:
                node = node.setdefault(part, {})
        else:
            return f"cannot set a key inside {'.'.join(parts[:i])} (a {type(node).__name__})"
    return None


def _short(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def value_text(value: Any) -> str:
    """A setting's value as labels show it: YAML's `null` for None, else str()."""
    return "null" if value is None else str(value)


def settings_label(settings: dict[str, Any], keys: list[str]) -> str:
    """`variant=selective kv_heads=2`: the last part of each key path, unless two keys share it."""
    shorts = [_short(k) for k in keys]
    names = [s if shorts.count(s) == 1 else k for s, k in zip(shorts, keys)]
    return " ".join(f"{n}={value_text(settings[k])}" for n, k in zip(names, keys)) or "base"


def read_sweep_file(path: str | Path, sets: list[str] = ()) -> Sweep:
    """Parse and validate a sweep file and every run it describes. Raises ConfigError listing every
    problem (sweep keys, base config, each run's config and data, and what the meta-device dry run of each
    distinct model finds: a plug-in whose forward or backward raises), before anything is trained."""
    path = Path(path)
    source = str(path)
    raw, problems = read_yaml_file(path)
    if problems:
        raise ConfigError(problems)
    raw = raw or {}
    spec, problems = validate_fields(raw, SWEEP_FIELDS, "sweep", source)
    for p in problems:
        p.path = p.path.removeprefix("sweep.")
    problems += _check_shape(spec, source)
    if problems:
        raise ConfigError(problems)

    base = spec["base"]
    if isinstance(base, str):
        # the base file's own problems name that file, as the user would write it (relative to the working directory)
        base_path = os.path.normpath(path.parent / base)
        if not os.path.exists(base_path):  # said at this file's `base`, not as a config file that is not there
            raise ConfigError([missing_base(source, base, base_path)])
        base = load_config(base_path, sets)
        base_raw = dict(base)
    else:
        if not base:  # `base: {}` is the library's defaults, as a missing base was
            raise ConfigError([Problem(source, "base", base, "empty; give the config every run starts from (a file, "
                                                         "or a mapping with at least its model section)")])
        base_raw = copy.deepcopy(base)
        problems += resolve_file_keys(base_raw, path, source, source)  # a data.text beside the sweep file
        for s in sets:  # parsed as `train` parses its overrides
            if (problem := apply_override(base_raw, s, "--set")) is not None:
                problems.append(problem)
    if problems:
        raise ConfigError(problems)

    combos: list[tuple[str, dict]] = []
    keys = list(spec["grid"])
    positions: dict[str, tuple[int, ...]] = {}  # grid label -> the index of each key's value in its grid list
    for index in itertools.product(*(range(len(spec["grid"][k])) for k in keys)) if keys else ():
        settings = {k: spec["grid"][k][i] for k, i in zip(keys, index)}
        combos.append((settings_label(settings, keys), settings))
        positions[combos[-1][0]] = index
    grid_labels = {label for label, _ in combos}
    combos += [(str(name), dict(settings or {})) for name, settings in spec["runs"].items()]
    if not combos:
        combos = [("base", {})]
    labels = [label for label, _ in combos]
    for label in sorted({name for name in labels if labels.count(name) > 1}):
        problems.append(Problem(source, "runs", label, "two runs have this label; rename the named run"))

    problems += _folder_problems(labels, set(map(str, spec["runs"])), source)

    if spec["baseline"] is not None and spec["baseline"] not in labels:
        problems.append(Problem(source, "baseline", spec["baseline"],
                                f"not a run of this sweep; valid: {', '.join(map(repr, labels))}"))
    problems += [Problem(source, "tune", key, f"not a grid key; valid: {', '.join(keys) or 'none (the sweep has no grid)'}")
                 for key in spec["tune"] if key not in keys]
    repeated = []  # by equality, not hashing: a wrong-typed entry may be a list
    for i, key in enumerate(spec["tune"]):
        if key in spec["tune"][:i] and key not in repeated:
            repeated.append(key)
    problems += [Problem(source, "tune", key, "listed more than once; list each key once") for key in repeated]
    setting_of, tuned_at = {}, {}
    if spec["tune"]:  # a grid run's setting is its grid values but the tuned ones; a named run is its own setting
        others = [k for k in keys if k not in spec["tune"]]
        setting_of = {label: settings_label(settings, others) if label in grid_labels else label
                      for label, settings in combos}
        tuned_at = {label: {k: (index[keys.index(k)], len(spec["grid"][k])) for k in spec["tune"] if k in keys}
                    for label, index in positions.items()}
        # A named run whose label is a setting's (`variant=vanilla`, or `base` with every grid key tuned) would be
        # compared with that setting's runs as one more of its tuned values.
        setting_labels = {setting_of[label] for label in grid_labels}
        problems += [Problem(source, "runs", str(name), "also the label of a setting of the grid tuned over "
                             f"{', '.join(map(str, spec['tune']))}; rename the named run")
                     for name in spec["runs"] if str(name) in setting_labels]

    # Seed-major: a sweep stopped half-way has every variant once rather than some variants twice.
    runs = [Run(label, seed, settings) for seed in spec["seeds"] for label, settings in combos]
    problems += _build_configs(runs, base_raw, spec["metric"], source)
    if problems:
        raise ConfigError(problems)
    return Sweep(path, spec["name"] or path.stem, spec["description"], spec["metric"], spec["seeds"], runs,
                 spec["baseline"], spec["tune"], setting_of, tuned_at)


def _folder_problems(labels: list[str], named: set[str], source: str) -> list[Problem]:
    """Runs of distinct labels must train in distinct folders: two labels the folder name makes one (`lr 1` and
    `lr/1`) would share a run folder, and a name of dots (`..`) is the sweep's own folder or lies outside it."""
    by_folder: dict[str, list[str]] = {}
    for label in dict.fromkeys(labels):
        by_folder.setdefault(folder_name(label), []).append(label)
    problems = []
    for folder, same in by_folder.items():
        key = "runs" if named.issuperset(same) else "grid"
        if set(folder) == {"."}:
            problems += [Problem(source, key, label, f"the label makes the folder name {folder!r}, which is no folder "
                                 "of its own; rename the run") for label in same]
        elif len(same) > 1:
            problems.append(Problem(source, key, same, f"these runs' labels make one folder name, {folder!r}; "
                                    "rename one"))
    return problems


def _check_shape(spec: dict, source: str) -> list[Problem]:
    problems = []
    # A key path must be text: YAML reads `1:` or `null:` as a number or None, which set_key cannot split.
    problems += [Problem(source, "grid", key, "expected a key path such as model.depth (text), as every grid key")
                 for key in spec.get("grid", {}) if not isinstance(key, str)]
    problems += [Problem(source, "grid", key, message) for key in spec.get("grid", {})
                 if (message := _empty_key_problem(key, "a grid key")) is not None]
    for key, values in spec.get("grid", {}).items():
        if not isinstance(values, list) or not values:
            problems.append(Problem(source, f"grid.{key}", values, "expected a non-empty list of values"))
    for name, settings in spec.get("runs", {}).items():
        if settings is not None and not isinstance(settings, dict):
            problems.append(Problem(source, f"runs.{name}", settings, "expected a mapping {key.path: value}"))
        problems += [Problem(source, f"runs.{name}", key, "expected a key path such as model.depth (text), as every "
                             "key of a run") for key in (settings if isinstance(settings, dict) else ())
                     if not isinstance(key, str)]
        problems += [Problem(source, f"runs.{name}", key, message)
                     for key in (settings if isinstance(settings, dict) else ())
                     if (message := _empty_key_problem(key, "a key of a run")) is not None]
    seeds = spec.get("seeds", [0])
    if not seeds or not all(is_whole(s) for s in seeds) or len(set(seeds)) != len(seeds):
        problems.append(Problem(source, "seeds", seeds, "expected a non-empty list of distinct integers"))
    else:  # each becomes a run's train.seed: named here, at the key that holds it, not as every run's train.seed
        problems += [Problem(source, "seeds", s, problem) for s in seeds if (problem := seed_problem(s)) is not None]
    return problems


def _empty_key_problem(key: object, what: str) -> str | None:
    """What is wrong with text key `key` of the grid or a run, when it is empty or has an empty part (set_key made
    `""` a config section of that name, reported as "unknown section"); None otherwise, or for a key not text."""
    if not isinstance(key, str):
        return None
    example = f"{what} is a dotted config path such as model.attention.variant"
    if not key.strip():
        return f"an empty key path; {example}"
    if not all(part.strip() for part in key.split(".")):
        return f"the key path has an empty part; {example}"
    return None


VARIANT_KEY = "model.attention.variant"


def _keep_what_the_variant_declares(raw: dict, settings: dict[str, Any]) -> None:
    """A run whose `model.attention.variant` names another variant than the base's keeps only the base's attention
    options that variant declares, as a `layers:` override does (config.params_kept): the base's
    `selection_head` is the base variant's, not something a `variant: vanilla` run asked for. Keys the run sets
    itself are set after this and validated as given (one the new variant does not declare is refused).

    The base's `plugins:` are imported first (a plug-in variant is known by name only then), and an inline base's
    own `base:` file is merged into `raw` here, as load_config would merge it later, since the options to drop may
    come from that file and a merge can add keys, not remove them. Changes `raw` in place; raises
    nothing (an unreadable `base:` or a plug-in that fails to import is load_config's to report)."""
    if VARIANT_KEY not in settings:
        return
    if isinstance(plugins := raw.get("plugins"), list) and all(isinstance(m, str) for m in plugins):
        import_plugins(plugins)
    if isinstance(raw.get("base"), str):
        parent, problems = read_yaml_chain(Path(raw["base"]).resolve(), names=(raw["base"],))
        if not problems:
            merged = deep_merge(parent, {k: v for k, v in raw.items() if k != "base"})
            raw.clear()
            raw.update(merged)
    model = raw.get("model")
    attention = model.get("attention") if isinstance(model, dict) else None
    if isinstance(attention, dict):
        model["attention"] = params_kept(attention, attention.get("variant", "vanilla"), settings[VARIANT_KEY])


def _build_configs(runs: list[Run], base_raw: dict, metric: str, source: str) -> list[Problem]:
    """Validate every run's config and data, and dry-run each distinct model (finished runs too: the sweep file
    does not know which are); a problem shared by several runs is reported once."""
    from ..train.loop import init_from_problem, plan_run

    found: dict[tuple[str, str, str], tuple[Problem, list[str]]] = {}
    datasets: dict[str, Any] = {}  # one dataset per distinct data section: corpora load once
    dry_runs: dict[str, list[Problem]] = {}  # one meta-device dry run per distinct model (not per seed or lr)

    def note(problem: Problem, label: str) -> None:
        key = (problem.path, repr(problem.value), problem.message)
        found.setdefault(key, (problem, []))[1].append(label)

    def metric_checked(section: dict, label: str) -> Any:
        """The dataset of validated data section `section` (built once per distinct section), after noting for run
        `label` the problem of a metric it does not report, or of building it (a DataError); None when it could not
        be built. A run whose model or train section is wrong is checked too: a metric's problem is then named for
        every run it concerns ("every run"), not only for the runs valid so far, and with their other problems."""
        data_key = json.dumps(section, sort_keys=True, default=str)
        if data_key not in datasets:
            try:
                datasets[data_key] = build_dataset(section, source=source)
            except DataError as exc:
                datasets[data_key] = Problem(source, exc.key, exc.value, exc.hint)
        if isinstance(built := datasets[data_key], Problem):
            note(built, label)
            return None
        if (msg := _metric_problem(metric, built)) is not None:
            note(Problem(source, "metric", metric, msg), label)
        return built

    for run in runs:
        raw = copy.deepcopy(base_raw)
        _keep_what_the_variant_declares(raw, run.settings)
        for key, value in run.settings.items():
            if (msg := set_key(raw, key, value)) is not None:
                note(Problem(source, key, value, msg), run.label)
        if any(key in ("data", "data.text") for key in run.settings):  # the sweep file set data.text
            for problem in resolve_file_keys(raw, Path(source), source, source):
                note(problem, run.label)
        set_key(raw, "train.seed", run.seed)
        try:
            config = load_config(raw)
        except ConfigError as exc:
            for p in exc.problems:
                note(p, run.label)
            if "base" not in raw:  # (a base mapping's own `base:` file would hold the data section)
                section, section_problems = SECTIONS["data"](raw.get("data"), source)
                if not section_problems:  # needs only the data section: reported with the rest, not after
                    metric_checked(section, run.label)
            continue
        config.source = f"{source} [{run.label}]"
        run.config = config
        if (key := model_key(config)) not in dry_runs:
            dry_runs[key] = dry_run_problems(config)
        for problem in dry_runs[key]:
            note(problem, run.label)
        if (init_from := config["train"].get("init_from")) is not None:  # as train checks it, weights unread
            try:
                problem = init_from_problem(init_from, config, one_line=True)
            except ConfigError as exc:  # the checkpoint's own config.yaml is invalid
                problem = "its config.yaml: " + "; ".join(map(str, exc.problems))
            if problem is not None:
                note(Problem(source, "train.init_from", init_from, problem), run.label)
        if (dataset := metric_checked(config["data"], run.label)) is None:  # a data problem, noted
            continue
        try:
            plan_run(config, dataset=dataset)
        except ConfigError as exc:
            for p in exc.problems:
                note(p, run.label)
            continue
        except DataError as exc:
            note(Problem(source, exc.key, exc.value, exc.hint), run.label)
            continue

    problems = []
    every = {r.label for r in runs}
    for problem, labels in found.values():
        labels = list(dict.fromkeys(labels))
        which = "every run" if set(labels) == every else "runs: " + ", ".join(labels)
        problem.source = f"{source} ({which})"
        problems.append(problem)
    return problems


def _metric_problem(metric: str, dataset) -> str | None:
    """Can a run on `dataset` report `metric`? A task has accuracy and no bits per byte; a corpus the reverse. Asked
    of the dataset alone (one example of a task, one token of a corpus), so that it holds whatever else is wrong."""
    if not metric.startswith("val.") or metric == "val.loss":
        return None
    try:
        batch = next(iter(dataset.eval_batches("val", 1, dataset.fixed_seq_len or 1, 1)))
    except (DataError, StopIteration):  # a split too short for even that: plan_run names it
        return None
    tokenized = getattr(dataset, "bytes_per_token", None) is not None  # data.tokenizer: bpb over its bytes
    has = {"val.accuracy": batch.metric_mask is not None,
           "val.bpb": batch.metric_mask is None and (dataset.vocab_size == 256 or tokenized),
           "val.ppl": batch.metric_mask is None and dataset.vocab_size != 256 and not tokenized}
    if has[metric]:
        return None
    offer = [m for m, ok in has.items() if ok] + ["val.loss"]
    return f"dataset {dataset.name!r} does not report it; valid here: {', '.join(offer)}"
