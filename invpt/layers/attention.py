"""Multi-task self-attention with attention message passing (the core of an InvPT stage).

All tasks' tokens attend jointly. Queries come from a per-task depthwise stride-2 conv; keys and values
from per-task average pooling to an H/64 x W/64 grid (the same grid at every stage, which is what lets
attention scores pass from one stage to the next). Scores are scaled by C^-0.5 with C the full width
(not the head width), and from stage 1 on they are fused by a 1x1 conv with the bilinearly upsampled
pre-softmax scores of the previous stage. The fused scores become the next stage's message.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from invpt.layers.resize import map_to_tokens, resize_bilinear


class MessagePassingAttention(nn.Module):
    """Joint attention over T task maps of size (H, W) with query stride 2 and key/value pooling ``kv_pool``.

    Args:
        dim: channel width C of every task map.
        num_tasks: T.
        grid: (H, W) of the task maps at this stage.
        kv_pool: average-pool kernel and stride for keys and values (2, 4, 8 for stages 0, 1, 2).
        num_heads: attention heads (2 in the official model).
        receives_message: False for stage 0, which has no previous scores; its ``fuse_attn`` is kept
            (the official checkpoint holds it) but never used.
    """

    def __init__(
        self,
        dim: int,
        num_tasks: int,
        grid: tuple[int, int],
        kv_pool: int,
        num_heads: int = 2,
        qkv_bias: bool = True,
        receives_message: bool = True,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_tasks = num_tasks
        self.grid = grid
        self.query_grid = (grid[0] // 2, grid[1] // 2)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = dim**-0.5  # official quirk: full width C, not head_dim
        self.receives_message = receives_message
        self.conv_proj_q = nn.ModuleList(
            nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1, groups=dim, bias=False),
                    bn=nn.BatchNorm2d(dim),
                )
            )
            for _ in range(num_tasks)
        )
        # ceil_mode=False: identical to the official ceil_mode=True for sizes that are multiples of 64.
        self.kv_pool = nn.AvgPool2d(kernel_size=kv_pool, stride=kv_pool)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fuse_attn = nn.Conv2d(2 * num_heads, num_heads, kernel_size=1)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, N, C] -> [B, heads, N, head_dim]
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _upsample_message(self, message: torch.Tensor) -> torch.Tensor:
        """Previous stage scores [B, h, T*q_prev, K] -> bilinear x2 over each task's query grid."""
        b, heads, _, k = message.shape
        prev_grid = (self.query_grid[0] // 2, self.query_grid[1] // 2)
        q_prev = prev_grid[0] * prev_grid[1]
        chunks = []
        for t in range(self.num_tasks):
            m = message[:, :, t * q_prev:(t + 1) * q_prev, :]  # [B, h, q_prev, K]
            m = m.transpose(2, 3).reshape(b * heads, k, prev_grid[0], prev_grid[1])  # keys as channels
            m = resize_bilinear(m, self.query_grid)  # [B*h, K, H/2, W/2]
            chunks.append(m.reshape(b, heads, k, -1).transpose(2, 3))  # [B, h, q, K]
        return torch.cat(chunks, dim=2)

    def _query_tokens(self, proj: nn.Sequential, m: torch.Tensor) -> torch.Tensor:
        """Depthwise conv + BN of one task's map, as tokens [B, q, C].

        In training the BN input is made channels-last first: PyTorch's CPU BatchNorm backward returns wrong input
        gradients when the incoming gradient is a channels-last view whose batch stride is not C*H*W, which is what
        the token concatenation below hands back for a batch of one (relative error ~1 in float64; tested in
        tests/test_train_loop.py). Values are unchanged; eval and export take the plain path.
        """
        x = proj.conv(m)
        if self.training and torch.is_grad_enabled():
            x = x.contiguous(memory_format=torch.channels_last)
        return map_to_tokens(proj.bn(x))

    def forward(
        self, maps: list[torch.Tensor], message: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend over normed task maps.

        Args:
            maps: T tensors [B, C, H, W] (the LayerNorm-ed tokens of each task, as maps).
            message: pre-softmax scores of the previous stage [B, heads, T*(H/4)*(W/4), K], or None.

        Returns:
            (out, scores): out [B, T*(H/2)*(W/2), C] (query resolution), scores [B, heads, Q, K] to pass on.
        """
        q = torch.cat([self._query_tokens(conv, m) for conv, m in zip(self.conv_proj_q, maps)], dim=1)  # [B, Q, C]
        kv = torch.cat([map_to_tokens(self.kv_pool(m)) for m in maps], dim=1)  # [B, K, C]
        q = self._split_heads(self.proj_q(q))
        k = self._split_heads(self.proj_k(kv))
        v = self._split_heads(self.proj_v(kv))

        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale  # [B, heads, Q, K]
        if self.receives_message:
            if message is None:
                raise ValueError("stages after the first need the previous stage's attention scores")
            scores = self.fuse_attn(torch.cat([scores, self._upsample_message(message)], dim=1))

        attn = scores.softmax(dim=-1)
        out = torch.matmul(attn, v)  # [B, heads, Q, head_dim]
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], self.dim)  # [B, Q, C]
        return self.proj(out), scores
