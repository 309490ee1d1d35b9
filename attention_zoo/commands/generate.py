"""`generate`: sample text from a checkpoint through the KV cache, optionally pruning the context."""
from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path

from ..env import say_if_cpu_is_busy
from ..errors import UserError
from ..numbers import finite_float


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a checkpoint (KV cache, optional context pruning)",
                       description="Prefill PROMPT, then sample one token at a time through the per-layer KV cache. "
                       "Prints the text, tokens/s and the cache size (bytes, keys kept per layer).")
    p.add_argument("checkpoint", help="checkpoint folder, or a run folder holding checkpoint/")
    p.add_argument("--prompt", required=True, help="text to continue (byte-level tokens, its first byte the BOS; or the "
                   "run's data.tokenizer tokens, with the tokenizer's BOS if it adds one)")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=finite_float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=finite_float, help="sample among the most likely tokens covering probability P")
    p.add_argument("--seed", type=int, help="random seed (default: different every run)")
    p.add_argument("--prune", metavar="POLICY", help="context pruning: threshold:TAU, budget:K, budget:K1,K2,... "
                   "(one per layer, 'none' = not pruned), or window:K (sliding-window baseline)")
    p.add_argument("--prefill-chunk", type=int, help="prefill the prompt in chunks of this many tokens "
                   "(default: all at once); with pruning, the cache is pruned after each chunk")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token (the "
                   "eos_token_id of the checkpoint's generation_config.json, else its tokenizer's; byte-level models "
                   "have none): always generate --max-tokens")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--backend", help="override the checkpoint's attention backend (auto, sdpa, math, xformers)")
    p.set_defaults(run=cmd_generate)


def cmd_generate(args) -> int:
    import torch

    from ..hf.files import end_of_sequence_ids, tokenizer_folder
    from ..inference import Pruner, Sampler, generate, parse_prune_spec
    from ..inference.checkpoints import load_for_inference

    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise UserError(f"--prefill-chunk {args.prefill_chunk}: must be >= 1")
    sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
    model, path = load_for_inference(args.checkpoint, args.device, args.backend)
    say_if_cpu_is_busy("generate", args.device)
    device = next(model.parameters()).device  # --device auto resolved
    pruner = Pruner(model, parse_prune_spec(args.prune), f"--prune {args.prune!r}") if args.prune is not None else None
    tokenizer_path = (model.config.get("data") or {}).get("tokenizer")
    stop_tokens: list[int] = []  # byte-level models have no end-of-sequence token
    if tokenizer_path:  # the run's data.tokenizer: prompt and output in its tokens
        from ..data.tokenized import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_path, f"{path}/config.yaml")
        ids = tokenizer(args.prompt, add_special_tokens=True)["input_ids"]
        if ids and max(ids) >= model.vocab_size:  # no ids at all: generate() says the prompt is empty
            raise UserError(f"--prompt: its tokens do not fit the model's vocabulary ({model.vocab_size} tokens)")
        prompt = torch.tensor([ids], dtype=torch.long, device=device)
        if not args.ignore_eos:
            stop_tokens = end_of_sequence_ids(tokenizer_folder(path, model.config), tokenizer)
        generated: list[int] = []
        shown = [""]

        def show(token: torch.Tensor) -> None:  # decode the whole continuation: tokens may split characters
            if int(token[0, 0]) < len(tokenizer) and int(token[0, 0]) not in stop_tokens:  # the vocabulary may be
                generated.append(int(token[0, 0]))  # padded past the tokenizer's; an EOS ends the text, unprinted
            text = tokenizer.decode(generated)
            out.write(text[len(shown[0]):])
            shown[0] = text
            out.flush()
    else:
        data = args.prompt.encode("utf-8")
        if max(data, default=0) >= model.vocab_size:
            raise UserError(f"--prompt: byte {max(data)} is outside the model's vocabulary ({model.vocab_size} tokens)")
        prompt = torch.tensor([list(data)], dtype=torch.long, device=device)

        def show(token: torch.Tensor) -> None:
            value = int(token[0, 0])
            out.write(decoder.decode(bytes([value])) if value < 256 else "")
            out.flush()

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = sys.stdout
    prompt_shown = [False]

    def show_prompt() -> None:  # only once generation runs: a refused prompt or flag prints nothing on stdout
        if not prompt_shown[0]:
            out.write(args.prompt)
            out.flush()
            prompt_shown[0] = True

    def show_after_prompt(token: torch.Tensor) -> None:
        show_prompt()
        show(token)

    result = generate(model, prompt, args.max_tokens, sampler, pruner=pruner, prefill_chunk=args.prefill_chunk,
                      on_token=show_after_prompt, stop_tokens=stop_tokens)
    show_prompt()
    out.write(decoder.decode(b"", final=True) + "\n")
    cache = result.cache
    print(f"\n-- {Path(path)}: prompt {result.prompt_length} tokens (prefill {result.prefill_seconds:.3f} s), "
          f"generated {result.generated} tokens in {result.decode_seconds:.2f} s "
          f"({result.tokens_per_second:.1f} tokens/s)")
    print(f"-- cache: {cache.nbytes():,} bytes; kept keys per layer: {', '.join(map(str, cache.lengths()))} "
          f"(of {cache.seen} tokens seen)")
    if pruner is not None:
        print(f"-- pruning {pruner.policy.spec()}: {pruner.describe()}")
    if result.stopped == "end_of_sequence":
        print(f"-- stopped: end-of-sequence token {int(result.tokens[0, -1])} (--ignore-eos runs on)")
    if result.stopped == "max_seq_len":
        print(f"-- stopped: the model's learned positions end at model.max_seq_len={model.max_seq_len}")
    return 0
