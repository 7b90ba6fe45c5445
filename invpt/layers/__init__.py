"""InvPT building blocks, one concept per module (timm style)."""
from invpt.layers.attention import MessagePassingAttention
from invpt.layers.conv import ConvBlock, TaskHead, UpEmbed
from invpt.layers.invpt_stage import InvPTBlock, InvPTStage
from invpt.layers.resize import BilinearResize, map_to_tokens, resize_bilinear, tokens_to_map

__all__ = [
    "BilinearResize", "ConvBlock", "InvPTBlock", "InvPTStage", "MessagePassingAttention", "TaskHead", "UpEmbed",
    "map_to_tokens", "resize_bilinear", "tokens_to_map",
]
