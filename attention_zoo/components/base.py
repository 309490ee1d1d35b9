"""What a stack component is, and the small registry each kind (position, norm, mlp) keeps.

A component kind behaves like the variant registry: a decorator registers a class under a name,
third-party packages join through an entry-point group, an unknown name gets a did-you-mean, and the
parameters a component declares are validated from the YAML before anything is built.

A component's parameters are `model:` keys (`rope_theta`, `norm_eps`, `mlp_hidden`, ...), declared by
the classes that read them. Two components may read the same key (both norms read `norm_eps`) if they
declare it identically; the model section accepts every key any registered component of the kind declares.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from ..errors import out_of_memory
from ..registry import Registry, RegistryError
from ..variant import Param, PluginBuildFailed, construct, zoos_own

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class StackShape:
    """The model-wide sizes a component is built for.

    dim: model width; heads / head_dim: query heads and their width (RoPE rotates head_dim);
    max_seq_len: the training length (a cap only for learned positions); mlp_ratio: the MLP width rule's
    input (see each MLP); dropout: probability in [0, 1).
    """

    dim: int
    heads: int
    head_dim: int
    max_seq_len: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0


class Component:
    """What every component class offers the config check (mix in, or define the same names).

    params: the model keys it reads, declared as Params (validated before anything is built).
    check_shape(shape): why it cannot be built for these sizes, or None; run at validation.
    """

    params: dict[str, Param] = {}

    @classmethod
    def check_shape(cls, shape: StackShape) -> str | None:
        return None


class ComponentKind(Generic[T]):
    """A registry of one kind of component, named in the model section under `key`.

    Raises RegistryError (from `register`, `get`) for an unknown name, a duplicate registration of a
    different class, a class without `params`, or a parameter declared differently by two classes.
    """

    def __init__(self, key: str, entry_point_group: str, builtin_module: str, doc: str):
        self.key = key
        self.doc = doc
        self.registry: Registry[T] = Registry(key, entry_point_group=entry_point_group, builtin_modules=(builtin_module,))

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: `@POSITIONS.register("alibi") class ALiBi(PositionalScheme): ...`."""

        def decorator(cls: T) -> T:
            if not isinstance(getattr(cls, "params", None), dict) or not callable(getattr(cls, "check_shape", None)):
                raise RegistryError(f"{self.key} {name!r} ({cls.__qualname__}) must declare `params: dict[str, Param]` "
                                    "and `check_shape(shape)` (subclass components.Component)")
            for key, param in cls.params.items():
                for other_name in self.registry._entries:
                    other = self.registry._entries[other_name].params.get(key)
                    if other is not None and other != param and other_name != name:
                        raise RegistryError(f"{self.key} {name!r} declares model.{key} differently from {other_name!r}: "
                                            "components that share a key must declare the same Param")
            self.registry.add(name, cls)
            return cls

        return decorator

    def names(self) -> list[str]:
        return self.registry.names()

    def get(self, name: str) -> T:
        return self.registry.get(name)

    def params(self) -> dict[str, Param]:
        """Every model key some registered component of this kind reads, with its declaration."""
        out: dict[str, Param] = {}
        for name in self.names():
            out.update(self.get(name).params)
        return out

    def build(self, name: str, shape: StackShape, model: dict[str, Any]) -> Any:
        """An instance of component `name`, given the model-section values of the keys it declares. Raises
        PluginBuildFailed when a plug-in's constructor raises (a zoo component's failure is a bug: as it is)."""
        cls = self.get(name)
        try:
            return construct(cls, shape, **{key: model.get(key, param.default) for key, param in cls.params.items()})
        except Exception as exc:
            if zoos_own(cls) or out_of_memory(exc):  # out of memory: build_model says how large the model is
                raise
            raise PluginBuildFailed(f"model.{self.key}", name, cls, exc) from exc

