"""results.csv (one row per run) and results.md (one row per label: mean +- std over seeds), written
atomically from the records of finished runs."""
from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_text
from .records import metric_of
from .sweep import Sweep, settings_label, value_text

CSV_COLUMNS = ("label", "seed", "params", "steps", "train_loss", "val_loss", "val_bpb", "val_ppl", "val_accuracy",
               "tokens_per_s", "peak_mem_mb", "train_time_s", "wall_s", "settings", "run_dir")


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in records:
        row = {k: r.get(k) for k in CSV_COLUMNS}
        row.update({f"val_{k}": v for k, v in r["val"].items() if f"val_{k}" in CSV_COLUMNS})
        row["settings"] = " ".join(f"{k}={v}" for k, v in r["settings"].items())
        writer.writerow(row)
    atomic_write_text(path, buffer.getvalue())


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def grouped(sweep: Sweep, records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """label -> its records, in the sweep's run order (labels without results left out)."""
    groups = {label: [r for r in records if r["label"] == label] for label in sweep.labels}
    return {k: v for k, v in groups.items() if v}


def paired_differences(sweep: Sweep, groups: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    """label -> [metric(label, seed) - metric(baseline, seed)] over the seeds both finished, in seed order.

    A paired comparison: one seed fixes the batch order for every run (the batch sampler is seeded from
    train.seed alone), so a difference on the same seed has the data's luck removed; it is what an
    A/B claim should be judged on, rather than two overlapping mean +- std."""
    base = groups.get(sweep.baseline, [])
    return {label: _per_seed_differences(rs, base, sweep.metric) for label, rs in groups.items()
            if label != sweep.baseline}


def _per_seed_differences(records: list[dict[str, Any]], base: list[dict[str, Any]], metric: str) -> list[float]:
    """metric(record) - metric(base record of the same seed), over the seeds both have, in seed order."""
    by_seed = {r["seed"]: v for r in base if (v := metric_of(r, metric)) is not None}
    return [v - by_seed[r["seed"]] for r in sorted(records, key=lambda r: r["seed"])
            if r["seed"] in by_seed and (v := metric_of(r, metric)) is not None]


def _paired_cell(diffs: list[float], higher_is_better: bool) -> str:
    if not diffs:
        return "-"
    mean, std = mean_std(diffs)
    better = sum((d > 0) if higher_is_better else (d < 0) for d in diffs)
    spread = f" ± {std:.4f}" if len(diffs) > 1 else ""
    return f"{mean:+.4f}{spread} (better in {better}/{len(diffs)})"


def _row(cells: list[str]) -> str:
    """A markdown table row. A `|` inside a cell (a run named `a|b`, a string value) would end the cell and shift
    the row's columns: escaped."""
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def markdown_table(sweep: Sweep, records: list[dict[str, Any]]) -> str:
    groups = grouped(sweep, records)
    metric = sweep.metric
    extra = [m for m in ("val.loss", "val.accuracy") if m != metric and any(metric_of(r, m) is not None for r in records)]
    means = {label: mean_std([v for r in rs if (v := metric_of(r, metric)) is not None])[0]
             for label, rs in groups.items() if any(metric_of(r, metric) is not None for r in rs)}
    best = (max if sweep.higher_is_better else min)(means, key=means.get) if means else None
    arrow = "higher is better" if sweep.higher_is_better else "lower is better"
    paired = paired_differences(sweep, groups) if sweep.baseline else None
    versus = [f"Δ vs {sweep.baseline}, paired"] if paired is not None else []
    header = ["run", "params", f"{metric} ({arrow})", *versus, *extra, "train loss", "tokens/s", "peak mem (MB)",
              "seeds"]
    lines = [_row(header), "|" + "---|" * len(header)]
    for label, rs in groups.items():
        main = _fmt([v for r in rs if (v := metric_of(r, metric)) is not None])
        cells = [label, f"{rs[0]['params']:,}", f"**{main}**" if label == best and len(groups) > 1 else main,
                 *(["(baseline)" if label == sweep.baseline else _paired_cell(paired[label], sweep.higher_is_better)]
                   if paired is not None else []),
                 *(_fmt([v for r in rs if (v := metric_of(r, m)) is not None]) for m in extra),
                 _fmt([r["train_loss"] for r in rs]),
                 f"{statistics.fmean(r['tokens_per_s'] for r in rs):,.0f}",
                 f"{statistics.fmean(r['peak_mem_mb'] for r in rs):,.0f}", str(len(rs))]
        lines.append(_row(cells))
    missing = [label for label in sweep.labels if label not in groups]
    total = len(sweep.runs)
    head = f"## {sweep.name}\n\n" + (f"{sweep.description.strip()}\n\n" if sweep.description.strip() else "")
    head += f"{len(records)} of {total} runs finished; mean ± std over seeds {sweep.seeds}; best {metric} in bold.\n\n"
    if paired is not None:
        head += (f"Δ: the run's {metric} minus {sweep.baseline}'s on the same seed (same batches), mean ± std over "
                 "the seeds both finished, and on how many of them the run did better.\n\n")
    tail = f"\nNo results yet: {', '.join(missing)}\n" if missing else ""
    device = sorted({r.get("device", "?") for r in records})
    foot = (f"\nDevice: {', '.join(device)}. Peak memory: GPU, the peak allocated by tensors; CPU, the training "
            "process's peak resident set (it includes ~0.3-0.5 GB of Python and torch runtime).\n")
    return head + "\n".join(lines) + "\n" + tail + foot + (tuned_table(sweep, groups) if sweep.tune else "")


def tuned_table(sweep: Sweep, groups: dict[str, list[dict[str, Any]]]) -> str:
    """The sweep's settings each at its own best value of the `tune:` keys (e.g. each variant at its best learning
    rate), chosen by the metric's mean over seeds, with the paired Δ to the baseline's setting at its best: the
    comparison a claim against a baseline should rest on, since one shared value may suit one setting more than
    another. A best value at either end of a tuned key's grid (or its only value) is flagged: the optimum may lie
    outside it. The choice is made on the metric it reports, which flatters every row alike.

    A setting's values are compared on the seeds all of them finished (a half-finished sweep has some values on
    more seeds than others, and a mean over other seeds differs by the seeds' luck, not the value's); with no
    seed in common, each on its own seeds, and the row says so."""
    metric, pick = sweep.metric, (max if sweep.higher_is_better else min)
    settings_of_label = {r.label: r.settings for r in sweep.runs}
    per_seed = {label: {r["seed"]: v for r in rs if (v := metric_of(r, metric)) is not None}
                for label, rs in groups.items()}
    candidates: dict[str, list[str]] = {}  # setting -> its labels with results, one per tuned value
    for label in sweep.labels:
        if per_seed.get(label):
            candidates.setdefault(sweep.setting_of.get(label, label), []).append(label)
    means: dict[str, float] = {}  # label -> its mean over the seeds its setting's values are compared on
    compared_on: dict[str, list[int]] = {}  # setting -> those seeds ([]: none in common)
    for setting, labels in candidates.items():
        compared_on[setting] = sorted(set.intersection(*(set(per_seed[label]) for label in labels)))
        for label in labels:
            means[label] = statistics.fmean(per_seed[label][s] for s in compared_on[setting] or per_seed[label])
    best = {setting: pick(labels, key=means.get) for setting, labels in candidates.items()}  # a tie: the first
    base_setting = sweep.setting_of.get(sweep.baseline) if sweep.baseline else None
    keys = ", ".join(sweep.tune)
    lines = [f"\n### Each setting at its best {keys}\n",
             f"The value of {keys} with the best mean {metric} over the seeds all the setting's values finished; "
             + (f"Δ: paired per seed against {base_setting} at its best. " if base_setting in best else "")
             + "Chosen on the metric shown, which flatters every row alike.\n",
             _row(["setting", f"best {keys}", metric, *(["Δ, paired"] if base_setting in best else []),
                   "mean at each value"]),
             "|---|---|---|" + ("---|" if base_setting in best else "") + "---|"]
    for setting, label in best.items():
        values = settings_of_label[label]
        tuned = label in sweep.tuned_at
        if not tuned:
            chosen = "not tuned (a named run)"
        else:
            chosen = settings_label(values, sweep.tune)
            chosen += " (grid's edge)" if any(i in (0, n - 1) for i, n in sweep.tuned_at[label].values()) else ""
        rs = groups[label]
        cells = [setting, chosen, _fmt([v for r in rs if (v := metric_of(r, metric)) is not None])]
        if base_setting in best:
            cells.append("(baseline)" if setting == base_setting else
                         _paired_cell(_per_seed_differences(rs, groups[best[base_setting]], metric),
                                      sweep.higher_is_better))
        if not tuned:
            cells.append("-")
        else:
            at_each = ", ".join(f"{' '.join(value_text(settings_of_label[other][k]) for k in sweep.tune)}: "
                                f"{means[other]:.4f}" for other in candidates[setting])
            on = compared_on[setting]
            if not on:
                at_each += " (no seed finished at every value: each over its own seeds)"
            elif any(len(per_seed[other]) != len(on) for other in candidates[setting]):
                at_each += f" (over seed{'s' if len(on) > 1 else ''} {', '.join(map(str, on))}: those every value finished)"
            cells.append(at_each)
        lines.append(_row(cells))
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, sweep: Sweep, records: list[dict[str, Any]]) -> str:
    text = markdown_table(sweep, records)
    atomic_write_text(path, text)
    return text

