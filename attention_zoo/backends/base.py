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

from ..ops.selection.structure import Selection
from ..ops.separable import SeparableBias


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
    has_selection: bool = False  # the bias is a structured selection (ops/selection), not a tensor
    value_dim: int | None = None  # v's width when it differs from q/k's (differential attention), else None
    separable_width: int = 0  # the bias is a SeparableBias whose fold adds this many q/k columns (ops/separable)

    def unequal_value_dim(self) -> str | None:
        """The refusal of a kernel that needs v as wide as q and k, or None when it is."""
        if self.value_dim is None or self.value_dim == self.head_dim:
            return None
        return f"values of width {self.value_dim} differ from q/k's head dim {self.head_dim}; its kernels need them equal"

    @classmethod
    def from_tensors(cls, q: Tensor, k: Tensor, bias: "Tensor | Selection | SeparableBias | None", v: Tensor | None = None
                     ) -> "AttentionCall":
        """The call for these tensors. `grad_enabled`: autograd records it (q, k, v or the bias requires grad)."""
        bias_grad = bias is not None and bias.requires_grad
        inputs_grad = q.requires_grad or k.requires_grad or (v is not None and v.requires_grad)
        return cls(
            device=q.device.type,
            dtype=q.dtype,
            heads=q.shape[1],
            kv_heads=k.shape[1],
            head_dim=q.shape[-1],
            q_len=q.shape[2],
            k_len=k.shape[2],
            has_bias=bias is not None,
            bias_requires_grad=bias_grad,
            grad_enabled=torch.is_grad_enabled() and (inputs_grad or bias_grad),
            has_selection=isinstance(bias, Selection),
            value_dim=None if v is None or v.shape[-1] == q.shape[-1] else v.shape[-1],
            separable_width=bias.fold_width(q.shape[1], k.shape[1]) if isinstance(bias, SeparableBias) else 0,
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

    def fuses_unequal_value_dim(self, device: str) -> bool:
        """Whether a plain call (no bias) with v narrower or wider than q/k runs fused on `device`, without
        (B, H, Nq, Nk) scores; residual attention then attends with its own v instead of a zero-padded one."""
        return False

    def head_dim_limit(self, device: str) -> int | None:
        """The largest q/k head dim this backend runs with its fast kernels on `device`, or None (no limit)."""
        return None

    # A backend that fuses a structured selection (-F built inside its attention, see ops/selection) sets this to
    # a method (q, k, v, selection, *, causal, scale) -> out. Otherwise the dispatcher hands it -F as a dense
    # (B, 1, Nq, Nk) bias.
    selective_attention = None

    # A backend that reads a SeparableBias's column term in its kernels, in any dtype (ops/separable.py), sets
    # this to a method (q, k, v, bias, *, causal, scale) -> out. Otherwise the dispatcher folds the bias into q
    # and k where that is exact (`backends.fold_plan`), or hands it dense.
    separable_attention = None


def causal_mask(q_len: int, k_len: int, device: torch.device | str | None = None) -> Tensor:
    """Bool (Nq, Nk), True where query i may see key j (bottom-right aligned)."""
    offset = k_len - q_len
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    return j <= i + offset


def group_queries(q: Tensor, kv_heads: int) -> Tensor:
    """(B, H, N, D) -> (B, Hkv, G, N, D): a view, so GQA never copies k and v to H heads."""
    return q.unflatten(1, (kv_heads, q.shape[1] // kv_heads))
