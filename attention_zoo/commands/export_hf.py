"""`export-hf`: a zoo checkpoint with vanilla / gqa attention as a folder transformers loads."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..paths import check_output_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="write a zoo checkpoint as a transformers folder (vanilla / gqa layers)",
                       description="Write CHECKPOINT (a checkpoint folder or a run folder holding checkpoint/) to OUT "
                       "as a transformers model (Llama or Qwen2 for rope + rmsnorm + swiglu, GPT-2 for learned + "
                       "layernorm + gelu with biases) that AutoModelForCausalLM.from_pretrained(OUT) loads; the "
                       "checkpoint's tokenizer files are copied. Needs transformers: pip install 'attention-zoo[hf]'.")
    p.add_argument("checkpoint", help="checkpoint folder, or a run folder holding checkpoint/")
    p.add_argument("--out", required=True, help="transformers folder to write: a new or empty folder (or, with "
                   "--overwrite, a transformers model folder, replaced whole)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds a transformers model (an "
                   "earlier export); never a zoo checkpoint or a folder with other files")
    p.set_defaults(run=cmd_export_hf)


def cmd_export_hf(args) -> int:
    from ..checkpoint import atomic_folder, load_model, resolve_checkpoint
    from ..hf import to_hf
    from ..hf.files import TOKENIZER_FILES, check_export_target, copy_tokenizer_files, quiet_transformers

    quiet_transformers()

    out = check_output_path("--out", args.out, "folder")
    path = resolve_checkpoint(args.checkpoint)
    check_export_target(out, "--out", args.overwrite)  # before any work: an existing folder is replaced only if it is an export
    model = load_model(path)
    hf = to_hf(model)
    # the first folder holding tokenizer files (or the checkpoint, holding none)
    folder = next((f for f in tokenizer_folders(path, model.config) if any((f / n).is_file() for n in TOKENIZER_FILES)),
                  path)
    set_special_tokens(hf.config, folder / "generation_config.json")
    with atomic_folder(out) as staging:  # written next to OUT, renamed into place only when complete
        hf.save_pretrained(str(staging))
        copied = copy_tokenizer_files(folder, staging)  # its generation_config.json replaces the one just saved
    extras = ", ".join(copied) or "no tokenizer or generation files"
    print(f"attention-zoo export-hf: {path} -> {out} ({type(hf).__name__}; copied with it: {extras})")
    return 0


def tokenizer_folders(checkpoint: Path, config: dict) -> list[Path]:
    """Where the tokenizer files of `checkpoint` may be, in order: the checkpoint itself (an import), its
    data.tokenizer (the tokenizer a fine-tuned run read; absolute as import-hf writes it), its train.init_from (the
    checkpoint a run started from). A run keeps init_from as typed, relative to where it was trained, so it is
    the last resort: exported from another folder it names nothing, or the wrong folder."""
    data, train = config.get("data") or {}, config.get("train") or {}
    folders = [checkpoint] + [Path(p) for p in (data.get("tokenizer"), train.get("init_from")) if p]
    return [folder for folder in folders if folder.is_dir()]


def set_special_tokens(config, generation_config: Path) -> None:
    """Copy bos / eos / pad token ids from `generation_config` (the generation_config.json an import brought along,
    if there is one) onto the transformers `config`, so config.json names the checkpoint's own special tokens.
    Raises UserError naming the file if it is not a JSON object."""
    import json

    from ..errors import UserError

    if not generation_config.is_file():
        return
    try:
        values = json.loads(generation_config.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{generation_config}: cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(values, dict):
        raise UserError(f"{generation_config}: expected a JSON object, got {type(values).__name__}")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if values.get(key) is not None:
            setattr(config, key, values[key])
