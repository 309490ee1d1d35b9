"""The files that travel between transformers folders and zoo checkpoints (tokenizer files), and which existing
folder an export or an import may replace."""
from __future__ import annotations

import re
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


def derive_generation_config(src: str | Path, dst: str | Path) -> bool:
    """For a transformers folder `src` without generation_config.json (checkpoints saved before transformers wrote
    one keep bos / eos / pad in config.json), write to `dst` the generation_config.json transformers derives from
    config.json when it loads `src`, so that `generate` stops at its end-of-sequence token and an export keeps its
    special tokens. True if written (only when config.json names a special token)."""
    from .errors import require_transformers

    src, dst = Path(src), Path(dst)
    if (src / "generation_config.json").is_file():
        return False
    transformers = require_transformers()
    config = transformers.AutoConfig.from_pretrained(str(src), local_files_only=True)
    generation = transformers.GenerationConfig.from_model_config(config)
    if all(getattr(generation, key, None) is None for key in ("bos_token_id", "eos_token_id", "pad_token_id")):
        return False
    generation.save_pretrained(str(dst))
    return True


def tokenizer_folder(checkpoint: str | Path, config: dict) -> Path:
    """The folder holding `checkpoint`'s tokenizer files (and generation_config.json), the first of: the checkpoint
    itself (an import), its data.tokenizer (the tokenizer a fine-tuned run read; absolute as import-hf writes
    it), its train.init_from (the checkpoint a run started from). A run keeps init_from as typed, relative to where
    it was trained, so it is the last resort: from another folder it names nothing, or the wrong folder. The
    checkpoint itself when none holds any."""
    data, train = config.get("data") or {}, config.get("train") or {}
    folders = [Path(checkpoint)] + [Path(p) for p in (data.get("tokenizer"), train.get("init_from")) if p]
    return next((f for f in folders if f.is_dir() and any((f / n).is_file() for n in TOKENIZER_FILES)), Path(checkpoint))


def read_generation_config(folder: str | Path) -> dict:
    """The generation_config.json in `folder` as a dict ({} when there is none). Raises UserError naming the file if
    it cannot be read or is not a JSON object."""
    import json

    from ..errors import UserError

    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(values).__name__}")
    return values


def end_of_sequence_ids(folder: str | Path, tokenizer=None) -> list[int]:
    """The token ids that end a sequence for the checkpoint whose tokenizer files are in `folder`: eos_token_id of
    its generation_config.json (an id or a list of ids, as transformers writes it), else the tokenizer's
    eos_token_id; [] when neither names one (the zoo's byte-level models). Raises UserError naming the file for
    an eos_token_id that is not an id or a list of ids."""
    from ..errors import UserError

    value = read_generation_config(folder).get("eos_token_id")
    if value is None and tokenizer is not None:
        value = tokenizer.eos_token_id
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise UserError(f"{Path(folder) / 'generation_config.json'}: eos_token_id = {value!r}: expected a token id "
                        "or a list of token ids")
    return ids


def quiet_transformers() -> None:
    """No progress bars or info logs from transformers on the CLI (its load / save bars are noise there)."""
    from .errors import require_transformers

    transformers = require_transformers()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


# What an export writes (transformers' save_pretrained, sharded or not, and the tokenizer files): a folder holding
# config.json and nothing else than these is an earlier export that export-hf may replace.
_EXPORT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", *TOKENIZER_FILES)
_EXPORT_SHARD = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")


def check_export_target(out: Path, flag: str, overwrite: bool = False) -> None:
    """UserError unless `out` may receive an export: absent, an empty folder, or (with `overwrite`) a transformers
    model folder (config.json and only the files an export writes, as save_pretrained and a hub download leave
    them); never a file, a zoo checkpoint or run, or a folder with other files."""
    from ..errors import UserError

    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out}: is a file; give a folder for the transformers model (new or empty, or an "
                        "earlier export with --overwrite)")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if "config.yaml" in entries or "checkpoint" in entries:
        what = "a zoo checkpoint or run folder"
    else:
        other = [n for n in entries if n not in _EXPORT_FILES and not _EXPORT_SHARD.fullmatch(n)]
        if "config.json" in entries and not other:
            if overwrite:
                return  # replaced whole
            raise UserError(f"{flag} {out}: holds a transformers model (an earlier export, or perhaps the model a "
                            "checkpoint was imported from); add --overwrite to replace it, or choose a new folder")
        shown = other or entries
        what = f"not an earlier export (it holds {', '.join(shown[:5])}{', ...' if len(shown) > 5 else ''})"
    raise UserError(f"{flag} {out}: exists and is {what}; it would be replaced, choose a new or empty folder "
                    "(or an earlier export, with --overwrite)")


# What an import writes: a zoo checkpoint without training state, and the source's tokenizer files.
_IMPORT_FILES = ("config.yaml", "model.safetensors", *TOKENIZER_FILES)


def check_import_target(out: Path, flag: str, overwrite: bool = False) -> None:
    """UserError unless `out` may receive an import: absent, an empty folder, or (with `overwrite`) an earlier
    import (config.yaml, model.safetensors and tokenizer files only). Never a file, a training run or its
    checkpoint (training state in state.pt: replacing it would lose the run, and --resume would start over), or
    a folder with other files."""
    from ..errors import UserError

    if out.is_symlink():  # replacing it would swap the link for a folder and leave the old target dangling
        raise UserError(f"{flag} {out}: a symbolic link; give the folder it points to ({out.resolve()}) or a new one")
    if not out.is_dir():
        return  # absent (a file there was refused by check_output_path)
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    in_a_run = out.name == "checkpoint" and (out.parent / "metrics.jsonl").exists()  # even if it lost state.pt
    if "state.pt" in entries or "checkpoint" in entries or in_a_run:
        raise UserError(f"{flag} {out}: holds a training run or its checkpoint (state.pt); an import would replace "
                        "it and lose the run: choose a new or empty folder")
    other = [n for n in entries if n not in _IMPORT_FILES]
    if not other and "config.yaml" in entries:
        if overwrite:
            return
        raise UserError(f"{flag} {out}: holds a zoo checkpoint (an earlier import); add --overwrite to replace it, "
                        "or choose a new folder")
    shown = other or entries
    raise UserError(f"{flag} {out}: exists and is not an earlier import (it holds {', '.join(shown[:5])}"
                    f"{', ...' if len(shown) > 5 else ''}); choose a new or empty folder")
