"""`export-hf`: a zoo checkpoint with vanilla / gqa attention as a folder transformers loads."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="write a zoo checkpoint as a transformers folder (vanilla / gqa layers)",
                       description="Write CHECKPOINT (a checkpoint folder or a run folder holding checkpoint/) to OUT "
                       "as a transformers model (Llama or Qwen2 for rope + rmsnorm + swiglu, GPT-2 for learned + "
                       "layernorm + gelu with biases) that AutoModelForCausalLM.from_pretrained(OUT) loads; the "
                       "checkpoint's tokenizer files are copied. Needs transformers: pip install 'attention-zoo[hf]'.")
    p.add_argument("checkpoint", help="checkpoint folder, or a run folder holding checkpoint/")
    p.add_argument("--out", required=True, help="transformers folder to write")
    p.set_defaults(run=cmd_export_hf)


def cmd_export_hf(args) -> int:
    from pathlib import Path

    from ..checkpoint import load_model
    from ..hf import to_hf
    from ..hf.files import copy_tokenizer_files, quiet_transformers

    quiet_transformers()

    path = Path(args.checkpoint)
    if (path / "checkpoint").is_dir():
        path = path / "checkpoint"
    model = load_model(path)
    hf = to_hf(model)
    out = Path(args.out)
    hf.save_pretrained(str(out))
    copied = copy_tokenizer_files(path, out)
    init_from = (model.config.get("train") or {}).get("init_from")
    if not copied and init_from and Path(init_from).is_dir():  # a fine-tuned run: its tokenizer came with init_from
        copied = copy_tokenizer_files(init_from, out)
    print(f"attention-zoo export-hf: {path} -> {out} ({type(hf).__name__}; tokenizer files: {', '.join(copied) or 'none'})")
    return 0
