from attention_zoo.variant import ProjectedAttention
from attention_zoo.variant_registry import register_variant


@register_variant("vanilla")
class Vanilla(ProjectedAttention):
    """Causal softmax attention: softmax(q k^T / sqrt(D) + mask) v (kv_heads < heads gives GQA)."""
