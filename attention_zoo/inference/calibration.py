"""Search per-layer budgets K_l that keep the streamed validation loss within a tolerance of the
unpruned model, and measure the sliding-window baseline at the same memory.

The search, each step one streaming evaluation (streaming.py) on the same fixed sequences; budgets
are per group of layers that must keep the same keys (one group per layer for plain selective):
1. uniform: binary search for the smallest K shared by every prunable group that stays within the
   tolerance (the loss grows as K shrinks, so the feasible K form an interval);
2. allocated: each group's loss increase when only it is pruned to N/2, N/4, ..., 4; assuming the
   increases add up, walk the groups down their ladders taking the cheapest step (loss per key
   saved) while the sum stays within the tolerance; check with a real evaluation, and retry with a
   smaller allowance if the check fails;
3. from the better of the two, greedy shrink: each group's K times 0.7, then 0.85, one group at a
   time, keeping a change when the loss stays within the tolerance, until none does.
Then a curve for the plot: uniform budgets N/2, N/4, ... for selective pruning and for the window.

KV-memory ratio = (L * N) / sum_l K_l, where layers that are not pruned count N.

Cost, in streaming evaluations (N forward calls each), with G prunable groups and a ladder of
R = max(1, floor(log2 N) - 2) budgets: at most ceil(log2(N - 1)) uniform + G * R sensitivity + 4
allocated checks, then G per greedy-shrink pass (at least one pass per factor, another after every
pass that kept a change), then 2 or 3 at the calibrated memory, 1 threshold and 2 * R for the curve;
repeated budgets are not evaluated again. The progress bar's total is that estimate, refined as
each stage ends.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from torch import nn
from tqdm.auto import tqdm

from ..data import Batch
from .journal import Journal
from .key_scores import attentions, penalty_layers
from .pruning import BudgetPolicy, Pruner, PruningError, PruningPolicy, ThresholdPolicy, WindowPolicy, without_f_note
from .streaming import StreamingResult, streaming_loss

SHRINK_FACTORS = (0.7, 0.85)
SEARCH_STAGES = ("uniform", "sensitivity", "allocated", "shrink")


@dataclass
class Evaluation:
    policy: str
    budgets: list[int]  # K_l per layer (N where a layer is not pruned)
    loss: float
    memory_ratio: float
    mean_kept: list[float] = field(default_factory=list)  # per layer: keys held after each step, averaged
    stage: str = ""
    peak_kept: list[int] = field(default_factory=list)  # per layer: most keys held after a step

    def within(self, target: float) -> bool:
        return self.loss <= target


class Calibrator:
    """Evaluates policies on fixed batches; remembers every evaluation (for the report and the plot), and with a
    `journal` reads back those an interrupted run made (journal.py)."""

    def __init__(self, model: nn.Module, batches: list[Batch], context: int, tolerance: float, progress: bool = True,
                 log: Callable[[str], None] | None = None, journal: Journal | None = None):
        self.model, self.batches, self.context, self.tolerance = model, batches, context, tolerance
        self.journal = journal
        self.evaluations: list[Evaluation] = []
        self.memo: dict[tuple, Evaluation] = {}
        mods = attentions(model)
        # said here, not by the probe below: its budget policy is calibrate's own, not one the user typed
        if not any(gives := penalty_layers(model)):  # cross-layer accumulate with `sources: []` has none either
            names = ", ".join(sorted({type(m).__name__ for m in mods}))
            raise PruningError(f"no layer of this model has a selection penalty F (no selective attention; "
                               f"attention: {names}{without_f_note(mods, gives)}), so there are no budgets to "
                               "calibrate; a sliding window needs "
                               f"no penalty: measure its loss against the unpruned model with --measure window:K "
                               f"(e.g. --measure window:{max(1, context // 2)}; docs/inference.md, Calibration)")
        probe = Pruner(model, BudgetPolicy(context))
        self.groups, self.ranked = probe.groups, probe.ranked
        self.depth = probe.depth
        self.after_search = 0  # evaluations planned after the search (calibrate() sets it), for the bar's total
        # labelled: the first forward call may take a while (a kernel build), and the bar has nothing to count yet
        self.bar = tqdm(desc="calibrate", unit="eval", total=0, postfix={"stage": "unpruned reference"},
                        disable=not progress, dynamic_ncols=True)
        self.log = log or (lambda message: self.bar.write(message) if progress else None)
        self.base = self.streamed("search", batches).loss  # unpruned: one full pass, equal to streaming
        self.target = self.base * (1 + tolerance)

    def prunable(self) -> int:
        """G: the groups that budgets apply to."""
        return sum(map(bool, self.ranked))

    def expect(self, *stages: int) -> None:
        """Set the bar's total to the evaluations done plus `stages` (estimates of the stages still to come
        in the search) plus those after it: a bound, refined at every stage start, since binary search,
        ladders and memo hits may take fewer and a kept shrink adds a pass."""
        self.bar.total = self.bar.n + sum(stages) + self.after_search
        self.bar.refresh()

    def memory_ratio(self, budgets: list[int]) -> float:
        return self.depth * self.context / sum(budgets)

    def layer_budgets(self, group_budgets: list[int | None]) -> list[int | None]:
        per_layer: list[int | None] = [None] * self.depth
        for group, budget in zip(self.groups, group_budgets):
            for i in group.layers:
                per_layer[i] = budget
        return per_layer

    def streamed(self, part: str, batches: list[Batch], pruner: Pruner | None = None) -> StreamingResult:
        """streaming_loss of `batches` (unpruned without a `pruner`), read back from the journal if it has it under
        `part` ("search", "held out") and the policy."""
        measure = lambda: streaming_loss(self.model, batches, pruner)  # noqa: E731
        if self.journal is None:
            return measure()
        return self.journal.get(f"{part} {'unpruned' if pruner is None else pruner.policy.spec()}", measure)

    def evaluate(self, policy: PruningPolicy, stage: str) -> Evaluation:
        pruner = Pruner(self.model, policy)
        result = self.streamed("search", self.batches, pruner)
        budgets = pruner.layer_budgets(self.context)
        if isinstance(policy, ThresholdPolicy):  # no fixed budget: the memory to provision is the most it held,
            budgets = result.peak_kept  # as a budget's is K (its mean over a stream from 1 token is lower)
        ev = Evaluation(policy.spec(), budgets, result.loss, self.memory_ratio(budgets), result.mean_kept, stage,
                        result.peak_kept)
        self.evaluations.append(ev)
        self.bar.update(1)
        self.bar.set_postfix(stage=stage, ratio=f"{ev.memory_ratio:.1f}x", loss=f"{ev.loss:.4f}", refresh=False)
        return ev

    def stream(self, batches: list[Batch], policy: PruningPolicy, stage: str) -> float:
        """Streamed loss of `policy` on other `batches` (not part of the report's evaluations), counted on the bar."""
        loss = self.streamed(stage, batches, Pruner(self.model, policy)).loss
        self.bar.update(1)
        self.bar.set_postfix(stage=stage, loss=f"{loss:.4f}", refresh=False)
        return loss

    def budget_eval(self, group_budgets: list[int | None], stage: str) -> Evaluation:
        key = tuple(group_budgets)
        if key not in self.memo:  # searches revisit budgets: evaluate each once
            self.memo[key] = self.evaluate(BudgetPolicy(self.layer_budgets(group_budgets)), stage)
        return self.memo[key]

    def uniform_search(self) -> int:
        """Smallest uniform budget within the tolerance (binary search over [2, N])."""
        lo, hi = 2, self.context  # hi is feasible: budget N drops nothing
        self.expect(math.ceil(math.log2(hi - lo + 1)), *self.later_stages("uniform"))
        while lo < hi:
            mid = (lo + hi) // 2
            uniform = [mid if r else None for r in self.ranked]
            if self.budget_eval(uniform, "uniform").within(self.target):
                hi = mid
            else:
                lo = mid + 1
        return hi

    def ladder(self) -> list[int]:
        """Budgets N/2, N/4, ... down to 4 (at least one)."""
        out, K = [], self.context // 2
        while K >= 4 or not out:
            out.append(max(K, 2))
            K //= 2
        return out

    def sensitivities(self) -> dict[int, dict[int, float]]:
        """For each prunable group g and K on the ladder: the loss increase when only g is pruned to K.
        A group's descent stops once its increase alone exceeds twice the allowance."""
        allowance = self.target - self.base
        out: dict[int, dict[int, float]] = {}
        self.expect(self.prunable() * len(self.ladder()), *self.later_stages("sensitivity"))
        for g, ranked in enumerate(self.ranked):
            if not ranked:
                continue
            out[g] = {}
            for K in self.ladder():
                budgets: list[int | None] = [None] * len(self.ranked)
                budgets[g] = K
                out[g][K] = self.budget_eval(budgets, f"sensitivity of group {g}").loss - self.base
                if out[g][K] > 2 * allowance:
                    break
        return out

    def allocate(self, sensitivities: dict[int, dict[int, float]], allowance: float) -> list[int | None]:
        """Assume the groups' increases add up; walk down each group's ladder, always taking the step with
        the smallest loss increase per key saved, while the summed increase stays within `allowance`."""
        budgets: list[int | None] = [self.context if r else None for r in self.ranked]
        spent = {g: 0.0 for g in sensitivities}
        size = {g: len(self.groups[g].layers) for g in sensitivities}
        while True:
            best = None
            for g, curve in sensitivities.items():
                steps = [K for K in sorted(curve, reverse=True) if K < budgets[g]]
                if not steps:
                    continue
                K = steps[0]
                cost = max(curve[K], 0.0) - spent[g]
                saved = (budgets[g] - K) * size[g]
                if sum(spent.values()) + cost <= allowance and (best is None or cost / saved < best[0]):
                    best = (cost / saved, g, K, cost)
            if best is None:
                return budgets
            _, g, K, cost = best
            budgets[g], spent[g] = K, spent[g] + cost

    def allocated_search(self) -> list[int | None] | None:
        """Per-group budgets from the sensitivities, checked by a real evaluation; the allowance shrinks
        until the check passes (increases do not add up exactly)."""
        sensitivities = self.sensitivities()
        allowance = self.target - self.base
        tried = set()
        self.expect(4, *self.later_stages("allocated"))
        for scale in (1.0, 0.7, 0.5, 0.3):
            budgets = self.allocate(sensitivities, allowance * scale)
            if tuple(budgets) in tried:
                continue
            tried.add(tuple(budgets))
            if self.budget_eval(budgets, "allocated").within(self.target):
                return budgets
        return None

    def greedy_shrink(self, budgets: list[int | None]) -> list[int | None]:
        """Use what slack is left: shrink one group at a time by each factor while the loss stays within."""
        for n, factor in enumerate(SHRINK_FACTORS):
            changed = True
            while changed:
                changed = False
                self.expect(self.prunable() * (len(SHRINK_FACTORS) - n))  # this pass and one per factor after it
                for g, ranked in enumerate(self.ranked):
                    if not ranked or budgets[g] <= 2:
                        continue
                    trial = list(budgets)
                    trial[g] = max(2, int(budgets[g] * factor))
                    if trial[g] < budgets[g] and self.budget_eval(trial, f"shrink x{factor}").within(self.target):
                        budgets, changed = trial, True
        return budgets

    def search(self) -> tuple[int, list[int | None]]:
        """The smallest uniform budget, and the best per-group budgets found (never worse than uniform)."""
        uniform = self.uniform_search()
        best = [uniform if r else None for r in self.ranked]
        allocated = self.allocated_search()
        if allocated is not None and self.total(allocated) < self.total(best):
            best = allocated
        return uniform, self.greedy_shrink(best)

    def later_stages(self, stage: str) -> list[int]:
        """Estimates of the evaluations in the search stages after `stage`: the most for the sensitivity
        ladders and the allocated checks, the least (one pass per factor) for the greedy shrink."""
        counts = {"sensitivity": self.prunable() * len(self.ladder()), "allocated": 4,
                  "shrink": self.prunable() * len(SHRINK_FACTORS)}
        return [n for s, n in counts.items() if SEARCH_STAGES.index(s) > SEARCH_STAGES.index(stage)]

    def total(self, group_budgets: list[int | None]) -> int:
        return sum(self.context if k is None else k for k in self.layer_budgets(group_budgets))

    def curve(self) -> None:
        """Uniform budgets N/2, N/4, ... >= 4 for both selective pruning and the sliding window."""
        for K in self.ladder():
            uniform = tuple(K if r else None for r in self.ranked)
            if uniform in self.memo:  # measured during the search already: list it again, as a curve point
                self.evaluations.append(replace(self.memo[uniform], stage="curve"))
            else:
                self.evaluate(BudgetPolicy(self.layer_budgets(list(uniform))), "curve")
            self.evaluate(WindowPolicy(K), "curve")

    def close(self) -> None:
        """End the bar at the evaluations actually made (the total was an estimate)."""
        self.bar.total = self.bar.n
        self.bar.refresh()
        self.bar.close()


def check_tolerance(tolerance: float) -> None:
    """PruningError unless `tolerance` is a relative loss increase in (0, 1) (0.01 = 1%)."""
    if not 0 < tolerance < 1:
        raise PruningError(f"--tolerance {tolerance}: expected a relative tolerance in (0, 1), e.g. 0.01 for 1%")


def calibrate(model: nn.Module, batches: list[Batch], *, context: int, tolerance: float, progress: bool = True,
              curve: bool = True, threshold: float | None = 1.0,
              check_batches: list[Batch] | None = None, journal: Journal | None = None) -> dict:
    """Run the search; return the report (a JSON-able dict). See the module docstring. With a `journal`, every
    streaming evaluation is read from it or written to it (an interrupted calibration resumes; the caller closes
    it once the report is saved)."""
    check_tolerance(tolerance)
    cal = Calibrator(model, batches, context, tolerance, progress, journal=journal)
    # after the search: calibrated, window (and a uniform window when budgets differ), threshold, curve, held out
    cal.after_search = 2 + bool(threshold) + (2 * len(cal.ladder()) if curve else 0) + (2 if check_batches else 0)
    try:
        uniform, group_budgets = cal.search()
        cal.expect()
        best = cal.evaluate(BudgetPolicy(cal.layer_budgets(group_budgets)), "calibrated")
        layer_budgets = cal.layer_budgets(group_budgets)
        # The window at the same memory: unpruned groups keep everything there too; the others get K_l.
        window = cal.evaluate(WindowPolicy(layer_budgets), "window at calibrated memory")
        uniform_window = None
        if len(set(best.budgets)) > 1:  # the plain baseline: one window for every layer, same total memory
            cal.bar.total += 1  # known only now
            uniform_window = cal.evaluate(WindowPolicy(max(2, round(sum(best.budgets) / cal.depth))),
                                          "uniform window at calibrated memory")
        thresh = cal.evaluate(ThresholdPolicy(threshold), "threshold") if threshold else None
        if curve:
            cal.curve()
        held_out = None
        if check_batches:
            base_check = cal.streamed("held out", check_batches).loss  # one full pass, not counted
            pruned_check = cal.stream(check_batches, BudgetPolicy(layer_budgets), "held out")
            window_check = cal.stream(check_batches, WindowPolicy(layer_budgets), "held out")
            held_out = {"base_loss": base_check, "calibrated_loss": pruned_check, "window_loss": window_check,
                        "calibrated_relative_increase": pruned_check / base_check - 1,
                        "window_relative_increase": window_check / base_check - 1}
    finally:
        cal.close()
    return {
        "context": context,
        "tolerance": tolerance,
        "sequences": sum(b.inputs.shape[0] for b in batches),
        "base_loss": cal.base,
        "target_loss": cal.target,
        "groups": [{"layers": list(g.layers), "linked_by": list(g.linked_by), "has_penalty": r}
                   for g, r in zip(cal.groups, cal.ranked)],
        "uniform_budget": uniform,
        "calibrated": _summary(best, cal.base),
        "window_same_memory": _summary(window, cal.base),
        "uniform_window_same_memory": _summary(uniform_window, cal.base),
        "threshold": _summary(thresh, cal.base),
        "held_out": held_out,
        "evaluations": [asdict(e) for e in cal.evaluations],
    }


def _summary(ev: Evaluation | None, base: float) -> dict | None:
    return None if ev is None else {**asdict(ev), "relative_increase": ev.loss / base - 1}
