"""Benchmark outputs, each written atomically: results.json, results.md (tables), results.png
(time and peak memory against sequence length) and, with --profile, profiles.md."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_text
from ..figures import pyplot, save_figure

JSON, MARKDOWN, PLOT, PROFILES = "results.json", "results.md", "results.png", "profiles.md"


def machine() -> dict[str, Any]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(out: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(out / JSON, json.dumps(payload, indent=2, default=str) + "\n")


def _f(value: Any, fmt: str) -> str:
    """`value` formatted, "-" for None. A small negative value that rounds to zero (activation memory of a
    process whose RSS shrank by under 0.5 MB) reads "0", not "-0"."""
    if value is None:
        return "-"
    text = format(value, fmt)
    return text[1:] if text.startswith("-") and not any(c in "123456789" for c in text) else text


def markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    # a sweep with compiled points: which each row is, and its time over its eager twin's
    compiled = any(r.get("compile") == "on" for r in payload["results"])
    compile_head, compile_rule = (" compile |", "---|") if compiled else ("", "")
    eager_head, eager_rule = (" time / eager |", "---|") if compiled else ("", "")
    interrupted = []
    if not payload.get("complete", True):
        done = sum(r["status"] != "pending" for r in payload["results"])
        interrupted = [f"**Interrupted** after {done} of {len(payload['results'])} points: the others are pending.", ""]
    lines = [
        "# attention-zoo bench", "",
        f"Command: `{payload['command']}`", "",
        *interrupted,
        f"Machine: {payload['machine'].get('gpu') or 'CPU'}, {payload['machine']['cpu_count']} cores, "
        f"torch {payload['machine']['torch']} ({payload['machine']['torch_threads']} threads). "
        f"dim {s['dim']}, depth {s['depth']}, heads {s['heads']} x {s['head_dim']}, {s['dtype']} on {s['device']}; "
        f"median of {s['repeats']} steps after {s['warmup']} warm-up steps"
        + (f", median of {s['rounds']} interleaved rounds (ratios: the median of the ratios within each round)"
           if s["rounds"] > 1 else "") + ". "
        "Peak memory: " + ("torch.cuda.max_memory_allocated" if s["device"].startswith("cuda") else
                           "the point's process peak RSS (includes ~0.2-0.3 GB of Python and torch)")
        + "; ratios are to vanilla of the same implementation, backend, length, batch and mode"
        + (", compiled or not, and time / eager is a compiled point's time over the same point's without "
           "compile" if compiled else "") + " in this run."
        + (" Compiled: the model under torch.compile (inductor), compiled by one untimed step before the warm-up "
           "steps." if compiled else "")
        + (f" Point processes ran with {', '.join(f'{k}={v}' for k, v in s['env'].items())}." if s.get("env") else ""), "",
        f"| impl | variant | backend | seq | batch | mode |{compile_head} median s | tokens/s | peak MB | activation MB "
        f"| time / vanilla |{eager_head} memory / vanilla | status |",
        f"|---|---|---|---|---|---|{compile_rule}---|---|---|---|---|{eager_rule}---|---|",
    ]
    for r in payload["results"]:
        status = {"ok": "ok", "pending": "pending"}.get(r["status"], f"failed: {r.get('reason')}")
        if r.get("note"):
            status += f" ({r['note']})"
        compile_cell = f" {r.get('compile', 'off')} |" if compiled else ""
        eager_cell = f" {_f(r.get('time_vs_eager'), '.2f')} |" if compiled else ""
        lines.append(
            f"| {r['impl']} | {r['variant']} | {r['backend']} | {r['seq_len']} | {r['batch']} | {r['mode']} |{compile_cell}"
            f" {_f(r.get('median_s'), '.3f')} | {_f(r.get('tokens_per_s'), ',.0f')} | {_f(r.get('peak_mb'), ',.0f')} "
            f"| {_f(r.get('activation_mb'), ',.0f')} | {_f(r.get('time_vs_vanilla'), '.2f')} |{eager_cell}"
            f" {_f(r.get('memory_vs_vanilla'), '.2f')} | {status.replace('|', '/')} |")
    if payload.get("comparison"):
        lines += ["", "## Against x-transformers (same run)", "",
                  f"| variant | ours (backend) | x-transformers path | seq | batch | mode |{compile_head} ours s | peer s "
                  "| time ours / peer | ours MB | peer MB | memory ours / peer | activation ours / peer |",
                  f"|---|---|---|---|---|---|{compile_rule}---|---|---|---|---|---|---|"]
        for c in payload["comparison"]:
            compile_cell = f" {c.get('compile', 'off')} |" if compiled else ""
            lines.append(
                f"| {c['variant']} | {c['backend']} | {c['peer_backend']} | {c['seq_len']} | {c['batch']} | {c['mode']} "
                f"|{compile_cell} {_f(c['ours_s'], '.3f')} | {_f(c['peer_s'], '.3f')} | {_f(c['time_ours_over_peer'], '.2f')} "
                f"| {_f(c['ours_mb'], ',.0f')} | {_f(c['peer_mb'], ',.0f')} | {_f(c['memory_ours_over_peer'], '.2f')} "
                f"| {_f(c.get('activation_ours_over_peer'), '.2f')} |")
    return "\n".join(lines) + "\n"


def write_markdown(out: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(out / MARKDOWN, markdown(payload))


def write_profiles(out: Path, payload: dict[str, Any]) -> None:
    """One section per profiled point: torch.profiler's table of where one step's time went."""
    lines = ["# attention-zoo bench: profiles", "", f"Command: `{payload['command']}`", "",
             "One step per point under torch.profiler, after the timed steps; operators (kernels on CUDA) by the "
             "time spent in them alone. The profiler slows the step it watches: read shares, not totals.", ""]
    for row in payload["results"]:
        title = f"## {row['impl']} {row['variant']} on {row['backend']}, N={row['seq_len']} B={row['batch']} {row['mode']}"
        if "profile" in row:
            body = f"```text\n{row['profile'].rstrip()}\n```"
        else:
            body = f"not profiled: {row.get('reason', row['status'])}"
        lines += [title, "", body, ""]
    atomic_write_text(out / PROFILES, "\n".join(lines))


def write_plot(out: Path, payload: dict[str, Any]) -> None:
    plt = pyplot()

    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in payload["results"]:
        if r["status"] != "ok":
            continue
        label = (f"{r['impl']} {r['variant']} ({r['backend']}, {r['mode']}, B={r['batch']}"
                 + (", compiled)" if r.get("compile") == "on" else ")"))
        series.setdefault(label, []).append((r["seq_len"], r["median_s"], r["peak_mb"]))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    for label, pts in sorted(series.items()):
        pts.sort()
        n = [p[0] for p in pts]
        ax_t.plot(n, [p[1] for p in pts], marker="o", label=label)
        ax_m.plot(n, [p[2] for p in pts], marker="o", label=label)
    from matplotlib.ticker import ScalarFormatter

    lengths = sorted({p[0] for pts in series.values() for p in pts})
    for ax, what in ((ax_t, "median step time (s)"), (ax_m, "peak memory (MB)")):
        ax.set_xlabel("sequence length")
        ax.set_ylabel(what)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        if lengths:
            ax.set_xticks(lengths)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
    if series:
        ax_m.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"attention-zoo bench: {payload['settings']['dtype']} on {payload['settings']['device']}")
    save_figure(fig, out / PLOT, dpi=100, bbox_inches="tight")


__all__ = ["JSON", "MARKDOWN", "PLOT", "machine", "markdown", "write_json", "write_markdown", "write_plot"]
