from attention_zoo.variant_registry import register_variant
from attention_zoo.variant import ProjectedAttention


@register_variant("vanilla")
class Vanilla(ProjectedAttention):
    """Causal softmax attention: softmax(q k^T / sqrt(D) + mask) v (kv_heads < heads gives GQA)."""
