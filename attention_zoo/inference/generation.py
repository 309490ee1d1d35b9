"""Autoregressive generation through the per-layer KV cache, for any variant.

The loop knows no variant: it prefills the prompt, then feeds one sampled token at a time; whatever
a layer needs to continue (selective attention's accumulator, ...) lives in its LayerCache. A pruner,
if given, runs after every forward call, so the cache never holds more than the policy allows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Collection

import torch
from torch import Tensor, nn

from ..cache import ModelCache
from ..errors import UserError
from ..numbers import is_whole
from .pruning import Pruner
from .sampling import Sampler


@dataclass
class GenerationResult:
    tokens: Tensor  # (B, P + G): the prompt, then the generated tokens
    prompt_length: int
    cache: ModelCache
    prefill_seconds: float
    decode_seconds: float  # sampling and the forward calls after the prefill
    stopped: str  # "max_tokens", "max_seq_len" or "end_of_sequence"

    @property
    def generated(self) -> int:
        return self.tokens.shape[1] - self.prompt_length

    @property
    def tokens_per_second(self) -> float:
        return self.generated / self.decode_seconds if self.decode_seconds > 0 else float("inf")


@torch.no_grad()
def generate(model: nn.Module, prompt: Tensor, max_tokens: int, sampler: Sampler, *, pruner: Pruner | None = None,
             prefill_chunk: int | None = None, on_token: Callable[[Tensor], None] | None = None,
             stop_tokens: Collection[int] = ()) -> GenerationResult:
    """prompt (B, P) -> up to `max_tokens` new tokens per row.

    Learned positions end at model.max_seq_len: a token sampled there is kept but cannot be fed back,
    so generation stops (`stopped == "max_seq_len"`); rope and none run on past it. Once every row has
    sampled one of `stop_tokens` (end-of-sequence ids), generation stops (`stopped == "end_of_sequence"`);
    the stop token is the last one kept, and a row that ended before others is sampled on until they end
    (cut it at its first stop token). `on_token(tokens (B, 1))` sees each new token. Raises UserError for
    a prompt that is not a (B, P) integer tensor of token ids in [0, model.vocab_size), an empty prompt, one
    past learned positions, or a max_tokens that is not a whole number >= 0.
    """
    _check_prompt(prompt, model.vocab_size)
    B, P = prompt.shape
    if P == 0:
        raise UserError("the prompt is empty: give at least one token (it becomes position 0, the BOS)")
    limit = model.max_positions  # None: no positional cap (rope, none)
    if limit is not None and P > limit:
        raise UserError(f"the prompt has {P} tokens but the model's positions end at model.max_seq_len="
                        f"{model.max_seq_len}; shorten it")
    if not is_whole(max_tokens):
        raise UserError(f"max_tokens {max_tokens!r}: must be a whole number >= 0")
    if max_tokens < 0:
        raise UserError(f"--max-tokens {max_tokens}: must be >= 0")
    if prefill_chunk is not None and prefill_chunk < 1:  # 0 is not "all at once": None is
        raise UserError(f"--prefill-chunk {prefill_chunk}: must be >= 1")
    model.eval()
    cache = model.new_cache()
    chunk = P if prefill_chunk is None else prefill_chunk
    start = time.perf_counter()
    for begin in range(0, P, chunk):
        logits = model(prompt[:, begin:begin + chunk], cache=cache)
        if pruner is not None:
            pruner(cache)
    prefill_seconds = time.perf_counter() - start

    out, stopped = [prompt], "max_tokens"
    stop = torch.tensor(sorted(stop_tokens), dtype=torch.long, device=prompt.device)
    ended = torch.zeros(B, 1, dtype=torch.bool, device=prompt.device)
    start = time.perf_counter()
    for step in range(max_tokens):
        token = sampler(logits[:, -1])  # (B, 1)
        out.append(token)
        if on_token is not None:
            on_token(token)
        if stop_tokens:
            ended |= torch.isin(token, stop)
            if bool(ended.all()):
                stopped = "end_of_sequence"
                break
        if step == max_tokens - 1:
            break
        if limit is not None and cache.seen >= limit:
            stopped = "max_seq_len"
            break
        logits = model(token, cache=cache)
        if pruner is not None:
            pruner(cache)
    return GenerationResult(torch.cat(out, dim=1), P, cache, prefill_seconds, time.perf_counter() - start, stopped)


def _check_prompt(prompt: Tensor, vocab_size: int) -> None:
    """UserError unless `prompt` is a (B, P) integer tensor of ids in [0, vocab_size): a 1-D prompt, float ids or an
    id past the vocabulary failed deep inside the model ("not enough values to unpack", "index out of range in
    self"). One host sync when P > 0."""
    if not isinstance(prompt, Tensor) or prompt.dim() != 2:
        shape = tuple(prompt.shape) if isinstance(prompt, Tensor) else type(prompt).__name__
        raise UserError(f"prompt {shape}: expected a (batch, tokens) tensor of token ids, e.g. torch.tensor([ids])")
    if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
        raise UserError(f"prompt of dtype {prompt.dtype}: token ids must be integers (torch.long)")
    if prompt.numel():
        low, high = int(prompt.min()), int(prompt.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            row, col = (prompt == bad).nonzero()[0].tolist()
            raise UserError(f"prompt token {bad} (row {row}, position {col}) is outside the model's vocabulary: ids "
                            f"must be in [0, {vocab_size})")
