"""Instruments the tests share: they watch what torch does, not how our code is written."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LargestTensor(TorchDispatchMode):
    """Records the largest storage (in elements) behind any tensor an aten op returns (nested outputs
    included; meta tensors, which hold no memory, skipped) and the op that made it: views such as the
    stride-0 expansion over heads share a small storage and do not count as materialised."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                elements = t.untyped_storage().nbytes() // t.element_size()
                if elements > self.largest:
                    self.largest, self.op = elements, func
        return out
