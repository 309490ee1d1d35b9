from attention_zoo.variant import BASE_PARAMS, KV_HEADS, LayerShape, Param, ProjectedAttention
from attention_zoo.variant_registry import register_variant


def _fewer_than_heads(value, shape: LayerShape):
    message = KV_HEADS.check(value, shape)
    if message is None and value >= shape.heads:
        return f"gqa needs 1 <= kv_heads < heads ({shape.heads}); use `vanilla` for kv_heads == heads"
    return message


@register_variant("gqa")
class GroupedQuery(ProjectedAttention):
    """Grouped-query attention: query head h reads kv head h // (heads / kv_heads); kv_heads 1 is MQA."""

    params = {**BASE_PARAMS, "kv_heads": Param(int, doc="key/value heads, 1 <= kv_heads < heads", required=True,
                                                check=_fewer_than_heads)}
