"""Inference with any variant: token-by-token generation through the per-layer KV cache, the paper's
context pruning (evict keys selective attention has masked), streaming evaluation through a pruned
cache, budget calibration, and the auxiliary memory loss that trains a model for pruning.

See docs/inference.md.
"""
from __future__ import annotations

from .generation import GenerationResult, generate
from .key_scores import KeyGroup, key_groups, next_query_penalties
from .pruning import BudgetPolicy, Pruner, PruningError, PruningPolicy, ThresholdPolicy, WindowPolicy, parse_prune_spec
from .sampling import Sampler
from .streaming import StreamingResult, streaming_loss

__all__ = [
    "BudgetPolicy", "GenerationResult", "KeyGroup", "Pruner", "PruningError", "PruningPolicy", "Sampler",
    "StreamingResult", "ThresholdPolicy", "WindowPolicy", "generate", "key_groups", "next_query_penalties",
    "parse_prune_spec", "streaming_loss",
]
