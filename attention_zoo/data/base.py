"""What every dataset shares: the error type, the batch, the interface and byte-level tokens.

Every dataset here is byte-level (vocab 256): no tokenizer to fetch or train, and any text file
works. Shapes below use B = batch size, N = sequence length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from ..errors import UserError
from ..registry import did_you_mean as _did_you_mean

VOCAB_SIZE = 256
IGNORE_INDEX = -100  # what torch.nn.functional.cross_entropy skips by default
SPLITS = ("train", "val", "test")
_MISSING = object()


class DataError(UserError, ValueError):
    """A bad `data:` section. The message names the config file, the key path (`data.text`), the
    bad value and what would be valid (or what to install), so a user can fix it without reading code."""

    def __init__(self, source: str, key: str, value: Any = _MISSING, hint: str = ""):
        self.source, self.key, self.hint = source, key, hint
        self.value = None if value is _MISSING else value
        what = f"{key} is missing" if value is _MISSING else f"{key} = {value!r}"
        super().__init__(f"{source}: {what}: {hint}" if hint else f"{source}: {what}")


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    return _did_you_mean(str(value), list(choices))


# dataset name -> the keys of `data:` it reads, filled in by each dataset's module (`tokenizer` included for the
# corpora: build_dataset takes it off before the builder sees the rest). Config validation checks against it too.
DATASET_KEYS: dict[str, frozenset[str]] = {}


def unknown_keys(spec: dict, name: str, source: str) -> list[DataError]:
    """One DataError for each key of `spec` that dataset `name` does not read (see DATASET_KEYS), naming the
    datasets that do read it: most often `data.text=FILE` over a config that names shakespeare."""
    allowed = sorted(DATASET_KEYS[name])
    problems = []
    for key in spec:
        if key not in allowed:
            readers = sorted(n for n, keys in DATASET_KEYS.items() if key in keys)
            elsewhere = f" (a key of dataset {' or '.join(readers)}; data.name is {name!r})" if readers else ""
            problems.append(DataError(source, f"data.{key}", spec[key], f"unknown key for dataset {name!r}{elsewhere}; "
                                      f"{did_you_mean(key, allowed)}valid keys: {', '.join(allowed)}"))
    return problems


def check_keys(spec: dict, name: str, source: str) -> None:
    """Reject keys a dataset does not read: a typo must not silently fall back to a default."""
    if problems := unknown_keys(spec, name, source):
        raise problems[0]


@dataclass(frozen=True)
class Batch:
    """One batch. `targets[b, i]` is the token after `inputs[b, i]` (IGNORE_INDEX where no loss is
    taken, e.g. padding); `metric_mask` marks the positions whose argmax accuracy is the task metric
    (None for plain corpora, where the metric is the loss itself)."""

    inputs: torch.Tensor  # LongTensor [B, N]
    targets: torch.Tensor  # LongTensor [B, N]
    metric_mask: torch.Tensor | None = None  # BoolTensor [B, N] or None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.inputs), move(self.targets), move(self.metric_mask))


class Dataset:
    """The interface the trainer sees. Subclasses fill in `sample`, `eval_batches`, `num_tokens`.

    - `sample(split, batch_size, seq_len, generator)`: random batch, inputs/targets [B, N=seq_len].
    - `eval_batches(split, batch_size, seq_len, max_batches)`: the same batches on every call.
    - `fixed_seq_len`: None for corpora (any seq_len); for a task, the length of one example, the
      smallest seq_len `sample`/`eval_batches` accept.
    """

    name: str = ""
    vocab_size: int = VOCAB_SIZE
    splits: tuple[str, ...] = SPLITS
    fixed_seq_len: int | None = None

    def sample(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def eval_batches(
        self, split: str, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[Batch]:
        raise NotImplementedError

    def num_tokens(self, split: str) -> int | None:
        raise NotImplementedError

    def at_step(self, step: int) -> None:
        """Called by the trainer before each training batch with the step it is for, so a dataset with a
        curriculum (a schedule over steps) can switch; resumed runs call it again. Default: nothing."""

    def write_cache(self) -> None:
        """Write what the dataset built but was told not to write yet (build_dataset's write_cache=False): a
        tokenized corpus's token files. Default: nothing."""

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    def decode(self, tokens: torch.Tensor | Iterable[int]) -> str:
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.reshape(-1).tolist()
        # Skip IGNORE_INDEX and other non-bytes so decoding targets or padded rows never fails.
        return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(
                f"dataset {self.name!r} has no split {split!r}; {did_you_mean(split, self.splits)}"
                f"splits: {', '.join(self.splits)}"
            )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
