"""Selective attention's op: attention with the bias -F, F defined by a structured `Selection`.

Implementations side by side, one job each:
- `structure.py`: what defines F (the selection head's q and k, protect_bos, scale, weights, a cache's
  accumulator): the value variants hand the backends and pass up the stack.
- `reference.py`: the naive reference from the equations (F materialised); the `math` backend runs it.
- `cpu_fused.py` + `cpu_kernel.cpp`: the same algorithm as one C++ kernel (built on first use); the `sdpa`
  backend runs it on CPU, and plain attention with q/k and v of different widths (residual attention).
- `blocked.py`: PyTorch over query blocks, F kept at block boundaries only; the `sdpa` backend runs it where
  the C++ kernel is not available.
- `dense.py`: F as one dense tensor (a Selection's terms summed), for backends that take a dense bias and
  for readers that need F itself (auxiliary losses); one head's F comes from
- `penalty.py`: the fused PyTorch op (blocked row cumsum, a bool mask kept for the backward) and the
  autograd wrapper of
- `triton.py`: Triton kernels that compute F, forward and backward, without storing the logits.
- `triton_fused.py`: the triton backend's attention with F formed per tile inside its kernels, never stored.
"""
from .structure import Selection, SelectionTerm, penalty_tensor

__all__ = ["Selection", "SelectionTerm", "penalty_tensor"]
