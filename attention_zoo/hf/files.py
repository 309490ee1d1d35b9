"""The tokenizer files that travel with a checkpoint between transformers folders and zoo checkpoints."""
from __future__ import annotations

import shutil
from pathlib import Path

# What AutoTokenizer reads from a folder (fast and slow tokenizers, chat template); generation defaults too.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files `src` holds into `dst` (an existing folder); returns the names copied."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def quiet_transformers() -> None:
    """No progress bars or info logs from transformers on the CLI (its load / save bars are noise there)."""
    from .errors import require_transformers

    transformers = require_transformers()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
