"""Per-layer inference cache, owned by the variant that fills it.

Keys, values and any per-key float32 statistics (selective attention's accumulator) live side by side,
so evicting a key drops all of them at once and the generation loop never needs to know which variant
it is driving. Tensors are compacted on eviction: evicted keys free their memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LayerCache:
    k: Tensor | None = None  # (B, Hkv, T, D)
    v: Tensor | None = None  # (B, Hkv, T, D)
    positions: Tensor | None = None  # (B, T) absolute positions of the kept keys
    # name -> (B, ..., T) float32: one value per kept key (the last dim), e.g. (B, T), or (B, H, T) per head
    per_key: dict[str, Tensor] = field(default_factory=dict)
    # name -> tensor: the variant's running state that is not per key (e.g. a running sum over every token
    # seen, evicted ones included); kept as it is on eviction
    running: dict[str, Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def next_position(self) -> int:
        """The absolute position after the last kept key (0 when empty). Reads the device: a host sync."""
        return int(self.positions[0, -1]) + 1 if self.length else 0

    def extend(self, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Append a chunk of c new keys (B, Hkv, c, D) at absolute positions (B, c); return all keys and values.
        Every per-key statistic grows by c zeros, for the variant to fill in."""
        B, c = k.shape[0], k.shape[2]
        pos = positions.expand(B, c)
        if self.k is None:  # own compact copies: k, v may be views of a projection that holds more (v of a fused
            # k|v whose k half rope replaced), positions one row expanded over B; nbytes() is then what is held
            own = lambda t: t.clone(memory_format=torch.contiguous_format)  # noqa: E731
            self.k, self.v, self.positions = own(k), own(v), own(pos)
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
            self.positions = torch.cat([self.positions, pos], dim=1)
        for name, stat in self.per_key.items():
            self.per_key[name] = torch.cat([stat, stat.new_zeros(*stat.shape[:-1], c)], dim=-1)
        return self.k, self.v

    def stat(self, name: str, batch: int, device: torch.device, shape: tuple[int, ...] = ()) -> Tensor:
        """A per-key statistic (batch, *shape, T) float32, created as zeros on first use (after `extend`, so T
        counts the new keys too). Raises ValueError when the statistic exists with another shape."""
        if name not in self.per_key:
            self.per_key[name] = torch.zeros(batch, *shape, self.length, device=device, dtype=torch.float32)
        stat = self.per_key[name]
        if tuple(stat.shape) != (batch, *shape, self.length):
            raise ValueError(f"per-key statistic {name!r} is {tuple(stat.shape)}, asked for "
                             f"{(batch, *shape, self.length)} (batch, ..., kept keys)")
        return stat

    def keep(self, index: Tensor) -> None:
        """Keep only keys `index` (B, K), in that order (callers pass sorted indices)."""
        gather_kv = index[:, None, :, None].expand(-1, self.k.shape[1], -1, self.k.shape[3])
        self.k = self.k.gather(2, gather_kv)
        self.v = self.v.gather(2, gather_kv)
        self.positions = self.positions.gather(1, index)
        self.per_key = {n: s.gather(-1, _along_keys(index, s)) for n, s in self.per_key.items()}

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds: keys, values, positions, per-key and running state. Each is its
        own compact tensor (extend copies, keep gathers, cat allocates), so this is the memory kept alive."""
        tensors = [self.k, self.v, self.positions, *self.per_key.values(), *self.running.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _along_keys(index: Tensor, stat: Tensor) -> Tensor:
    """index (B, K) expanded over the middle dims of a (B, ..., T) statistic, to gather its last dim."""
    middle = stat.shape[1:-1]
    return index.view(index.shape[0], *(1 for _ in middle), index.shape[1]).expand(-1, *middle, -1)


@dataclass
class ModelCache:
    """One LayerCache per layer, plus how many tokens the model has consumed so far."""

    layers: list[LayerCache]
    seen: int = 0

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def lengths(self) -> list[int]:
        return [layer.length for layer in self.layers]
