"""How a training step runs, not what it computes: activation checkpointing and torch.compile.

- `train.activation_checkpointing: true`: each transformer block's activations are dropped after its
  forward and recomputed in the backward (torch.utils.checkpoint, non-reentrant, RNG state preserved so
  dropout draws the same masks). Gradients equal the plain run's. State channels stay right: a block gets a
  fresh read-only view of what earlier layers wrote (state.py), so its recomputation reads the very same
  values, whatever later layers wrote since. Cached decoding and no-grad passes run the plain forward.
- `train.compile: true`: the model runs under torch.compile (no private-API tricks stand in its way: selective
  attention hands its backends plain tensors and a structured selection). On CPU the fused C++ kernel
  (ops/selection/cpu_fused.py: selective, cross-layer selective, residual and differential attention) is a
  PyTorch custom operator with a fake implementation, so dynamo traces the whole model as one graph, with no
  graph break at the kernel; compiled steps give eager's logits and gradients (tests/test_compile.py, with
  aot_eager and inductor, and with dynamic shapes). Compiled after train's eager warm-up forward, which builds
  the kernel. Not checked: the Triton kernels on a GPU under torch.compile (no GPU where this was written;
  tests/gpu/test_compile_gpu.py checks them where one is).

Both patch the model instance, never its class or its state_dict keys: checkpoints load either way.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each of `model.blocks` in the backward. Returns the model (patched in place)."""
    for block in model.blocks:
        block.forward = _checkpointed(block.forward)
    return model


def _checkpointed(forward):
    def run(x, state, cache=None, *rest):  # rest: what the block takes after the cache (the positions)
        if cache is not None or not torch.is_grad_enabled():
            return forward(x, state, cache, *rest)
        return checkpoint(forward, x, state, cache, *rest, use_reentrant=False, preserve_rng_state=True)

    run.__wrapped__ = forward
    return run


def compile_model(model: nn.Module) -> nn.Module:
    """The model under torch.compile (the returned module shares the parameters)."""
    return torch.compile(model)


__all__ = ["enable_activation_checkpointing", "compile_model"]
