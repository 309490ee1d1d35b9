"""Auxiliary losses: extra terms the train loop adds to the LM loss, named in `train.aux_losses`.

    train:
      aux_losses:
        selective_memory: {eps: 0.1, tau: 1.0}

An auxiliary loss is `fn(per_layer_updates, params, model) -> scalar Tensor`, where
`per_layer_updates[l]` is the dict of state layer l wrote (what `model(x, return_state=True)`
returns, e.g. `selection_penalty`, float32 (B, N, N)). The value is added to the loss as it is, so a
loss applies its own weight (e.g. `params["eps"]`). Each term is also logged on its own
(`aux.<name>` in metrics.jsonl).

Losses live next to the code they belong to and register themselves:

    from attention_zoo.train.aux_losses import register_aux_loss

    @register_aux_loss("my_loss", fields={"eps": Field(float, 0.1, "weight")})
    def my_loss(per_layer_updates, params, model): ...

`fields` (optional, `config.Field`s) validate and default the parameters like any config key. The
modules in PROVIDERS are imported the first time the registry is read, so their losses exist
whenever a config names them; a provider that is not there (yet) is skipped.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn

from ..config import Field
from ..registry import RegistryError, did_you_mean

AuxLossFn = Callable[[list[dict[str, Tensor]], dict[str, Any], nn.Module], Tensor]


@dataclass(frozen=True)
class AuxLoss:
    name: str
    fn: AuxLossFn
    fields: dict[str, Field] | None = None  # None: parameters are passed through unchecked


AUX_LOSSES: dict[str, AuxLoss] = {}

# Modules that register auxiliary losses; imported lazily so `import attention_zoo.train` stays light
# and a module that does not exist yet costs nothing. Add yours here.
PROVIDERS: list[str] = ["attention_zoo.inference.memory_loss"]
_providers_loaded = False
PROVIDER_FAILURES: list[str] = []


def register_aux_loss(name: str, fields: dict[str, Field] | None = None) -> Callable[[AuxLossFn], AuxLossFn]:
    def decorator(fn: AuxLossFn) -> AuxLossFn:
        old = AUX_LOSSES.get(name)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (fn.__module__, fn.__qualname__):
            raise RegistryError(f"duplicate auxiliary loss {name!r}: {old.fn.__module__}.{old.fn.__qualname__} "
                                f"and {fn.__module__}.{fn.__qualname__}")
        AUX_LOSSES[name] = AuxLoss(name, fn, fields)
        return fn

    return decorator


def _load_providers() -> None:
    """Import PROVIDERS once. A missing provider is skipped; a broken one is recorded in
    PROVIDER_FAILURES (and named when a config asks for an unknown loss) instead of breaking every run."""
    global _providers_loaded
    if _providers_loaded:
        return
    _providers_loaded = True
    for module in PROVIDERS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):
                PROVIDER_FAILURES.append(f"{module}: {type(exc).__name__}: {exc}")
            # else: the provider module (or its package) is not there: nothing to register
        except Exception as exc:
            PROVIDER_FAILURES.append(f"{module}: {type(exc).__name__}: {exc}")


def aux_loss_names() -> list[str]:
    _load_providers()
    return sorted(AUX_LOSSES)


def get_aux_loss(name: str) -> AuxLoss:
    _load_providers()
    if name not in AUX_LOSSES:
        known = sorted(AUX_LOSSES)
        raise RegistryError(f"unknown auxiliary loss {name!r}; {did_you_mean(name, known)}known: {', '.join(known) or '(none)'}")
    return AUX_LOSSES[name]
