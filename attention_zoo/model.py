"""A causal transformer LM composed of registered parts (nanoGPT layout, pre-norm).

Which positional scheme, norm and MLP it uses are components (components/), which attention each layer
runs is a variant (variants/); this file composes them and names none. State between layers flows
through `state` (see state.py): each layer gets a fresh read-only view of what earlier layers wrote
and returns its own updates.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from .cache import LayerCache, ModelCache
from .components import PositionalScheme, Positions
from .initialization import init_gpt2
from .state import check_writes, fresh_view, merge, state_sizes


def own_attention_note(model: nn.Module, layers: list[int], backend: str) -> str | None:
    """What to tell a user whose config names `backend` when `layers` (from `CausalLM.warm_up`) make no
    backend call; None when there is nothing to say (no such layer, or backend auto)."""
    if not layers or backend == "auto":
        return None
    names = sorted({type(model.blocks[i].attention).__name__ for i in layers})
    applies = "to no layer" if len(layers) == len(model.blocks) else "to the other layers only"
    several = len(layers) > 1
    return (f"layer{'s' if several else ''} {', '.join(map(str, layers))} ({', '.join(names)}) compute"
            f"{'' if several else 's'} attention in the variant's own attend() and make{'' if several else 's'} no "
            f"backend call: backend {backend!r} applies {applies}")


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention computes in for activations `x`: autocast's where it is on (never on meta), else x's."""
    device = x.device.type
    on = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    return torch.get_autocast_dtype(device) if on else x.dtype


class Block(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)). x: (B, N, dim)."""

    def __init__(self, attention: nn.Module, mlp: nn.Module, make_norm: Callable[[], nn.Module], dropout: float):
        super().__init__()
        self.norm_attn = make_norm()
        self.attention = attention
        self.norm_mlp = make_norm()
        self.mlp = mlp
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, state: Mapping[str, Tensor], cache: LayerCache | None, positions: Positions
                ) -> tuple[Tensor, dict[str, Tensor]]:
        a, updates = self.attention(self.norm_attn(x), state, cache, positions)
        x = x + self.dropout(a)
        x = x + self.mlp(self.norm_mlp(x))
        return x, updates


class CausalLM(nn.Module):
    """tokens (B, N) int64 -> logits (B, N, vocab_size). Built by `build_model` from a validated config.

    attentions: one attention module per layer; mlps: one MLP per layer; make_norm: builds one norm
    (called 2 * depth + 1 times); position_embedding: the positional scheme (learned table, rotary, none).
    max_seq_len is the training length; it caps inputs only where the scheme has `max_positions` (learned).
    """

    def __init__(self, attentions: list[nn.Module], mlps: list[nn.Module], *, make_norm: Callable[[], nn.Module],
                 position_embedding: PositionalScheme, vocab_size: int, dim: int, max_seq_len: int,
                 dropout: float = 0.0, tie_embeddings: bool = True):
        super().__init__()
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = position_embedding
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(a, m, make_norm, dropout) for a, m in zip(attentions, mlps, strict=True))
        self.norm = make_norm()
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.config: dict | None = None  # the validated config this model was built from, if any
        init_gpt2(self, depth=len(self.blocks))

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model can encode (learned positions), or None: no cap (rope, none)."""
        return self.position_embedding.max_positions

    def new_cache(self) -> ModelCache:
        """An empty inference cache, one LayerCache per block, for `forward(tokens, cache=...)`."""
        return ModelCache([LayerCache() for _ in self.blocks])

    def forward(self, tokens: Tensor, cache: ModelCache | None = None, return_state: bool = False):
        """tokens (B, N) -> logits (B, N, V). With `cache`, tokens continue what the cache has seen.

        return_state: also return each layer's state updates (a list of dicts), e.g. for auxiliary
        losses on the selection penalty. Raises ValueError for a token id outside 0..vocab_size-1 (CPU tokens
        only), past `max_positions` (learned positions) and for a
        state write that does not match its channel (state.check_writes), RuntimeError for a write the layer
        did not declare (state.merge).
        """
        B, N = tokens.shape
        if tokens.device.type == "cpu" and not torch.compiler.is_compiling():
            self._check_ids(tokens)
        start = cache.seen if cache is not None else 0
        if self.max_positions is not None and start + N > self.max_positions:
            raise ValueError(f"sequence of {start + N} tokens exceeds model.max_seq_len={self.max_seq_len} "
                             "(learned positions end there; rope or none have no such limit)")
        index = torch.arange(start, start + N, device=tokens.device).expand(B, N)  # (B, N) absolute positions
        x = self.token_embedding(tokens)  # (B, N, dim)
        positions = self.position_embedding.prepare(index, x.dtype)  # computed once, read by every layer
        x = self.dropout(self.position_embedding.embed(x, index))
        state: dict[str, Tensor] = {}
        per_layer = []
        for i, block in enumerate(self.blocks):
            x, updates = block(x, fresh_view(state), None if cache is None else cache.layers[i], positions)
            who = f"layer {i} ({type(block.attention).__name__})"
            if updates:  # checked where state passes between layers, whatever a variant's forward does
                keys = N if cache is None else cache.layers[i].length  # Nk: every key the new rows see
                check_writes(updates, state_sizes(block.attention, B, N, keys, who), compute_dtype(x), who)
            state = merge(state, updates, block.attention.writes, who)
            if return_state:
                per_layer.append(updates)
        if cache is not None:
            cache.seen += N
        logits = self.lm_head(self.norm(x))  # (B, N, V)
        return (logits, per_layer) if return_state else logits

    def _check_ids(self, tokens: Tensor) -> None:
        """Raise ValueError naming the first token id outside 0..vocab_size-1 and its position: the embedding's
        own error is `IndexError: index out of range in self`. CPU tensors only: on a GPU the check would read a
        value back to the host (a device sync every forward), and the device's own assert names no id anyway;
        skipped under torch.compile, where a data-dependent branch breaks the graph."""
        bad = (tokens < 0) | (tokens >= self.vocab_size)
        if not bad.any():
            return
        where = bad.nonzero()
        position = tuple(where[0].tolist())
        count = f"; {len(where)} ids are outside" if len(where) > 1 else ""
        raise ValueError(f"token id {tokens[position].item()} at position {position} of tokens "
                         f"{tuple(tokens.shape)} is outside the vocabulary: ids are 0..{self.vocab_size - 1} "
                         f"(model.vocab_size = {self.vocab_size}){count}")

    def warm_up(self, device: torch.device | str, *, grad: bool = False) -> list[int]:
        """One forward of two tokens on `device`, without dropout (and gradients), so that what a backend builds
        on first use for this model's calls (the CPU selective-attention kernel: about a minute, once per
        machine) is built now, outside timed work. Changes no parameter and draws no random numbers.
        With `grad`, the forward records gradients, as a training step's does: what fails only then (a plug-in
        changing a parameter in place) fails here, before a training run writes anything (no backward runs).

        Returns the indices of the layers that made no backend call: their variant computes attention in its
        own `attend()`, so the config's `backend:` does not apply to them (train and bench say so)."""
        from .backends import recording_calls

        was_training = self.training
        self.eval()
        called: list[bool] = []
        with recording_calls() as calls:
            def layer_done(*_) -> None:  # a forward hook must return None, or it replaces the block's output
                called.append(bool(calls))
                calls.clear()

            hooks = [block.register_forward_hook(layer_done) for block in self.blocks]
            try:
                with torch.set_grad_enabled(grad):
                    self(torch.zeros(1, 2, dtype=torch.long, device=device))
            finally:
                self.train(was_training)
                for hook in hooks:
                    hook.remove()
        return [i for i, made_a_call in enumerate(called) if not made_a_call]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
