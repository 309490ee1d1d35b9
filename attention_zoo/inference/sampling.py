"""Next-token sampling: temperature, top-k and nucleus (top-p), with a seeded generator."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from ..numbers import SEED_RANGE, is_whole, seed_problem


@dataclass
class Sampler:
    """temperature 0 means greedy (argmax); top_k / top_p of None keep every token; seed None draws a fresh one.
    Raises UserError naming the option for a temperature that is not a finite number >= 0, a top_k that is not a
    whole number >= 1, a top_p outside (0, 1], or a seed that is not an integer from 0 to 2**64 - 1."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        problems = []
        if not (isinstance(self.temperature, numbers.Real) and 0 <= self.temperature < math.inf):
            problems.append(f"--temperature {self.temperature}: must be a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and not (is_whole(self.top_k) and self.top_k >= 1):
            problems.append(f"--top-k {self.top_k}: must be a whole number >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"--top-p {self.top_p}: must be in (0, 1]")
        # the range train.seed accepts: torch.Generator.manual_seed raised an opaque "Overflow when unpacking long
        # long" past 64 bits, and read a negative seed modulo 2**64 (--seed -1 repeated --seed 18446744073709551615)
        if self.seed is not None:
            problem = seed_problem(self.seed) if is_whole(self.seed) else SEED_RANGE
            if problem is not None:
                problems.append(f"--seed {self.seed}: {problem}")
        if problems:
            raise UserError("; ".join(problems))
        self.generator = torch.Generator()
        if self.seed is not None:
            self.generator.manual_seed(self.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: Tensor) -> Tensor:
        """logits (B, V) -> tokens (B, 1). -inf logits (tokens ruled out) are fine; raises UserError for a row
        holding NaN or +inf, or -inf everywhere, which no token can be drawn from."""
        logits = logits.float()
        _check_logits(logits)
        if self.temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        # shifted so each row's largest logit is 0 before dividing: a tiny temperature (1e-40) would overflow
        # the others to +-inf and softmax to NaN; now they go to -inf at worst, and the argmax keeps weight 1
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # drop a token once the tokens ranked above it already cover top_p (the top one always stays)
            drop_sorted = probs.cumsum(dim=-1) - probs >= self.top_p
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=self.generator).to(logits.device)


def _check_logits(logits: Tensor) -> None:
    """UserError naming the first row of logits (B, V) that holds NaN or +inf, or is -inf everywhere (a checkpoint
    with non-finite weights, an overflow): torch.multinomial would raise an opaque RuntimeError and argmax would
    silently pick a NaN's index. One host sync, as sampling has anyway."""
    bad = logits.isnan() | (logits == float("inf"))
    rows = bad.any(dim=-1) | (logits == float("-inf")).all(dim=-1)
    if rows.any():
        row = int(rows.nonzero()[0, 0])
        what = (f"holds {logits[row][bad[row]][0].item()}" if bad[row].any() else "is -inf everywhere")
        raise UserError(f"row {row} of the model's logits {what}: no token can be sampled from it (non-finite "
                        "weights in the checkpoint, or an overflow in a low-precision dtype)")
