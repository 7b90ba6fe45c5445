"""InvPT: Inverted Pyramid Multi-task Transformer (Ye & Xu, ECCV 2022), written from the spec.

Module tree and state_dict names match the official implementation, so official checkpoints load
strictly (dead-but-present weights included). Dead computation is skipped: the layer-18 tap and
``scale_embed.2`` (computed then discarded upstream), ``redu_chan.0``, ``norm_mt`` and stage-0
``fuse_attn`` are registered but never run.

Shapes for the official PASCAL model (T=5, 512x512, E=576) are given in comments as examples.
"""
from __future__ import annotations

from typing import Optional, Sequence

import timm
import torch
from torch import nn

from invpt.config import PATCH_SIZE, InvPTConfig
from invpt.errors import ConfigError, InputError
from invpt.layers.conv import ConvBlock, TaskHead
from invpt.layers.invpt_stage import InvPTStage
from invpt.layers.resize import map_to_tokens, resize_bilinear

KV_POOL = (2, 4, 8)  # key/value average-pool per stage: every stage's K/V grid is H/64 x W/64


class InvPTCore(nn.Module):
    """The three-stage inverted pyramid plus multi-scale aggregation (official name: ``invpt``).

    Children, in official order: ``norm_mts``, ``redu_chan``, ``invpt_stages``, ``norm_mt`` (dead),
    ``mt_proj``, ``mix_proj``.
    """

    def __init__(self, cfg: InvPTConfig) -> None:
        super().__init__()
        self.tasks = cfg.tasks
        t = len(cfg.tasks)
        dims = cfg.stage_dims  # (576, 288, 144)
        e = dims[0]
        self.stage_grids = cfg.stage_grids  # (16,16), (32,32), (64,64)
        self.feature_size = cfg.feature_size  # (128, 128)
        self.norm_mts = nn.ModuleList(nn.LayerNorm(t * d) for d in dims)
        # redu_chan[0] is dead upstream (stage 0 is already E wide); kept for strict loading.
        self.redu_chan = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(d, e, kernel_size=1) for _ in range(t)) for d in dims
        )
        self.invpt_stages = nn.ModuleList(
            InvPTStage(
                i,
                dims[max(i - 1, 0)],
                dims[i],
                t,
                self.stage_grids[i],
                KV_POOL[i],
                cfg.decoder.num_heads,
                cfg.decoder.mlp_ratio,
            )
            for i in range(3)
        )
        self.norm_mt = nn.LayerNorm(t * dims[2])  # dead upstream; kept for strict loading
        self.mt_proj = nn.ModuleDict(
            {
                name: nn.Sequential(nn.Conv2d(e, e, 3, padding=1), nn.BatchNorm2d(e), nn.ReLU(inplace=True))
                for name in cfg.tasks
            }
        )
        self.mix_proj = nn.ModuleDict(
            {
                name: nn.Sequential(nn.Conv2d(cfg.decoder.embed_dim + ch, e, kernel_size=1))
                for name, ch in cfg.task_channels.items()
            }
        )

    def forward(
        self,
        features: dict[str, torch.Tensor],
        inter_preds: dict[str, torch.Tensor],
        skips: Sequence[torch.Tensor],
        out_tasks: Sequence[str],
    ) -> dict[str, torch.Tensor]:
        """Run the pyramid.

        Args:
            features: per task, the preliminary decoder output [B, 512, H/32, W/32].
            inter_preds: per task, the intermediate prediction [B, C_t, H/32, W/32].
            skips: (stage-1 skip [B, E/2, H/16, W/16], stage-2 skip [B, E/4, H/8, W/8]).
            out_tasks: tasks whose features are wanted; the others' aggregation and ``mt_proj`` are skipped
                (every task still takes part in attention and ``norm_mts``, which couple the tasks).

        Returns:
            per task in ``out_tasks``, ``mt_proj`` output [B, E, H/4, W/4].
        """
        maps = [self.mix_proj[n](torch.cat([features[n], inter_preds[n]], dim=1)) for n in self.tasks]
        want = [self.tasks.index(n) for n in out_tasks]
        aggregated: dict[int, torch.Tensor] = {}
        message: Optional[torch.Tensor] = None
        for i, stage in enumerate(self.invpt_stages):
            skip = skips[i - 1] if i > 0 else None
            maps, message = stage(maps, skip, message)  # T x [B, C_i, H_i, W_i]
            # One LayerNorm across all tasks' channels; its output feeds only the aggregation.
            normed = self.norm_mts[i](torch.cat([map_to_tokens(m) for m in maps], dim=2))  # [B, H_i*W_i, T*C_i]
            c = maps[0].shape[1]
            grid = self.stage_grids[i]
            for ti in want:
                f = normed[:, :, ti * c:(ti + 1) * c].transpose(1, 2).reshape(normed.shape[0], c, grid[0], grid[1])
                if i > 0:
                    f = self.redu_chan[i][ti](f)
                f = resize_bilinear(f, self.feature_size)
                aggregated[ti] = f if i == 0 else aggregated[ti] + f
        return {self.tasks[ti]: self.mt_proj[self.tasks[ti]](aggregated[ti]) for ti in want}


class MultiTaskDecoder(nn.Module):
    """Everything between the ViT taps and the heads (official name: ``multi_task_decoder``).

    Children, in official order: ``intermediate_head``, ``invpt``, ``preliminary_decoder``, ``scale_embed``.
    """

    def __init__(self, cfg: InvPTConfig) -> None:
        super().__init__()
        self.tasks = cfg.tasks
        vit = cfg.backbone.embed_dim
        d = cfg.decoder.embed_dim
        dims = cfg.stage_dims
        self.mtt_resolution = cfg.stage_grids[0]
        self.intermediate_head = nn.ModuleDict(
            {name: nn.Conv2d(d, ch, kernel_size=1) for name, ch in cfg.task_channels.items()}
        )
        self.invpt = InvPTCore(cfg)
        self.preliminary_decoder = nn.ModuleDict(
            {name: nn.Sequential(ConvBlock(vit, vit), ConvBlock(vit, d)) for name in cfg.tasks}
        )
        self.scale_embed = nn.ModuleList(
            [
                nn.ConvTranspose2d(vit, dims[2], kernel_size=3, stride=2, padding=1, output_padding=1),
                nn.Conv2d(vit, dims[1], kernel_size=3, padding=1),
                nn.Conv2d(vit, dims[0], kernel_size=3, padding=1),  # dead upstream (output discarded)
            ]
        )

    def forward(
        self, tap_a: torch.Tensor, tap_b: torch.Tensor, final: torch.Tensor, out_tasks: Sequence[str]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Taps are NCHW ViT features at H/16: first tap (e.g. block 6), second tap (block 12), normed final.

        Returns (task features [B, E, H/4, W/4] for ``out_tasks``, intermediate predictions at H/32 for all).
        """
        skip_stage2 = self.scale_embed[0](tap_a)  # [B, E/4, H/8, W/8]
        skip_stage1 = self.scale_embed[1](tap_b)  # [B, E/2, H/16, W/16]
        x = resize_bilinear(final, self.mtt_resolution)  # [B, C_vit, H/32, W/32]
        features, inter_preds = {}, {}
        for name in self.tasks:
            features[name] = self.preliminary_decoder[name](x)  # [B, 512, H/32, W/32]
            inter_preds[name] = self.intermediate_head[name](features[name])  # [B, C_t, H/32, W/32]
        out = self.invpt(features, inter_preds, (skip_stage1, skip_stage2), out_tasks)
        return out, inter_preds


class InvPT(nn.Module):
    """InvPT multi-task dense predictor: image [B, 3, H, W] -> dict task -> raw map [B, C_t, H, W].

    Args:
        cfg: a validated :class:`~invpt.config.InvPTConfig` (see :func:`invpt.build_model`).
        fused_attn: let the timm ViT use fused scaled-dot-product attention (fast in PyTorch). False
            gives the explicit matmul/softmax form, which exports to plain ONNX MatMul/Softmax nodes.

    Outputs are raw logits/regressions with official semantics (decode with :mod:`invpt.data.decode`).
    """

    def __init__(self, cfg: InvPTConfig, fused_attn: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.tasks = cfg.tasks
        b = cfg.backbone
        self.backbone = timm.create_model(
            b.name,
            pretrained=False,
            img_size=cfg.image_size,
            patch_size=PATCH_SIZE,
            depth=b.depth,
            embed_dim=b.embed_dim,
            num_heads=b.num_heads,
            num_classes=0,
            drop_path_rate=b.drop_path_rate,
        )
        self._check_backbone()
        for blk in self.backbone.blocks:
            if hasattr(blk.attn, "fused_attn"):
                blk.attn.fused_attn = fused_attn
        self.tap_indices = (b.taps[0] - 1, b.taps[1] - 1)  # the third tap only fed dead scale_embed.2
        self.multi_task_decoder = MultiTaskDecoder(cfg)
        e = cfg.decoder.final_embed_dim
        self.heads = nn.ModuleDict({name: TaskHead(e, ch) for name, ch in cfg.task_channels.items()})

    def _check_backbone(self) -> None:
        vit = self.backbone
        ok = (
            getattr(vit, "num_prefix_tokens", None) == 1
            and getattr(vit, "cls_token", None) is not None
            and getattr(vit, "pos_embed", None) is not None
            and not getattr(vit, "dynamic_img_size", False)
            and tuple(vit.patch_embed.patch_size) == (PATCH_SIZE, PATCH_SIZE)
        )
        if not ok:
            raise ConfigError(
                f"backbone '{self.cfg.backbone.name}' is not a plain timm ViT with patch 16, one class token and a "
                "learned absolute position embedding, which InvPT requires. Use e.g. vit_large_patch16_384, "
                "vit_base_patch16_224 or vit_small_patch16_224."
            )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ViT taps as NCHW maps at H/16: (raw block output, raw block output, normed final tokens), no cls."""
        final, (tap_a, tap_b) = self.backbone.forward_intermediates(
            x, indices=list(self.tap_indices), norm=False, output_fmt="NCHW"
        )
        gh, gw = self.cfg.token_grid
        final = final[:, self.backbone.num_prefix_tokens:]  # [B, N, C], normed by the ViT's final norm
        final = final.transpose(1, 2).reshape(final.shape[0], final.shape[2], gh, gw)
        return tap_a, tap_b, final

    def forward(
        self, x: torch.Tensor, tasks: Optional[Sequence[str]] = None, return_intermediate: bool = False
    ) -> dict:
        """Predict all (or ``tasks``) dense maps at input resolution.

        Args:
            x: normalised images [B, 3, H, W], (H, W) = ``cfg.image_size``.
            tasks: subset of ``cfg.tasks`` to compute; other tasks' heads and ``mt_proj`` are skipped.
            return_intermediate: also return ``'inter_preds'``: task -> intermediate prediction upsampled to
                (H, W), as the official model does (training supervises them).
        """
        size = tuple(self.cfg.image_size)
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling() and tuple(x.shape[-2:]) != size:
            raise InputError(
                f"input of size {tuple(x.shape[-2:])} given to an InvPT model built for {size} (H, W). InvPT's "
                "sizes are fixed at build time; pad or resize the image to the model size "
                "(invpt.data.transforms.preprocess does this)."
            )
        out_tasks = self.resolve_tasks(tasks)
        tap_a, tap_b, final = self.encode(x)
        features, inter_preds = self.multi_task_decoder(tap_a, tap_b, final, out_tasks)
        out: dict = {name: resize_bilinear(self.heads[name](features[name]), size) for name in out_tasks}
        if return_intermediate:
            out["inter_preds"] = {name: resize_bilinear(p, size) for name, p in inter_preds.items()}
        return out

    def resolve_tasks(self, tasks: Optional[Sequence[str]]) -> tuple[str, ...]:
        """``tasks`` (any order) in the official task order; None means every task. Unknown or empty: ConfigError."""
        if tasks is None:
            return self.tasks
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown or not tasks:
            raise ConfigError(f"tasks {list(tasks)} requested; this model predicts {list(self.tasks)}.")
        return tuple(t for t in self.tasks if t in tasks)
