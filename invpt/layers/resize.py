"""Bilinear resizing with an explicit output size.

Every upsampling/downsampling in InvPT goes through :func:`resize_bilinear`, so that each call site
becomes exactly one ONNX ``Resize`` (mode=linear, coordinate_transformation_mode=half_pixel) with a
constant output size, and the graph never depends on ``scale_factor`` arithmetic. For the exact 2x
cases of the official code (``scale_factor=2``) an explicit size gives bit-identical results.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of an NCHW tensor to ``size`` (H, W) with ``align_corners=False``."""
    return F.interpolate(x, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)


class BilinearResize(nn.Module):
    """Parameter-free module form of :func:`resize_bilinear` (used inside ``nn.Sequential``)."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_bilinear(x, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, mode=bilinear, align_corners=False"


def tokens_to_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, H*W, C] row-major tokens -> [B, C, H, W]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], size[0], size[1])


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C] row-major tokens."""
    return x.flatten(2).transpose(1, 2)
