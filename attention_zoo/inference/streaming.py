"""Validation loss computed token by token through the (pruned) cache: exactly what generation sees.

A full forward pass lets every query see every earlier key; a pruned cache does not, so the loss of a
pruned model has to be measured the way it is used: one token at a time, pruning after each. Without
pruning the streamed loss equals the full-forward loss (tests/test_pruning.py checks it).

Cost: N forward calls per batch of sequences. Two things keep it affordable and change no number:
sequences go in batches (each row is pruned on its own), and the first `prefill` tokens go in one
chunk, which is exact whenever no key would have been dropped before then (with fixed budgets:
until a cache exceeds its smallest budget, `Pruner.safe_prefill`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data import IGNORE_INDEX, Batch
from ..errors import UserError
from .pruning import Pruner


@dataclass
class StreamingResult:
    loss: float  # mean cross-entropy (nats) over scored tokens
    tokens: int  # scored tokens
    mean_kept: list[float] = field(default_factory=list)  # per layer: keys held after each step, averaged
    peak_kept: list[int] = field(default_factory=list)  # per layer: most keys held after a step
    # with track_positions: mean loss (nats) at each position over the scored sequences, (N,) (NaN where
    # nothing was scored), and keys held, summed over layers, once the token at that position is in, (N,)
    position_loss: list[float] | None = None
    position_keys: list[int] | None = None


@torch.no_grad()
def streaming_loss(model: nn.Module, batches: Iterable[Batch], pruner: Pruner | None = None, *,
                   prefill: int | None = None, progress: bool = False, track_positions: bool = False) -> StreamingResult:
    """Mean loss over `batches`, fed `prefill` tokens at once and then one token at a time.

    prefill: default `pruner.safe_prefill()`, or the whole sequence without a pruner (exact either way).
    A loss that is not a finite number raises UserError (`stream` and `calibrate` drew a NaN curve or crashed in
    the figure): the model's logits are not numbers, from non-finite weights or an overflow.
    track_positions: also record the loss and the keys held at every position (all batches must have the
    same length). Inside the prefill chunk no key has been dropped, so there every layer holds position + 1
    keys; after it, what the cache holds once that token's step is done (pruned or not).
    Raises ValueError for a prefill < 1 (0 is not "the default": None is), batches of different lengths with
    track_positions, or batches with no scored token.
    """
    if prefill is not None and (isinstance(prefill, bool) or not isinstance(prefill, int) or prefill < 1):
        raise ValueError(f"prefill {prefill!r}: must be a whole number >= 1 (None: the default)")
    model.eval()
    total, count = 0.0, 0
    kept_sum: list[float] = []
    kept_peak: list[int] = []
    steps = 0
    batches = list(batches)
    bar = tqdm(total=sum(b.inputs.shape[1] for b in batches), desc="streaming eval", unit="tok", leave=False,
               disable=not progress)
    device = next(model.parameters()).device
    length = batches[0].inputs.shape[1] if batches else 0
    if track_positions and any(b.inputs.shape[1] != length for b in batches):
        raise ValueError("track_positions needs batches of one sequence length")
    position_sum = torch.zeros(length, dtype=torch.float64)
    position_count = torch.zeros(length, dtype=torch.float64)
    position_keys = [0] * length
    for batch in batches:
        inputs, targets = batch.inputs.to(device), batch.targets.to(device)
        N = inputs.shape[1]
        first = prefill if prefill is not None else N if pruner is None else pruner.safe_prefill()
        first = max(1, min(first, N))
        cache = model.new_cache()
        begin = 0
        while begin < N:
            end = first if begin == 0 else begin + 1
            logits = model(inputs[:, begin:end], cache=cache)  # (B, c, V)
            if pruner is not None:
                pruner(cache)
            target = targets[:, begin:end]
            losses = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="none").view(target.shape)  # (B, c), 0 where ignored
            total += losses.sum().item()
            scored = target != IGNORE_INDEX
            count += int(scored.sum())
            lengths = cache.lengths()
            if track_positions:
                position_sum[begin:end] += losses.sum(0).double().cpu()
                position_count[begin:end] += scored.sum(0).double().cpu()
                depth = len(lengths)
                for p in range(begin, end - 1):  # inside a prefill chunk: nothing dropped yet
                    position_keys[p] = max(position_keys[p], depth * (p + 1))
                position_keys[end - 1] = max(position_keys[end - 1], sum(lengths))
            kept_sum = [a + b for a, b in zip(kept_sum, lengths)] if kept_sum else [float(n) for n in lengths]
            kept_peak = [max(a, b) for a, b in zip(kept_peak, lengths)] if kept_peak else list(lengths)
            steps += 1
            bar.update(end - begin)
            begin = end
    bar.close()
    if count == 0:
        raise ValueError("no scored tokens in the evaluation batches")
    if not math.isfinite(total):
        raise UserError(f"the streamed loss is {total / count}: the model's logits are not all finite numbers "
                        "(non-finite weights in the checkpoint, or an overflow in a low-precision dtype)")
    result = StreamingResult(total / count, count, [s / steps for s in kept_sum], kept_peak)
    if track_positions:
        result.position_loss = (position_sum / position_count).tolist()  # NaN where nothing was scored
        result.position_keys = position_keys
    return result
