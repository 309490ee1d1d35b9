"""A causal transformer LM whose layer loop knows no variant (nanoGPT layout, pre-LayerNorm).

State between layers flows through `state` (see state.py): each layer gets a fresh read-only view of
what earlier layers wrote and returns its own updates. Nothing here names a variant.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .cache import LayerCache, ModelCache
from .state import fresh_view, merge


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    def __init__(self, attention: nn.Module, dim: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attention = attention
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, state: Mapping[str, Tensor], cache: LayerCache | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        a, updates = self.attention(self.norm_attn(x), state, cache)
        x = x + self.dropout(a)
        x = x + self.mlp(self.norm_mlp(x))
        return x, updates


class CausalLM(nn.Module):
    """tokens (B, N) -> logits (B, N, vocab_size). Built by `build_model` from a validated config."""

    def __init__(self, attentions: list[nn.Module], *, vocab_size: int, dim: int, max_seq_len: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, tie_embeddings: bool = True):
        super().__init__()
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(max_seq_len, dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(a, dim, mlp_ratio, dropout) for a in attentions)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.config: dict | None = None  # the validated config this model was built from, if any
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: shrink residual-branch outputs with depth
            if name.endswith(("out_proj.weight", "down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * len(self.blocks)))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def new_cache(self) -> ModelCache:
        return ModelCache([LayerCache() for _ in self.blocks])

    def forward(self, tokens: Tensor, cache: ModelCache | None = None, return_state: bool = False):
        """tokens (B, N) -> logits (B, N, V). With `cache`, tokens continue what the cache has seen.

        return_state: also return each layer's state updates (a list of dicts), e.g. for auxiliary
        losses on the selection penalty.
        """
        B, N = tokens.shape
        start = cache.seen if cache is not None else 0
        if start + N > self.max_seq_len:
            raise ValueError(f"sequence of {start + N} tokens exceeds model.max_seq_len={self.max_seq_len}")
        positions = torch.arange(start, start + N, device=tokens.device)
        x = self.dropout(self.token_embedding(tokens) + self.position_embedding(positions))  # (B, N, dim)
        state: dict[str, Tensor] = {}
        per_layer = []
        for i, block in enumerate(self.blocks):
            x, updates = block(x, fresh_view(state), None if cache is None else cache.layers[i])
            state = merge(state, updates, block.attention.writes, f"layer {i} ({type(block.attention).__name__})")
            if return_state:
                per_layer.append(updates)
        if cache is not None:
            cache.seen += N
        logits = self.lm_head(self.norm(x))  # (B, N, V)
        return (logits, per_layer) if return_state else logits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
