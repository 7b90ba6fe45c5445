"""One InvPT stage: optional per-task up-embedding plus skip, then one multi-task transformer block."""
from __future__ import annotations

from typing import Optional

import torch
from timm.layers import Mlp
from torch import nn

from invpt.layers.attention import MessagePassingAttention
from invpt.layers.conv import UpEmbed
from invpt.layers.resize import map_to_tokens, resize_bilinear, tokens_to_map


class InvPTBlock(nn.Module):
    """Pre-norm transformer block over the task-major concatenation of T maps [B, C, H, W].

    The attention output lives on the half-resolution query grid and is bilinearly upsampled back to
    (H, W) per task before the residual add. LayerNorm eps is PyTorch's default 1e-5 (the ViT uses 1e-6).
    """

    def __init__(
        self,
        dim: int,
        num_tasks: int,
        grid: tuple[int, int],
        kv_pool: int,
        num_heads: int = 2,
        mlp_ratio: float = 4.0,
        receives_message: bool = True,
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.grid = grid
        # Registration order follows the official state_dict (norm1, norm2, mlp, attn).
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.attn = MessagePassingAttention(dim, num_tasks, grid, kv_pool, num_heads, True, receives_message)

    def forward(
        self, maps: list[torch.Tensor], message: Optional[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        h, w = self.grid
        n = h * w
        x = torch.cat([map_to_tokens(m) for m in maps], dim=1)  # [B, T*H*W, C]
        normed = self.norm1(x)
        normed_maps = [tokens_to_map(normed[:, t * n:(t + 1) * n], self.grid) for t in range(self.num_tasks)]
        attn_out, message = self.attn(normed_maps, message)  # [B, T*(H/2)*(W/2), C]

        q_grid = self.attn.query_grid
        nq = q_grid[0] * q_grid[1]
        up = [
            map_to_tokens(resize_bilinear(tokens_to_map(attn_out[:, t * nq:(t + 1) * nq], q_grid), self.grid))
            for t in range(self.num_tasks)
        ]
        x = x + torch.cat(up, dim=1)
        x = x + self.mlp(self.norm2(x))
        return [tokens_to_map(x[:, t * n:(t + 1) * n], self.grid) for t in range(self.num_tasks)], message


class InvPTStage(nn.Module):
    """Stage i of the inverted pyramid. Stage 0 has no ``patch_embed`` (no upsampling, no skip).

    Args:
        in_dim: width of the previous stage (ignored for stage 0).
        dim: width of this stage (E, E/2, E/4).
        grid: (H, W) of this stage.
        kv_pool: 2, 4, 8 for stages 0, 1, 2 (keys/values always land on an H/64 x W/64 grid).
    """

    def __init__(
        self,
        stage: int,
        in_dim: int,
        dim: int,
        num_tasks: int,
        grid: tuple[int, int],
        kv_pool: int,
        num_heads: int = 2,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.stage = stage
        if stage > 0:
            self.patch_embed = nn.ModuleList(UpEmbed(in_dim, dim, grid) for _ in range(num_tasks))
        else:
            self.patch_embed = None
        self.blocks = nn.ModuleList(
            [InvPTBlock(dim, num_tasks, grid, kv_pool, num_heads, mlp_ratio, receives_message=stage > 0)]
        )

    def forward(
        self, maps: list[torch.Tensor], skip: Optional[torch.Tensor], message: Optional[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self.patch_embed is not None:
            maps = [embed(m) + skip for embed, m in zip(self.patch_embed, maps)]
        for blk in self.blocks:
            maps, message = blk(maps, message)
        return maps, message
