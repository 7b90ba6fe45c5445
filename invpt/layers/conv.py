"""Convolutional building blocks of the InvPT decoder (state_dict names follow the official model)."""
from __future__ import annotations

import torch
from torch import nn

from invpt.layers.resize import BilinearResize


class ConvBlock(nn.Module):
    """3x3 conv (no bias) -> BatchNorm -> ReLU; the preliminary decoder's unit (keys ``conv``, ``bn1``)."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv(x)))


class UpEmbed(nn.Module):
    """Stage input for InvPT stages 1 and 2: bilinear x2, then two dilated 3x3 conv-BN-ReLU.

    ``proj`` indices 1, 2, 4, 5 hold the weights (conv, BN, conv, BN), as in the official checkpoint;
    index 0 is the parameter-free resize to ``out_size``.
    """

    def __init__(self, in_chs: int, out_chs: int, out_size: tuple[int, int]) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            BilinearResize(out_size),
            nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=1, padding=2, dilation=2, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_chs, out_chs, kernel_size=3, stride=1, padding=2, dilation=2, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class TaskHead(nn.Module):
    """Final per-task 1x1 conv (key ``linear_pred``), applied at H/4 before the upsample to input size."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.linear_pred = nn.Conv2d(in_chs, out_chs, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_pred(x)
