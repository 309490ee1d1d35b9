"""`export-hf`: a zoo checkpoint with vanilla / gqa attention as a folder transformers loads."""
from __future__ import annotations

import argparse

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
    from ..hf.files import check_export_target, copy_tokenizer_files, quiet_transformers, read_generation_config, tokenizer_folder

    quiet_transformers()

    out = check_output_path("--out", args.out, "folder")
    path = resolve_checkpoint(args.checkpoint)
    check_export_target(out, "--out", args.overwrite)  # before any work: an existing folder is replaced only if it is an export
    model = load_model(path)
    hf = to_hf(model)
    folder = tokenizer_folder(path, model.config)
    for key, value in read_generation_config(folder).items():  # config.json names the checkpoint's own special tokens
        if key in ("bos_token_id", "eos_token_id", "pad_token_id") and value is not None:
            setattr(hf.config, key, value)
    with atomic_folder(out) as staging:  # written next to OUT, renamed into place only when complete
        hf.save_pretrained(str(staging))
        copied = copy_tokenizer_files(folder, staging)  # its generation_config.json replaces the one just saved
    extras = ", ".join(copied) or "no tokenizer or generation files"
    print(f"attention-zoo export-hf: {path} -> {out} ({type(hf).__name__}; copied with it: {extras})")
    return 0
