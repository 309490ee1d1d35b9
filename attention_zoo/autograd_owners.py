"""Which module of a model made each autograd node of a forward, so that a backward that fails is blamed on the
module whose node raised (the dry run's backward, dry_run.py). No module hook sees a backward: a module's full
backward hooks would, but they wrap its inputs and outputs in a Function whose outputs a module may not change in
place (an `nn.ReLU(inplace=True)` then fails where training does not), so the nodes are tagged instead."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor

_OWNER = "attention_zoo.owner"  # the key of a node's metadata that names the module that made it


class NodeOwners:
    """Tags the autograd nodes of a forward with the dotted name of the module that made them ("" for the model
    itself), and during the backward of that forward knows whose node runs.

    A module's nodes are those reachable from its outputs and not from its inputs: `claim_inputs` at its entry
    gives what its inputs were computed through to the module running around it, `claim_outputs` at its exit
    gives the rest to it (inner modules exit first and keep theirs). Each tagged node gets a pre-hook that sets
    `current` just before the node runs, so when a node's backward raises, `current` names its module."""

    def __init__(self) -> None:
        self.current: str | None = None  # the owner of the node the backward ran last; None before any ran

    def claim_inputs(self, parent: str, inputs: Any) -> None:
        """At a module's entry: the untagged nodes `inputs` (tensors, possibly inside tuples, lists, mappings or
        dataclasses) were computed through were made before it ran, by `parent` (the module running around it)."""
        self._claim(parent, inputs)

    def claim_outputs(self, name: str, outputs: Any) -> None:
        """At the exit of module `name`: the untagged nodes its `outputs` were computed through are its own."""
        self._claim(name, outputs)

    def _claim(self, name: str, value: Any) -> None:
        todo = [t.grad_fn for t in tensors_in(value) if t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or _OWNER in node.metadata:  # None: an input that needs no gradient
                continue
            node.metadata[_OWNER] = name
            node.register_prehook(self._entering(name))
            todo.extend(next_node for next_node, _ in node.next_functions)

    def _entering(self, name: str):
        def hook(grad_outputs) -> None:  # a pre-hook returning None leaves the gradients as they are
            self.current = name
        return hook


def tensors_in(value: Any, depth: int = 0) -> Iterator[Tensor]:
    """The tensors in `value`: itself, or inside tuples, lists, mappings (a layer's state) and dataclasses (the
    Positions every layer gets), three levels deep at most."""
    if isinstance(value, Tensor):
        yield value
    elif depth >= 3:
        return
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors_in(item, depth + 1)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from tensors_in(item, depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from tensors_in(getattr(value, f.name, None), depth + 1)
