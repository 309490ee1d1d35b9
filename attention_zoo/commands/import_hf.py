"""`import-hf`: a local transformers checkpoint (Llama, Mistral, Qwen2, GPT-2) as a zoo checkpoint."""
from __future__ import annotations

import argparse

from ..paths import check_output_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-hf", help="convert a local transformers checkpoint into a zoo checkpoint",
                       description="Read SRC (a local transformers folder: LlamaForCausalLM, MistralForCausalLM without "
                       "sliding window, Qwen2ForCausalLM, GPT2LMHeadModel) and write a zoo checkpoint to OUT "
                       "(model.safetensors, config.yaml and SRC's tokenizer files) that eval, generate, calibrate and "
                       "train (train.init_from) accept. Needs transformers: pip install 'attention-zoo[hf]'.")
    p.add_argument("src", help="local transformers checkpoint folder (config.json + weights); nothing is downloaded")
    p.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE",
                   help="overrides of the model section, as train takes them: the variant's parameters "
                   "(model.attention.selection_head=1), per-layer variants (model.layers=[...]), model.dropout")
    p.add_argument("--out", required=True, help="zoo checkpoint folder to write: new or empty (or, with --overwrite, "
                   "an earlier import, replaced whole)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds an earlier import (never a "
                   "training run or its checkpoint)")
    p.add_argument("--variant", help="attention variant to run on the weights (default: vanilla, or gqa for a GQA "
                   "checkpoint); its other parameters take their defaults unless set by overrides "
                   "(model.attention.PARAM=VALUE)")
    p.add_argument("--plugins", action="append", default=[], metavar="MOD[,MOD]",
                   help="plug-in modules to import first, so --variant may name a variant they register; the "
                   "checkpoint's config lists them under plugins: so train, eval and generate load them "
                   "(repeatable; their folder must be importable, e.g. PYTHONPATH=.)")
    p.add_argument("--kv-heads", type=int, metavar="N", help="mean-pool consecutive key/value heads into N groups "
                   "(GQA uptraining); N must divide the checkpoint's kv heads")
    p.set_defaults(run=cmd_import_hf)


def cmd_import_hf(args) -> int:
    from ..checkpoint import atomic_folder, write_checkpoint
    from ..data.base import VOCAB_SIZE
    from ..hf import from_hf
    from ..hf.files import check_import_target, copy_tokenizer_files, derive_generation_config, quiet_transformers
    from ..registry import import_required_plugins

    quiet_transformers()
    # before any work: an existing folder is replaced only if it is an earlier import (never a training run)
    out = check_output_path("--out", args.out, "folder")
    check_import_target(out, "--out", args.overwrite)
    plugins = import_required_plugins(args.plugins)  # named by --plugins before the (slower) load
    model = from_hf(args.src, variant=args.variant, kv_heads=args.kv_heads, plugins=plugins, overrides=args.overrides)
    with atomic_folder(out) as staging:  # the checkpoint and its tokenizer appear together or not at all
        copied = copy_tokenizer_files(args.src, staging)
        tokenizer = use_tokenizer(model, args.src, staging, out) if set(copied) - {"generation_config.json"} else None
        if derive_generation_config(args.src, staging):  # as transformers does: bos / eos / pad of config.json
            copied.append("generation_config.json (written from config.json's special tokens)")
        write_checkpoint(staging, model)
    attention = model.config["model"]["attention"]
    print(f"attention-zoo import-hf: {args.src} -> {out} ({model.num_parameters():,} parameters, attention "
          f"{attention}; copied with it: {', '.join(copied) or 'no tokenizer or generation files'})")
    if tokenizer:
        print(f"attention-zoo import-hf: data.tokenizer = {tokenizer} (train, eval and generate use these tokens)")
    elif not set(copied) - {"generation_config.json"} and model.vocab_size != VOCAB_SIZE:
        # bytes 0-255 are then read as the model's token ids 0-255, which stand for other text
        print(f"attention-zoo import-hf: {args.src} holds no tokenizer files, so data stays byte-level: train, eval "
              f"and generate feed bytes as token ids 0-255 of this {model.vocab_size:,}-token model, which are not "
              "its tokens (its numbers would mean little); copy the tokenizer files into the source folder and "
              "import again (--overwrite)")
    return 0


def use_tokenizer(model, src, staging, out) -> str | None:
    """If the tokenizer files copied into `staging` load and their ids fit the model's embedding, make `out` (where
    they will live) the config's data.tokenizer, as an absolute path so runs started from the checkpoint find it;
    that path, or None (data stays byte-level, and a line says why)."""
    from ..data import DataError
    from ..data.tokenized import load_tokenizer

    try:
        tokenizer = load_tokenizer(staging, str(out))
    except DataError as exc:  # its message names the staging folder, gone after the import
        print(f"attention-zoo import-hf: {src}: tokenizer files copied but not loadable ({exc.hint}); data stays "
              "byte-level")
        return None
    vocab = model.config["model"]["vocab_size"]
    if len(tokenizer) > vocab:  # train, eval and generate would refuse every run (model.vocab_size < the data's)
        print(f"attention-zoo import-hf: {src}: its tokenizer has {len(tokenizer)} tokens (added tokens included), "
              f"more than the model's {vocab} embedding rows (config.json's vocab_size): ids from {vocab} on have no "
              "embedding, so data stays byte-level (the tokenizer files are copied)")
        return None
    path = str(out.resolve())
    model.config["data"] = {**(model.config.get("data") or {}), "tokenizer": path}
    return path
