"""attention-zoo: attention variants as plug-ins for causal transformer language models."""
from __future__ import annotations

from . import _source_checkout, functional
from .config import Config, ConfigError, build_model, load_config
from .ops.separable import SeparableBias
from .state import CHANNELS, declare_channel
from .variant import AttentionVariant, LayerShape, Param, ProjectedAttention
from .variant_registry import create_variant, list_variants, register_variant

_source_checkout.install()  # a bare checkout on PYTHONPATH finds attention_zoo.variants (see the module)

__version__ = "0.1.0"
__all__ = [
    "AttentionVariant", "Config", "ConfigError", "LayerShape", "Param", "ProjectedAttention", "SeparableBias", "CHANNELS",
    "build_model", "create_variant", "declare_channel", "functional", "list_variants", "load_config",
    "register_variant",
]
