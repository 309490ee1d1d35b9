"""RealFormer's carried scores without a (B, H, Nq, Nk) tensor: attention on q and k concatenated over layers.

Residual attention (He et al., "RealFormer: Transformer Likes Residual Attention", 2021) carries
R_l = L_l + bias_l + R_{l-1} up the stack and attends with softmax(R_l + causal mask). With
L_m = scale_m q_m k_m^T per query head (GQA: each layer's k grouped as its own),

    sum over m <= l of scale_m q_m k_m^T = scale_l [q'_0, ..., q_l] [k_0, ..., k_l]^T,
    q'_m = q_m * scale_m / scale_l,

concatenated along the head dimension: layer l is ordinary attention with a q/k head dimension of (l + 1) D
and values of D. Selective + residual: the bias terms -F_m are structured selections, so R carries their sum
as one Selection (-F is linear in its terms). `ResidualScores` is that definition; `.dense()` makes R.

Where this cannot hold the layer carries R dense, as before: past the backend's head-dim limit (the
concatenated head dimension grows with depth), after a layer that added a dense bias, or when layers
disagree on heads. `carry` logs why, once per reason, and tells `recording_dense_carries` (describe's plan) every
time.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as tF
from torch import Tensor

from ..recording import collecting
from .selection.structure import Selection
from .separable import SeparableBias

log = logging.getLogger("attention_zoo.ops.residual")
_logged: set[str] = set()
_recorders: list[list[str]] = []


@dataclass(frozen=True, eq=False)
class ResidualScores:
    """R = scale q k^T - F: q (B, H, Nq, Dc) and k (B, Hkv, Nk, Dc), the layers' q and k concatenated along
    the head dimension; `selection`: the sum of the layers' selections (F), or None."""

    q: Tensor
    k: Tensor
    scale: float
    selection: Selection | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.q.shape[0], self.q.shape[1], self.q.shape[2], self.k.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    def dense(self) -> Tensor:
        """R itself, (B, H, Nq, Nk), differentiable."""
        from ..backends.math import grouped_logits

        R = grouped_logits(self.q, self.k, self.scale)
        return R if self.selection is None else R + self.selection.dense_bias().to(R.dtype)

    def extended(self, q: Tensor, k: Tensor, scale: float, bias: Selection | None) -> "ResidualScores | None":
        """R + scale q k^T + bias (a Selection's -F, or None), or None when the shapes cannot be concatenated."""
        if q.shape[:3] != self.q.shape[:3] or k.shape[:3] != self.k.shape[:3] or q.dtype != self.q.dtype:
            return None
        # One scale for the concatenation, this layer's: earlier layers' q carry the ratio if scales differ.
        previous_q = self.q if scale == self.scale else self.q * (self.scale / scale)
        selection = self.selection if bias is None else (bias if self.selection is None else self.selection + bias)
        return ResidualScores(torch.cat([previous_q, q], dim=-1), torch.cat([self.k, k], dim=-1), scale, selection)


def scores_tensor(value: "Tensor | ResidualScores") -> Tensor:
    """A `residual_scores` state value as the dense R (B, H, Nq, Nk)."""
    return value.dense() if isinstance(value, ResidualScores) else value


def recording_dense_carries() -> contextlib.AbstractContextManager[list[str]]:
    """Collect, in order, why each `carry` inside the block made R dense (B, H, Nq, Nk), so that a plan of the
    model (describe's meta-device forward) can say which layers pay for it and why."""
    return collecting(_recorders)


def _say_once(why: str) -> None:
    for reasons in _recorders:
        reasons.append(why)
    if why not in _logged:
        _logged.add(why)
        log.info("attention-zoo residual: carried dense (B, H, Nq, Nk): %s", why)


def carry(previous: "Tensor | ResidualScores | None", q: Tensor, k: Tensor,
          bias: "Tensor | Selection | SeparableBias | None",
          scale: float, head_dim_limit: int | None) -> tuple["ResidualScores | Tensor", "Tensor | None"]:
    """(R_l, dense bias to attend with). R_l structured where it can be (the bias is then None: attend with
    `attend`), else dense (B, H, Nq, Nk) with the dense bias (R_{l-1} + bias_l) to attend with q and k."""
    if isinstance(bias, SeparableBias):  # carried as the dense bias it is: R_l holds row_i + col_j for later layers
        _say_once("a layer added a separable bias")
        bias = bias.dense()
    elif not isinstance(bias, Tensor) and not isinstance(previous, Tensor):
        structured = ResidualScores(q, k, scale, bias) if previous is None else previous.extended(q, k, scale, bias)
        if structured is None:
            _say_once("layers disagree on batch, heads, length or dtype")
        elif head_dim_limit is not None and structured.head_dim > head_dim_limit:
            _say_once(f"the concatenated head dim {structured.head_dim} is above the backend's limit {head_dim_limit}")
        else:
            return structured, None
    elif isinstance(previous, Tensor):
        _say_once("an earlier layer carried R dense")
    else:
        _say_once("a layer added a dense bias")
    from ..backends.math import grouped_logits

    dense_previous = scores_tensor(previous) if previous is not None else None
    dense_bias = bias.dense_bias() if isinstance(bias, Selection) else bias
    total = dense_previous if dense_bias is None else (dense_bias if dense_previous is None else dense_previous + dense_bias)
    logits = grouped_logits(q, k, scale)
    return (logits if total is None else logits + total), total


def attend(scores: ResidualScores, v: Tensor, attend_fn, *, pad_values: bool = True) -> Tensor:
    """softmax(R + causal) v for a structured R: q (B, H, Nq, Dc), k (B, Hkv, Nk, Dc), v (B, Hkv, Nk, D), through
    `attend_fn(q, k, v, bias)` (the layer's attend step, whose scale is `scores.scale`). With `pad_values`, v is
    zero-padded to Dc (flash kernels want equal head dims; the zeros add nothing, but P v then costs Dc / D
    times more) and the output sliced back to (B, H, Nq, D); without, v goes as it is (the backend fuses
    unequal widths: `Backend.fuses_unequal_value_dim`)."""
    D = v.shape[-1]
    if not pad_values:
        return attend_fn(scores.q, scores.k, v, scores.selection)
    padded = v if scores.head_dim == D else tF.pad(v, (0, scores.head_dim - D))
    out = attend_fn(scores.q, scores.k, padded, scores.selection)
    return out if scores.head_dim == D else out[..., :D]


__all__ = ["ResidualScores", "carry", "attend", "scores_tensor"]
