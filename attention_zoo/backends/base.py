"""The one attention primitive every variant uses, and the contract a backend fulfils.

    out = softmax(scale * q k^T + bias + causal_mask) v

q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D) with H % Hkv == 0 (query head h reads kv head h // (H // Hkv)).
bias: broadcastable to (B, H, Nq, Nk), or None. `causal` is bottom-right aligned, so with Nk - Nq
cached keys query i sits at absolute position Nk - Nq + i and sees keys j <= Nk - Nq + i.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AttentionCall:
    """What a backend needs to know to accept or refuse a call, without the tensors themselves.

    Built from real tensors at run time, or from a config on the meta device by `describe`.
    """

    device: str  # "cpu", "cuda", "meta", ...
    dtype: torch.dtype
    heads: int
    kv_heads: int
    head_dim: int
    q_len: int
    k_len: int
    has_bias: bool = False
    bias_requires_grad: bool = False
    grad_enabled: bool = False
    value_dim: int | None = None  # v's width when it differs from q/k's (differential attention), else None

    def unequal_value_dim(self) -> str | None:
        """The refusal of a kernel that needs v as wide as q and k, or None when it is."""
        if self.value_dim is None or self.value_dim == self.head_dim:
            return None
        return f"values of width {self.value_dim} differ from q/k's head dim {self.head_dim}; its kernels need them equal"

    @classmethod
    def from_tensors(cls, q: Tensor, k: Tensor, bias: Tensor | None, v: Tensor | None = None) -> "AttentionCall":
        return cls(
            device=q.device.type,
            dtype=q.dtype,
            heads=q.shape[1],
            kv_heads=k.shape[1],
            head_dim=q.shape[-1],
            q_len=q.shape[2],
            k_len=k.shape[2],
            has_bias=bias is not None,
            bias_requires_grad=bias is not None and bias.requires_grad,
            grad_enabled=torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                      or bias is not None and bias.requires_grad),
            value_dim=None if v is None or v.shape[-1] == q.shape[-1] else v.shape[-1],
        )


class Backend:
    """A way to compute the primitive on some devices. Subclasses set `name` and implement both methods."""

    name: str = "?"
    description: str = ""

    def refuse(self, call: AttentionCall) -> str | None:
        """Why this backend cannot run `call`, or None if it can."""
        raise NotImplementedError

    def defer(self, call: AttentionCall) -> str | None:
        """Why `auto` should leave `call` to the backends after this one although this one could run it
        (they are faster for it), or None. Naming the backend explicitly ignores this."""
        return None

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None, causal: bool, scale: float) -> Tensor:
        raise NotImplementedError


def causal_mask(q_len: int, k_len: int, device: torch.device | str | None = None) -> Tensor:
    """Bool (Nq, Nk), True where query i may see key j (bottom-right aligned)."""
    offset = k_len - q_len
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    return j <= i + offset


def group_queries(q: Tensor, kv_heads: int) -> Tensor:
    """(B, H, N, D) -> (B, Hkv, G, N, D): a view, so GQA never copies k and v to H heads."""
    return q.unflatten(1, (kv_heads, q.shape[1] // kv_heads))
