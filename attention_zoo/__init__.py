"""attention-zoo: attention variants as plug-ins for causal transformer language models."""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from . import _source_checkout

_source_checkout.install()  # a bare checkout on PYTHONPATH finds attention_zoo.variants (see the module)

# The public names, each imported from its module on first use (PEP 562): `import attention_zoo` does not
# import torch, so the CLI answers `--help` and usage errors at once (0.1 s against 3 s) and a Ctrl-C during
# torch's import reaches the CLI's handler.
_EXPORTS = {
    "Config": "config", "ConfigError": "config", "build_model": "config", "load_config": "config",
    "SeparableBias": "ops.separable", "CHANNELS": "state", "declare_channel": "state",
    "AttentionVariant": "variant", "LayerShape": "variant", "Param": "variant", "ProjectedAttention": "variant",
    "create_variant": "variant_registry", "list_variants": "variant_registry", "register_variant": "variant_registry",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:  # a submodule (`attention_zoo.functional`, `.config`), imported as the eager package did
        if name.isidentifier() and not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, "functional"})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from . import functional
    from .config import Config, ConfigError, build_model, load_config
    from .ops.separable import SeparableBias
    from .state import CHANNELS, declare_channel
    from .variant import AttentionVariant, LayerShape, Param, ProjectedAttention
    from .variant_registry import create_variant, list_variants, register_variant

__version__ = "0.1.0"
__all__ = [
    "AttentionVariant", "Config", "ConfigError", "LayerShape", "Param", "ProjectedAttention", "SeparableBias", "CHANNELS",
    "build_model", "create_variant", "declare_channel", "functional", "list_variants", "load_config",
    "register_variant",
]
