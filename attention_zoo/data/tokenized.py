"""Text corpora tokenized with a local transformers tokenizer (`data.tokenizer: PATH`).

A corpus (Shakespeare, a user's text, PTB) is read as bytes as usual, then each split is tokenized once with
`transformers.AutoTokenizer.from_pretrained(PATH)` (local files only) and, given a cache folder, saved there
(`<name>-<split>-<fingerprint>.pt`, int32 tokens) and reused while the corpus and tokenizer files are unchanged.

Bits per byte stay comparable with the byte-level corpora: each split remembers how many bytes its tokens cover,
and `bpb = loss / ln 2 * tokens / bytes` (the loss per token spread over the bytes a token stands for, averaged
over the split).
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from .base import DataError
from .corpus import CorpusDataset

# A tokenizer's vocabulary comes in one of these (fast tokenizer, BPE, WordPiece, sentencepiece)
_VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")
CHUNK_BYTES = 1 << 16  # tokenized in line-aligned chunks, so the fast tokenizer batches them


def load_tokenizer(path: str | Path, source: str):
    """AutoTokenizer from a local folder; DataError (naming data.tokenizer) if it is missing or unreadable."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(source, "data.tokenizer", str(path), "no such folder (give a local folder with tokenizer files, "
                        "e.g. a transformers checkpoint or one import-hf wrote)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(source, "data.tokenizer", str(path), "tokenizers need the optional dependency transformers: "
                        "pip install 'attention-zoo[hf]'") from None
    if not any((folder / name).is_file() for name in _VOCABULARY_FILES):
        found = sorted(p.name for p in folder.iterdir())
        raise DataError(source, "data.tokenizer", str(path), "no tokenizer files there (expected one of "
                        f"{', '.join(_VOCABULARY_FILES)}; the folder holds "
                        f"{', '.join(found[:6]) + (', ...' if len(found) > 6 else '') if found else 'nothing'})")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for an unreadable folder
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # its lists span lines
        raise DataError(source, "data.tokenizer", str(path), f"cannot load a tokenizer there: {type(exc).__name__}: "
                        f"{detail[:400]}{'...' if len(detail) > 400 else ''}") from None


def fingerprint(tokenizer_path: str | Path, data: bytes) -> str:
    """A short hash of the tokenizer's files and the text: a cached token file is reused only for both unchanged."""
    h = hashlib.sha256(data)
    for f in sorted(Path(tokenizer_path).expanduser().glob("*")):
        if f.is_file() and ("token" in f.name or f.suffix in (".model", ".txt") or f.name == "vocab.json"):
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _chunks(text: str) -> Iterable[str]:
    start = 0
    while start < len(text):
        end = text.find("\n", start + CHUNK_BYTES)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def tokenize(tokenizer, data: bytes) -> torch.Tensor:
    """UTF-8 bytes -> int32 token ids (1-D), no special tokens added."""
    text = data.decode("utf-8", errors="replace")
    ids = tokenizer(list(_chunks(text)), add_special_tokens=False)["input_ids"] if text else []
    return torch.tensor([t for chunk in ids for t in chunk], dtype=torch.int32)


class TokenizedCorpus(CorpusDataset):
    """A CorpusDataset whose splits hold tokenizer ids (int32) instead of bytes.

    vocab_size: len(tokenizer) (added tokens included); bytes_per_token[split]: the split's bytes / tokens.
    """

    def __init__(self, corpus: CorpusDataset, tokenizer, tokenizer_path: str | Path, cache_dir: str | Path | None,
                 write_cache: bool = True):
        self.name = f"{corpus.name} ({Path(tokenizer_path).name} tokens)"
        # write_cache False: token files missing from cache_dir wait in memory for write_cache(), so a run refused
        # by a later check, or an eval of someone else's folder, writes nothing
        self.unwritten: dict[Path, torch.Tensor] = {}
        self.writes_cache = write_cache
        self.splits = corpus.splits
        self.sources = corpus.sources
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.data, self.bytes_per_token = {}, {}
        for split in corpus.splits:
            raw = bytes(corpus.data[split].numpy().tobytes())
            tokens = self._cached(corpus.name, split, raw, tokenizer_path, cache_dir)
            self.data[split] = tokens
            self.bytes_per_token[split] = len(raw) / max(tokens.numel(), 1)

    def _cached(self, name: str, split: str, raw: bytes, tokenizer_path, cache_dir) -> torch.Tensor:
        if cache_dir is None:
            return tokenize(self.tokenizer, raw)
        cache = Path(cache_dir)
        file = cache / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{split}-{fingerprint(tokenizer_path, raw)}.pt"
        if file.is_file():
            return torch.load(file, weights_only=True)
        tokens = tokenize(self.tokenizer, raw)
        if self.writes_cache:
            _save_tokens(file, tokens)
        else:
            self.unwritten[file] = tokens
        return tokens

    def write_cache(self) -> None:
        """Write the token files that were tokenized here but not yet cached."""
        for file, tokens in self.unwritten.items():
            _save_tokens(file, tokens)
        self.unwritten.clear()

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def decode(self, tokens) -> str:
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.reshape(-1).tolist()
        return self.tokenizer.decode([t for t in tokens if 0 <= t < self.vocab_size])


def _save_tokens(file: Path, tokens: torch.Tensor) -> None:
    """Save `tokens` as `file`, atomically."""
    cache = file.parent
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{file.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(tokens, tmp)
        os.replace(tmp, file)  # readers see no file or the whole file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["TokenizedCorpus", "load_tokenizer", "tokenize", "fingerprint"]
