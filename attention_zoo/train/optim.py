"""AdamW with weight decay on weight matrices only, and a linear-warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, train: dict, device: torch.device) -> torch.optim.AdamW:
    """Decay applies to matrices (linear and embedding weights); biases and LayerNorm gains are
    left alone, as in GPT-2/nanoGPT. Tied weights appear once (named_parameters de-duplicates)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train["lr"], betas=tuple(train["betas"]), fused=device.type == "cuda")


def lr_factor(step: int, warmup: int, steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear from 1/warmup up to 1
    over `warmup` steps, then a cosine from 1 down to `min_ratio` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    if steps <= warmup + 1:
        return 1.0
    progress = min(1.0, (step - warmup) / (steps - warmup - 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_schedule(optimizer: torch.optim.Optimizer, train: dict) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, steps, min_ratio = train["warmup"], train["steps"], train["min_lr_ratio"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, steps, min_ratio))
