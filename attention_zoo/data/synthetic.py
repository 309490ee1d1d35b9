"""Variable assignment: a synthetic task of OUR OWN design (not taken from a paper or benchmark).

One example, byte-level, with single-letter variables and fixed-width decimal values:

    c=4;a=7;c=1;b=0;?c:1
    `---- assignments ---'`- query, then the answer (the latest value assigned to c)

With `num_queries: Q > 1` the stream ends in Q queries instead of one (`...;?c:1?a:7`), each of a
variable drawn from the assignments (with replacement): Q answers to learn from per example, as
multi-query associative recall (Arora et al., "Zoology", 2023) supervises many recalls per sequence.

Variables are reassigned often, so the right answer needs the *latest* assignment of the queried
variable while earlier ones must be ignored: the case selective attention (masking overwritten
tokens) is meant to help with. Everything is generated with torch ops on whole batches.

A curriculum: `num_assignments` may be a schedule {first step: count}, e.g. {0: 3, 4000: 8}: training
examples have 3 assignments for steps 0-3999 and 8 from step 4000 on. Evaluation always uses the
last count (the task); shorter training examples are padded after their last answer.
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import torch

from .base import DATASET_KEYS, IGNORE_INDEX, Batch, DataError, Dataset, unknown_keys

PAD = 0  # input byte after the example when seq_len is longer than one example (its target is ignored)

# key -> (default, smallest, largest or None)
INT_PARAMS = {
    "num_vars": (8, 1, 26),  # variables are the letters a, b, c, ...
    "num_assignments": (24, 1, None),
    "num_queries": (1, 1, None),  # queries at the end of each example, each with its own answer
    "value_digits": (1, 1, 9),  # values are zero-padded to this many digits
    "seed": (0, None, None),
    "eval_examples": (1024, 1, None),  # size of each fixed evaluation set
}
LOSS_ON = ("answer", "all")
DATASET_KEYS["variable_assignment"] = frozenset({"name", "loss_on", *INT_PARAMS})  # a task: no tokenizer


class VariableAssignment(Dataset):
    """See the module docstring. `loss_on="answer"` (default) puts the LM loss only on the answer
    token(s), the rest of `targets` being IGNORE_INDEX; `"all"` trains next-byte prediction on the
    whole example (the assignments are random, so most of that loss cannot go below chance).
    `metric_mask` always marks the answer position(s) of `targets`."""

    def __init__(self, num_vars=8, num_assignments: int | dict[int, int] = 24, value_digits=1, seed=0,
                 eval_examples=1024, loss_on="answer", num_queries=1):
        self.name = "variable_assignment"
        # (first step, count) pairs in step order; a plain count is the schedule {0: count}
        schedule = num_assignments if isinstance(num_assignments, dict) else {0: num_assignments}
        self.schedule = sorted(schedule.items())
        self.num_assignments = self.schedule[-1][1]  # the task: what evaluation uses
        self.num_vars, self.value_digits = num_vars, value_digits
        self.num_queries = num_queries
        self.seed, self.eval_examples, self.loss_on = seed, eval_examples, loss_on
        # One example is K assignments of (var '=' digits ';') then Q queries of ('?' var ':' digits).
        self.width = 3 + value_digits
        self.example_len = (self.num_assignments + num_queries) * self.width
        longest = max(count for _, count in self.schedule)
        self.fixed_seq_len = (longest + num_queries) * self.width - 1  # inputs drop the last byte, targets the first
        self._step = 0
        self._eval_sets: dict[str, torch.Tensor] = {}

    def at_step(self, step: int) -> None:
        """The training step the next `sample("train", ...)` is for: picks the curriculum's count."""
        self._step = step

    def assignments_at(self, step: int) -> int:
        """The number of assignments of a training example at `step` (the schedule's latest entry <= step)."""
        return [count for first, count in self.schedule if first <= step][-1]

    def answer_targets(self, num_assignments: int) -> torch.Tensor:
        """Indices into `targets` of the answer digits of an example with that many assignments: byte p of
        the example is the target at index p - 1."""
        first_answer = num_assignments * self.width + 3
        return torch.tensor([first_answer + q * self.width + i - 1
                             for q in range(self.num_queries) for i in range(self.value_digits)])

    def num_tokens(self, split: str) -> None:
        self._check_split(split)
        return None  # a generated stream has no fixed size

    def generate(self, n: int, generator: torch.Generator, num_assignments: int | None = None) -> torch.Tensor:
        """`n` examples as a LongTensor [n, (K + Q) * (3 + value_digits)] of bytes, K = `num_assignments`
        (default: the task's)."""
        K, d = num_assignments or self.num_assignments, self.value_digits

        def rand(high: int, shape: tuple[int, ...]) -> torch.Tensor:
            return torch.randint(high, shape, generator=generator, device=generator.device).cpu()

        var = rand(self.num_vars, (n, K))
        value = rand(10**d, (n, K))
        # Query the variable of a random assignment, so it is always one that was assigned; its
        # answer is the value at that variable's LAST assignment. query, answer: (n, Q)
        query = var.gather(1, rand(K, (n, self.num_queries)))
        last = torch.where(var[:, None, :] == query[..., None], torch.arange(K), -1).amax(2)
        answer = value.gather(1, last)

        def digits(v: torch.Tensor) -> torch.Tensor:  # [..] -> [.., d] ASCII digits, most significant first
            return v[..., None] // 10 ** torch.arange(d - 1, -1, -1) % 10 + ord("0")

        def char(c: str, like: torch.Tensor) -> torch.Tensor:
            return torch.full((*like.shape, 1), ord(c))

        assignments = torch.cat([var[..., None] + ord("a"), char("=", var), digits(value), char(";", var)], -1)
        queries = torch.cat([char("?", query), query[..., None] + ord("a"), char(":", query), digits(answer)], -1)
        return torch.cat([assignments.flatten(1), queries.flatten(1)], 1)

    def _batch(self, examples: torch.Tensor, seq_len: int) -> Batch:
        if seq_len < self.fixed_seq_len:
            raise ValueError(
                f"variable_assignment examples need seq_len >= {self.fixed_seq_len} (got {seq_len}); "
                "raise seq_len or lower data.num_assignments"
            )
        n, N = examples.shape[0], examples.shape[1] - 1
        inputs = torch.full((n, seq_len), PAD, dtype=torch.long)
        targets = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
        inputs[:, :N], targets[:, :N] = examples[:, :-1], examples[:, 1:]
        metric_mask = torch.zeros(n, seq_len, dtype=torch.bool)
        metric_mask[:, self.answer_targets(examples.shape[1] // self.width - self.num_queries)] = True
        if self.loss_on == "answer":
            targets[~metric_mask] = IGNORE_INDEX
        return Batch(inputs, targets, metric_mask)

    def eval_set(self, split: str) -> torch.Tensor:
        """The fixed examples of a split, [eval_examples, example_len]. Each split has its own
        generator, seeded from (seed, split), so the sets are reproducible and independent."""
        self._check_split(split)
        if split not in self._eval_sets:
            digest = hashlib.sha256(f"variable_assignment:{self.seed}:{split}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            self._eval_sets[split] = self.generate(self.eval_examples, generator)
        return self._eval_sets[split]

    def sample(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch:
        """train: fresh examples from the caller's generator (an endless stream). val/test: random
        rows of the fixed evaluation set, so they never leave it."""
        self._check_split(split)
        if split == "train":
            examples = self.generate(batch_size, generator, self.assignments_at(self._step))
        else:
            pool = self.eval_set(split)
            rows = torch.randint(pool.shape[0], (batch_size,), generator=generator, device=generator.device)
            examples = pool[rows.cpu()]
        return self._batch(examples, seq_len)

    def eval_batches(
        self, split: str, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[Batch]:
        for i, examples in enumerate(self.eval_set(split).split(batch_size)):
            if max_batches is not None and i >= max_batches:
                return
            yield self._batch(examples, seq_len)


def build_variable_assignment(spec: dict, source: str) -> VariableAssignment:
    """The task a `data:` spec describes; raises the first of `variable_assignment_problems` (config
    validation reports them all before anything is built)."""
    kwargs, problems = _parse(spec, source)
    if problems:
        raise problems[0]
    return VariableAssignment(**kwargs)


def variable_assignment_problems(spec: dict, source: str) -> list[DataError]:
    """Every problem of a variable_assignment `data:` spec (unknown keys, counts out of range, a bad
    curriculum, a bad loss_on), one DataError each; [] for a spec that builds."""
    return _parse(spec, source)[1]


def _parse(spec: dict, source: str) -> tuple[dict, list[DataError]]:
    """The constructor's keyword arguments from `spec`, and every problem met (each key checked on its own)."""
    problems = unknown_keys(spec, "variable_assignment", source)
    kwargs = {}
    for key, (default, low, high) in INT_PARAMS.items():
        value = spec.get(key, default)
        if key == "num_assignments" and isinstance(value, dict):
            problems += _schedule_problems(value, source, low)
            kwargs[key] = dict(value)
        elif not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
            schedule = " or a schedule {first step: count} starting at step 0" if key == "num_assignments" else ""
            problems.append(DataError(source, f"data.{key}", value, f"expected {_int_range(low, high)}{schedule}"))
        else:
            kwargs[key] = value
    kwargs["loss_on"] = spec.get("loss_on", "answer")
    if kwargs["loss_on"] not in LOSS_ON:
        problems.append(DataError(source, "data.loss_on", kwargs["loss_on"], f"expected one of: {', '.join(LOSS_ON)}"))
    return kwargs, problems


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML `true` is not a count


def _schedule_problems(value: dict, source: str, low: int) -> list[DataError]:
    """A `num_assignments` curriculum {first step: count}: steps integers >= 0 with step 0 present, counts >= low."""
    problems = []
    for step, count in value.items():
        if not _is_int(step) or step < 0:
            problems.append(DataError(source, f"data.num_assignments[{step!r}]", count,
                                      "a schedule's keys are training steps (integers >= 0), e.g. {0: 3, 4000: 8}"))
        elif not _is_int(count) or count < low:
            problems.append(DataError(source, f"data.num_assignments[{step}]", count, f"expected {_int_range(low, None)}"))
    if 0 not in value:
        problems.append(DataError(source, "data.num_assignments", value,
                                  "a schedule must say what step 0 uses, e.g. {0: 3, 4000: 8}"))
    return problems


def _int_range(low: int | None, high: int | None) -> str:
    if high is not None:
        return f"an integer from {low} to {high}"
    return "an integer" if low is None else f"an integer >= {low}"
