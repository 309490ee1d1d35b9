"""Built-in attention variants. Each module registers itself with `@register_variant` on import."""
from . import cross_layer_selective, differential, gqa, residual, selective, vanilla  # noqa: F401
