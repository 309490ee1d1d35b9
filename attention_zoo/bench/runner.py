"""Run a sweep: every point in its own subprocess, results gathered, ratios to vanilla (and of a compiled point
to its eager twin) computed.

A point that fails, runs out of memory or times out is recorded with its reason; the sweep goes on.
With several rounds the whole sweep is repeated in interleaved order (so background load hits every
point alike) and each point keeps the median of its rounds. Results are rewritten after every point.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .points import BASELINE, OURS, PEER, Point
from .worker import RESULT_PREFIX

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # so workers import this checkout even when not installed


@dataclass
class Outcome:
    point: Point
    rounds: list[dict[str, Any]]

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.rounds if r.get("status") == "ok"]

    def summary(self) -> dict[str, Any]:
        ok = self.ok
        row: dict[str, Any] = {"impl": self.point.impl, "variant": self.point.variant.label, "backend": self.point.backend,
                               "seq_len": self.point.seq_len, "batch": self.point.batch, "mode": self.point.mode,
                               "dtype": self.point.dtype, "device": self.point.device,
                               "compile": "on" if self.point.compiled else "off", "rounds": len(self.rounds)}
        if self.point.variant.attention is not None:
            row["attention"] = self.point.variant.attention
        if self.point.variant.config_path:
            row["config"] = self.point.variant.config_path
        if self.point.extra:
            row.update(self.point.extra)
        if not self.rounds:
            row.update(status="pending", reason="not run yet")
            return row
        if not ok:
            reasons = [r.get("reason", "?") for r in self.rounds]
            row.update(status="failed", reason=reasons[-1] if reasons else "not run")
            return row
        median_s = statistics.median(r["median_s"] for r in ok)
        row.update(status="ok", median_s=median_s, tokens_per_s=self.point.batch * self.point.seq_len / median_s,
                   peak_mb=statistics.median(r["peak_mb"] for r in ok),
                   activation_mb=statistics.median(r["activation_mb"] for r in ok),
                   memory=ok[0]["memory"], threads=ok[0]["threads"], parameters=ok[0]["parameters"],
                   times_s=[t for r in ok for t in r["times_s"]],
                   round_median_s=[r["median_s"] if r.get("status") == "ok" else None for r in self.rounds],
                   round_peak_mb=[r["peak_mb"] if r.get("status") == "ok" else None for r in self.rounds])
        if "compile_s" in ok[0]:
            row["compile_s"] = statistics.median(r["compile_s"] for r in ok)
        if "note" in ok[0]:
            row["note"] = ok[0]["note"]
        if "profile" in ok[0]:
            row["profile"] = ok[0]["profile"]  # the first round's: profiles are for reading, not for medians
        return row


def run_point(point: Point, timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Measure `point` in a fresh interpreter; never raises for the point's own failures."""
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("PYTHONWARNINGS", "ignore")
    cmd = [sys.executable, "-m", "attention_zoo.bench.worker", json.dumps(point.to_json())]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        hint = " (likely out of memory)" if -proc.returncode == signal.SIGKILL else ""
        return {"status": "failed", "reason": f"worker killed by {name}{hint}"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "failed", "reason": f"worker exited {proc.returncode}: {tail[:300]}"}


def run_sweep(points: list[Point], *, rounds: int = 1, timeout: float = 600.0, env: dict[str, str] | None = None,
              on_result: Callable[[list[Outcome]], None] | None = None, progress: bool = True) -> list[Outcome]:
    from tqdm.auto import tqdm

    outcomes = [Outcome(p, []) for p in points]
    bar = tqdm(total=len(points) * rounds, desc="bench", unit="point", disable=not progress, file=sys.stderr)
    try:
        for r in range(rounds):
            for outcome in outcomes:
                p = outcome.point
                bar.set_postfix_str(f"{p.impl} {p.variant.label} {p.backend} N={p.seq_len} B={p.batch} {p.mode}"
                                    + (" compiled" if p.compiled else "")
                                    + (f" round {r + 1}/{rounds}" if rounds > 1 else ""))
                outcome.rounds.append(run_point(p, timeout, env))
                bar.update()
                if on_result is not None:
                    on_result(outcomes)
    finally:
        bar.close()
    return outcomes


def ratio(a: dict[str, Any], b: dict[str, Any], per_round: str, overall: str) -> float:
    """a / b: the median over rounds of the ratio within each round (a round's points run minutes apart,
    so background load that comes and goes cancels out), or the overall ratio with one round."""
    pairs = [x / y for x, y in zip(a.get(per_round) or [], b.get(per_round) or []) if x and y]
    return statistics.median(pairs) if pairs else a[overall] / b[overall]


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add time and memory ratios to the vanilla point of the same implementation, backend, length, batch, mode
    and compile setting (measured in the same run), and to a compiled point its time over its eager twin's (the
    same point with compile off), `time_vs_eager`."""
    def key(r):
        return (r["impl"], r["backend"], r["seq_len"], r["batch"], r["mode"], r["dtype"], r["device"],
                r.get("compile", "off"))

    baselines = {key(r): r for r in rows if r["variant"] == BASELINE and r["status"] == "ok"}
    eager = {(r["variant"], *key(r)[:-1]): r for r in rows if r.get("compile", "off") == "off" and r["status"] == "ok"}
    out = []
    for r in rows:
        r = dict(r)
        base = baselines.get(key(r))
        if r["status"] == "ok" and base is not None:
            r["time_vs_vanilla"] = ratio(r, base, "round_median_s", "median_s")
            r["memory_vs_vanilla"] = ratio(r, base, "round_peak_mb", "peak_mb")
            r["activation_vs_vanilla"] = r["activation_mb"] / base["activation_mb"] if base["activation_mb"] > 0 else None
        twin = eager.get((r["variant"], *key(r)[:-1])) if r.get("compile") == "on" else None
        if r["status"] == "ok" and twin is not None:
            r["time_vs_eager"] = ratio(r, twin, "round_median_s", "median_s")
        out.append(r)
    return out


def peer_comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each of our points against the x-transformers point of the same variant, length, batch and mode: time,
    peak memory and activation memory (what the step adds to the built model) as ratios ours / peer."""
    def key(r):
        return (r["variant"], r["seq_len"], r["batch"], r["mode"], r["dtype"], r.get("compile", "off"))

    peers = {key(r): r for r in rows if r["impl"] == PEER}
    out = []
    for r in rows:
        if r["impl"] != OURS:
            continue
        p = peers.get(key(r))
        if p is None:
            continue
        both = r["status"] == "ok" and p["status"] == "ok"
        out.append({
            "variant": r["variant"], "backend": r["backend"], "peer_backend": p["backend"], "seq_len": r["seq_len"],
            "batch": r["batch"], "mode": r["mode"], "dtype": r["dtype"], "compile": r.get("compile", "off"),
            "ours_s": r.get("median_s"), "peer_s": p.get("median_s"), "ours_mb": r.get("peak_mb"), "peer_mb": p.get("peak_mb"),
            "time_ours_over_peer": ratio(r, p, "round_median_s", "median_s") if both else None,
            "memory_ours_over_peer": ratio(r, p, "round_peak_mb", "peak_mb") if both else None,
            # on CPU the peaks are process RSS, each with its own imports: the step's own memory compares the models
            "activation_ours_over_peer": (r["activation_mb"] / p["activation_mb"]
                                          if both and p.get("activation_mb", 0) > 0 else None),
            "status": "ok" if both else f"ours: {r.get('reason', 'ok')}; peer: {p.get('reason', 'ok')}",
        })
    return out


__all__ = ["Outcome", "run_point", "run_sweep", "with_ratios", "peer_comparison"]
