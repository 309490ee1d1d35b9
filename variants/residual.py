from attention_zoo.variant import ProjectedAttention
from attention_zoo.variant_registry import register_variant


@register_variant("residual")
class Residual(ProjectedAttention):
    """RealFormer residual attention: softmax(R_l + mask) v with R_l = L_l + R_{l-1} carried up the stack."""

    carry_residual = True
