"""Independent, purely functional reference implementation of the official InvPT forward pass.

Written only from ``/work/shared/reference/invpt_official_spec.md`` (cited below as "spec §N")
and the official key/shape listings ``official_state_dict_{pascal,nyud}_vitL.json``. It does not
import or read anything from the ``invpt`` package, and it contains no upstream code.

Purpose: cross-check another implementation. Everything is plain ``torch.nn.functional`` on tensors
taken from a bare official state_dict (no ``module.`` prefix); no ``nn.Module`` and no timm.

Public API
----------
``reference_forward(sd, cfg, x) -> {task: [B,C_t,H,W], 'inter_preds': {task: [B,C_t,H,W]}}``
    Eval-mode forward of the official ``TransformerNet`` (spec §1).
``state_dict_shapes(cfg) -> dict[str, tuple[int, ...]]``
    Every official key with its shape, in official state_dict order (spec §9). No allocation.
``random_state_dict(cfg, seed, std=None) -> dict[str, torch.Tensor]``
    A random state_dict with exactly the official keys, including the dead ones (spec §6) and the
    int64 scalar ``num_batches_tracked`` buffers.
``pascal_vitl_cfg()``, ``nyud_vitl_cfg()``, ``tiny_pascal_cfg()``, ``tiny_nyud_cfg()``
    Ready-made ``cfg`` dicts (spec §2 and §18).

``cfg`` keys: ``tasks`` (official order, spec §1), ``task_channels``, ``image_size`` [H, W],
``vit_depth``, ``vit_dim``, ``vit_heads``, ``taps`` [a, b, c] (1-based block numbers), ``embed_dim``
(decoder, 512 official), ``pred_channels`` (64 official), ``dec_heads`` (2), ``mlp_ratio`` (4).

Run ``python tests/reference_impl/functional_invpt.py`` for the self-check (key/shape equality with
both JSON listings, parameter counts from spec §6/§8, finite outputs of the tiny variants).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

VIT_LN_EPS = 1e-6  # spec §3: every ViT LayerNorm uses eps 1e-6.
DEC_LN_EPS = 1e-5  # spec §5: decoder LayerNorms (norm1, norm2, norm_mts) use the default 1e-5.
BN_EPS = 1e-5  # BatchNorm / SyncBatchNorm default eps.
KV_POOL = (2, 4, 8)  # spec §2: KERNEL_KV = STRIDE_KV = [2, 4, 8] per decoder stage.

REFERENCE_DIR = Path("/work/shared/reference")


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------

PASCAL_TASKS = ["semseg", "human_parts", "sal", "normals", "edge"]  # spec §1, fixed by code
PASCAL_CHANNELS = {"semseg": 21, "human_parts": 7, "sal": 2, "normals": 3, "edge": 1}
NYUD_TASKS = ["semseg", "depth", "normals", "edge"]  # spec §1
NYUD_CHANNELS = {"semseg": 40, "depth": 1, "normals": 3, "edge": 1}


def _cfg(tasks, channels, image_size, depth, dim, heads, taps, embed_dim, pred_channels) -> dict:
    return {
        "tasks": list(tasks),
        "task_channels": dict(channels),
        "image_size": list(image_size),
        "vit_depth": depth,
        "vit_dim": dim,
        "vit_heads": heads,
        "taps": list(taps),
        "embed_dim": embed_dim,
        "pred_channels": pred_channels,
        "dec_heads": 2,
        "mlp_ratio": 4,
    }


def pascal_vitl_cfg() -> dict:
    """Official PASCAL-Context model: ViT-L/16 at 512x512, taps 6/12/18 (spec §2, §3)."""
    return _cfg(PASCAL_TASKS, PASCAL_CHANNELS, (512, 512), 24, 1024, 16, (6, 12, 18), 512, 64)


def nyud_vitl_cfg() -> dict:
    """Official NYUD-v2 model: ViT-L/16 at 448x576 (spec §2, §3)."""
    return _cfg(NYUD_TASKS, NYUD_CHANNELS, (448, 576), 24, 1024, 16, (6, 12, 18), 512, 64)


def tiny_pascal_cfg() -> dict:
    """Tiny variant of spec §18: depth 4, taps 1/2/3, width 192, 3 heads, 128x128, E 64, P 16."""
    return _cfg(PASCAL_TASKS, PASCAL_CHANNELS, (128, 128), 4, 192, 3, (1, 2, 3), 64, 16)


def tiny_nyud_cfg() -> dict:
    """Tiny NYUD variant of spec §18 (128x192)."""
    return _cfg(NYUD_TASKS, NYUD_CHANNELS, (128, 192), 4, 192, 3, (1, 2, 3), 64, 16)


def _derived(cfg: dict) -> dict:
    """Values derived from cfg exactly as spec §2 derives them from the YAML."""
    H, W = (int(v) for v in cfg["image_size"])
    if H % 64 or W % 64:  # spec §15.9
        raise ValueError(f"image_size {H}x{W}: InvPT needs H and W to be multiples of 64")
    E = int(cfg["embed_dim"]) + int(cfg["pred_channels"])  # final_embed_dim, 576 official
    if E % 8:  # spec §18: C_2 = E/4 must split into 2 heads
        raise ValueError(f"embed_dim + pred_channels = {E} must be divisible by 8")
    taps = [int(t) for t in cfg["taps"]]
    if len(taps) != 3 or not all(1 <= t <= int(cfg["vit_depth"]) for t in taps):
        raise ValueError(f"taps must be 3 block numbers in 1..vit_depth, got {taps}")
    return {
        "H": H,
        "W": W,
        "h16": H // 16,  # spatial_dim (spec §2)
        "w16": W // 16,
        "h32": H // 32,  # mtt_resolution = spatial_dim // 2 (spec §2)
        "w32": W // 32,
        "E": E,
        "stage_dims": [E, E // 2, E // 4],  # DIM_EMBED (spec §2)
        "taps": taps,
    }


# ----------------------------------------------------------------------------------------------
# State dict layout (spec §9), in official order
# ----------------------------------------------------------------------------------------------

def _bn_shapes(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    # BatchNorm2d / SyncBatchNorm entries in state_dict order; num_batches_tracked is a [] int64.
    return [
        (f"{prefix}.weight", (c,)),
        (f"{prefix}.bias", (c,)),
        (f"{prefix}.running_mean", (c,)),
        (f"{prefix}.running_var", (c,)),
        (f"{prefix}.num_batches_tracked", ()),
    ]


def state_dict_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """All official state_dict keys with their shapes, in official order. Allocates nothing."""
    d = _derived(cfg)
    tasks = list(cfg["tasks"])
    ch = cfg["task_channels"]
    T = len(tasks)
    D = int(cfg["vit_dim"])
    depth = int(cfg["vit_depth"])
    r = int(cfg.get("mlp_ratio", 4))
    vit_r = int(cfg.get("vit_mlp_ratio", 4))
    Eo = int(cfg["embed_dim"])  # ori_embed_dim: preliminary decoder output width (512)
    E = d["E"]
    Cs = d["stage_dims"]
    nh = int(cfg.get("dec_heads", 2))
    N = d["h16"] * d["w16"]
    out: list[tuple[str, tuple[int, ...]]] = []
    add = out.append

    # --- backbone (spec §3) ---
    add(("backbone.cls_token", (1, 1, D)))
    add(("backbone.pos_embed", (1, N + 1, D)))
    add(("backbone.patch_embed.proj.weight", (D, 3, 16, 16)))
    add(("backbone.patch_embed.proj.bias", (D,)))
    for i in range(depth):
        p = f"backbone.blocks.{i}"
        add((f"{p}.norm1.weight", (D,)))
        add((f"{p}.norm1.bias", (D,)))
        add((f"{p}.attn.qkv.weight", (3 * D, D)))
        add((f"{p}.attn.qkv.bias", (3 * D,)))
        add((f"{p}.attn.proj.weight", (D, D)))
        add((f"{p}.attn.proj.bias", (D,)))
        add((f"{p}.norm2.weight", (D,)))
        add((f"{p}.norm2.bias", (D,)))
        add((f"{p}.mlp.fc1.weight", (vit_r * D, D)))
        add((f"{p}.mlp.fc1.bias", (vit_r * D,)))
        add((f"{p}.mlp.fc2.weight", (D, vit_r * D)))
        add((f"{p}.mlp.fc2.bias", (D,)))
    add(("backbone.norm.weight", (D,)))
    add(("backbone.norm.bias", (D,)))

    # --- multi_task_decoder (spec §4): intermediate_head, invpt, preliminary_decoder, scale_embed ---
    md = "multi_task_decoder"
    for t in tasks:
        add((f"{md}.intermediate_head.{t}.weight", (ch[t], Eo, 1, 1)))
        add((f"{md}.intermediate_head.{t}.bias", (ch[t],)))

    # invpt children (spec §5): norm_mts, redu_chan, invpt_stages, norm_mt, mt_proj, mix_proj
    ip = f"{md}.invpt"
    for i in range(3):
        add((f"{ip}.norm_mts.{i}.weight", (T * Cs[i],)))
        add((f"{ip}.norm_mts.{i}.bias", (T * Cs[i],)))
    for i in range(3):  # redu_chan.0.* is dead but present (spec §6)
        for k in range(T):
            add((f"{ip}.redu_chan.{i}.{k}.weight", (E, Cs[i], 1, 1)))
            add((f"{ip}.redu_chan.{i}.{k}.bias", (E,)))
    for s in range(3):
        sp = f"{ip}.invpt_stages.{s}"
        C = Cs[s]
        if s > 0:  # UpEmbed per task (spec §5.2)
            for k in range(T):
                pp = f"{sp}.patch_embed.{k}.proj"
                add((f"{pp}.1.weight", (C, Cs[s - 1], 3, 3)))
                out.extend(_bn_shapes(f"{pp}.2", C))
                add((f"{pp}.4.weight", (C, C, 3, 3)))
                out.extend(_bn_shapes(f"{pp}.5", C))
        bp = f"{sp}.blocks.0"
        add((f"{bp}.norm1.weight", (C,)))
        add((f"{bp}.norm1.bias", (C,)))
        add((f"{bp}.norm2.weight", (C,)))
        add((f"{bp}.norm2.bias", (C,)))
        add((f"{bp}.mlp.fc1.weight", (r * C, C)))
        add((f"{bp}.mlp.fc1.bias", (r * C,)))
        add((f"{bp}.mlp.fc2.weight", (C, r * C)))
        add((f"{bp}.mlp.fc2.bias", (C,)))
        for k in range(T):
            add((f"{bp}.attn.conv_proj_q.{k}.conv.weight", (C, 1, 3, 3)))
            out.extend(_bn_shapes(f"{bp}.attn.conv_proj_q.{k}.bn", C))
        for name in ("proj_q", "proj_k", "proj_v", "proj"):
            add((f"{bp}.attn.{name}.weight", (C, C)))
            add((f"{bp}.attn.{name}.bias", (C,)))
        # fuse_attn exists in every stage; stage 0's is dead (spec §6)
        add((f"{bp}.attn.fuse_attn.weight", (nh, 2 * nh, 1, 1)))
        add((f"{bp}.attn.fuse_attn.bias", (nh,)))
    add((f"{ip}.norm_mt.weight", (T * Cs[2],)))  # dead (spec §6)
    add((f"{ip}.norm_mt.bias", (T * Cs[2],)))
    for t in tasks:
        add((f"{ip}.mt_proj.{t}.0.weight", (E, E, 3, 3)))
        add((f"{ip}.mt_proj.{t}.0.bias", (E,)))
        out.extend(_bn_shapes(f"{ip}.mt_proj.{t}.1", E))
    for t in tasks:
        add((f"{ip}.mix_proj.{t}.0.weight", (E, Eo + ch[t], 1, 1)))
        add((f"{ip}.mix_proj.{t}.0.bias", (E,)))

    for t in tasks:
        pp = f"{md}.preliminary_decoder.{t}"
        add((f"{pp}.0.conv.weight", (D, D, 3, 3)))
        out.extend(_bn_shapes(f"{pp}.0.bn1", D))
        add((f"{pp}.1.conv.weight", (Eo, D, 3, 3)))
        out.extend(_bn_shapes(f"{pp}.1.bn1", Eo))

    add((f"{md}.scale_embed.0.weight", (D, Cs[2], 3, 3)))  # ConvTranspose2d: [in, out, k, k]
    add((f"{md}.scale_embed.0.bias", (Cs[2],)))
    add((f"{md}.scale_embed.1.weight", (Cs[1], D, 3, 3)))
    add((f"{md}.scale_embed.1.bias", (Cs[1],)))
    add((f"{md}.scale_embed.2.weight", (Cs[0], D, 3, 3)))  # computed but discarded (spec §6)
    add((f"{md}.scale_embed.2.bias", (Cs[0],)))

    # --- heads (spec §1) ---
    for t in tasks:
        add((f"heads.{t}.linear_pred.weight", (ch[t], E, 1, 1)))
        add((f"heads.{t}.linear_pred.bias", (ch[t],)))

    shapes = dict(out)
    assert len(shapes) == len(out), "duplicate key generated"
    return shapes


def dead_keys(cfg: dict) -> list[str]:
    """Keys with no influence on any output (spec §6)."""
    md = "multi_task_decoder"
    return [
        k
        for k in state_dict_shapes(cfg)
        if k.startswith(f"{md}.invpt.redu_chan.0.")
        or k.startswith(f"{md}.invpt.norm_mt.")
        or k.startswith(f"{md}.invpt.invpt_stages.0.blocks.0.attn.fuse_attn.")
        or k.startswith(f"{md}.scale_embed.2.")
    ]


def random_state_dict(cfg: dict, seed: int = 0, std: float | None = None) -> dict[str, Tensor]:
    """Random state_dict with exactly the official keys and shapes (float32, CPU).

    Weight tensors with >= 2 dims are normal with standard deviation ``std`` if given (e.g. 0.02),
    else ``1/sqrt(fan_in)`` (small, but keeps activations O(1) so a cross-check is meaningful).
    cls_token / pos_embed: normal * 0.02. LayerNorm/BN weights: 1 + 0.1 * normal. Biases and BN
    running_mean: 0.1 * normal (0.02 * normal when ``std`` is given). BN running_var: uniform in
    [0.5, 1.5] (positive). num_batches_tracked: int64 scalar 0.
    """
    g = torch.Generator().manual_seed(int(seed))
    sd: dict[str, Tensor] = {}
    small = 0.1 if std is None else 0.02
    for key, shape in state_dict_shapes(cfg).items():
        name = key.rsplit(".", 1)[1]
        if name == "num_batches_tracked":
            sd[key] = torch.tensor(0, dtype=torch.int64)
        elif name == "running_var":
            sd[key] = 0.5 + torch.rand(shape, generator=g)
        elif name == "running_mean":
            sd[key] = small * torch.randn(shape, generator=g)
        elif name in ("cls_token", "pos_embed"):
            sd[key] = 0.02 * torch.randn(shape, generator=g)
        elif name == "bias":
            sd[key] = small * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # LayerNorm / BatchNorm affine weight
            sd[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            if std is not None:
                s = float(std)
            else:
                # fan_in for Linear [out,in], Conv [out,in/g,k,k], ConvTranspose [in,out,k,k]
                if key.endswith("scale_embed.0.weight"):
                    fan_in = shape[0] * shape[2] * shape[3] / 4.0  # stride 2: ~1/4 taps active
                else:
                    fan_in = math.prod(shape[1:])
                s = 1.0 / math.sqrt(fan_in)
            sd[key] = s * torch.randn(shape, generator=g)
    return sd


# ----------------------------------------------------------------------------------------------
# Functional building blocks
# ----------------------------------------------------------------------------------------------

def _bn(x: Tensor, sd: dict, p: str) -> Tensor:
    # Eval BatchNorm with running stats; SyncBatchNorm is identical in eval (spec §16).
    return F.batch_norm(
        x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
        training=False, momentum=0.0, eps=BN_EPS,
    )


def _ln(x: Tensor, sd: dict, p: str, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[f"{p}.weight"], sd[f"{p}.bias"], eps)


def _lin(x: Tensor, sd: dict, p: str) -> Tensor:
    return F.linear(x, sd[f"{p}.weight"], sd[f"{p}.bias"])


def _tokens_to_map(x: Tensor, h: int, w: int) -> Tensor:
    # [B, h*w, C] (row-major tokens) -> [B, C, h, w]
    B, N, C = x.shape
    assert N == h * w, (N, h, w)
    return x.transpose(1, 2).reshape(B, C, h, w)


def _map_to_tokens(x: Tensor) -> Tensor:
    # [B, C, h, w] -> [B, h*w, C], row-major
    return x.flatten(2).transpose(1, 2)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _up2(x: Tensor) -> Tensor:
    # Where upstream uses scale_factor=2 / nn.Upsample(scale_factor=2) (spec §15.7).
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------
# Backbone: ViT (spec §3)
# ----------------------------------------------------------------------------------------------

def vit_forward(sd: dict, cfg: dict, x: Tensor) -> list[Tensor]:
    """Returns the 4 taps [B, N, D] (spec §3): raw outputs of blocks a, b, c and norm(final), no cls."""
    d = _derived(cfg)
    D = int(cfg["vit_dim"])
    nheads = int(cfg["vit_heads"])
    hd = D // nheads
    B, _, H, W = x.shape
    assert (H, W) == (d["H"], d["W"]), "PatchEmbed asserts the configured input size (spec §15.1)"

    # patch_embed.proj: Conv2d(3, D, k16, s16, bias) -> [B, D, H/16, W/16] -> tokens [B, N, D]
    t = F.conv2d(x, sd["backbone.patch_embed.proj.weight"], sd["backbone.patch_embed.proj.bias"], stride=16)
    t = _map_to_tokens(t)
    # prepend cls_token [1,1,D] -> [B, N+1, D]; add pos_embed [1, N+1, D] with no interpolation
    cls = sd["backbone.cls_token"].expand(B, -1, -1)
    t = torch.cat([cls, t], dim=1) + sd["backbone.pos_embed"]

    taps: list[Tensor] = []
    for i in range(int(cfg["vit_depth"])):
        p = f"backbone.blocks.{i}"
        # pre-norm attention: norm1 (eps 1e-6), qkv [B, N+1, 3D] -> (3, heads, head_dim)
        y = _ln(t, sd, f"{p}.norm1", VIT_LN_EPS)
        Bn, L, _ = y.shape
        qkv = _lin(y, sd, f"{p}.attn.qkv").reshape(Bn, L, 3, nheads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each [B, heads, N+1, hd]
        a = (q @ k.transpose(-2, -1)) * (hd ** -0.5)  # [B, heads, N+1, N+1]
        a = a.softmax(dim=-1)
        y = (a @ v).transpose(1, 2).reshape(Bn, L, D)  # heads merged head-major
        t = t + _lin(y, sd, f"{p}.attn.proj")
        # pre-norm MLP: norm2 (eps 1e-6), fc1 D->4D, exact GELU, fc2 4D->D
        y = _ln(t, sd, f"{p}.norm2", VIT_LN_EPS)
        y = _lin(F.gelu(_lin(y, sd, f"{p}.mlp.fc1")), sd, f"{p}.mlp.fc2")
        t = t + y
        if (i + 1) in d["taps"]:  # raw (un-normed) block output, 1-based block numbers
            taps.append(t[:, 1:])
    assert len(taps) == 3
    taps.append(_ln(t, sd, "backbone.norm", VIT_LN_EPS)[:, 1:])  # normed final tokens, cls dropped
    return taps


# ----------------------------------------------------------------------------------------------
# InvPT decoder attention and block (spec §5.3, §5.4)
# ----------------------------------------------------------------------------------------------

def _self_attention(
    sd: dict, p: str, x: Tensor, T: int, hs: int, ws: int, C: int, nh: int, stage: int,
    message: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """x: [B, T*hs*ws, C] (after norm1). Returns (out [B, T*(hs/2)*(ws/2), C], new message [B,nh,Q,K])."""
    B = x.shape[0]
    res = hs * ws
    pool = KV_POOL[stage]
    qs, ks = [], []
    for k in range(T):
        m = _tokens_to_map(x[:, k * res:(k + 1) * res], hs, ws)  # [B, C, hs, ws]
        # conv_proj_q[k]: depthwise 3x3 stride 2 pad 1, no bias -> BN -> tokens [B, hs/2*ws/2, C]
        q = F.conv2d(m, sd[f"{p}.conv_proj_q.{k}.conv.weight"], None, stride=2, padding=1, groups=C)
        q = _bn(q, sd, f"{p}.conv_proj_q.{k}.bn")
        qs.append(_map_to_tokens(q))
        # conv_proj_k / conv_proj_v[k]: AvgPool2d(k=s=2/4/8, pad 0, ceil_mode=True) -> H/64 x W/64 grid
        kv = F.avg_pool2d(m, kernel_size=pool, stride=pool, padding=0, ceil_mode=True)
        ks.append(_map_to_tokens(kv))
    q = torch.cat(qs, dim=1)  # [B, Q, C], Q = T*hs*ws/4 (task-major)
    kv = torch.cat(ks, dim=1)  # [B, K, C], K = T*(H/64)*(W/64); k and v pool the same input
    # proj_q / proj_k / proj_v: Linear(C, C, bias); heads split (heads, d), head-major in channels
    d = C // nh
    Q = q.shape[1]
    Kn = kv.shape[1]
    q = _lin(q, sd, f"{p}.proj_q").reshape(B, Q, nh, d).transpose(1, 2)  # [B, nh, Q, d]
    k = _lin(kv, sd, f"{p}.proj_k").reshape(B, Kn, nh, d).transpose(1, 2)  # [B, nh, K, d]
    v = _lin(kv, sd, f"{p}.proj_v").reshape(B, Kn, nh, d).transpose(1, 2)  # [B, nh, K, d]
    # scores with scale C^-0.5 (full per-task width, NOT head_dim; spec §5.4, §19.3)
    s = torch.einsum("bhlk,bhtk->bhlt", q, k) * (C ** -0.5)  # [B, nh, Q, K]

    if stage > 0:
        # attention message passing (spec §5.4): upsample previous pre-softmax scores x2 on the
        # query grid, concat with S along heads, fuse with the 1x1 conv fuse_attn (4 -> 2, bias).
        assert message is not None
        sh, sw = hs // 4, ws // 4  # previous stage's query grid
        qprev = sh * sw
        assert message.shape == (B, nh, T * qprev, Kn), (message.shape, (B, nh, T * qprev, Kn))
        ups = []
        for kk in range(T):
            c = message[:, :, kk * qprev:(kk + 1) * qprev]  # [B, nh, sh*sw, K]
            c = c.reshape(B * nh, qprev, Kn).transpose(1, 2).reshape(B * nh, Kn, sh, sw)  # keys as channels
            c = _up2(c)  # [(B*nh), K, hs/2, ws/2], scale_factor=2 as upstream
            c = c.reshape(B * nh, Kn, 4 * qprev).transpose(1, 2).reshape(B, nh, 4 * qprev, Kn)
            ups.append(c)
        up = torch.cat(ups, dim=2)  # [B, nh, Q, K]
        s = F.conv2d(
            torch.cat([s, up], dim=1),  # [B, 2*nh, Q, K]: current heads first, then previous
            sd[f"{p}.fuse_attn.weight"], sd[f"{p}.fuse_attn.bias"],
        )  # [B, nh, Q, K], fused pre-softmax scores
    new_message = s  # stage 0: the scaled S itself; stages 1, 2: the fused scores

    a = s.softmax(dim=-1)  # over K (attn_drop p=0)
    o = torch.einsum("bhlt,bhtv->bhlv", a, v)  # [B, nh, Q, d]
    o = o.transpose(1, 2).reshape(B, Q, C)  # merge heads (h d) head-major
    o = _lin(o, sd, f"{p}.proj")  # proj_drop p=0
    return o, new_message


def _invpt_block(
    sd: dict, p: str, xs: list[Tensor], C: int, nh: int, mlp_ratio: int, stage: int,
    message: Tensor | None,
) -> tuple[list[Tensor], Tensor]:
    """InvPTBlock (spec §5.3): T maps [B, C, hs, ws] in and out, plus the attention message."""
    T = len(xs)
    B, _, hs, ws = xs[0].shape
    res = hs * ws
    # 1. flatten each task map to tokens and concatenate task-major: X [B, T*hs*ws, C]
    X = torch.cat([_map_to_tokens(m) for m in xs], dim=1)
    # 2. norm1 (shared LN(C), eps 1e-5)
    y = _ln(X, sd, f"{p}.norm1", DEC_LN_EPS)
    # 3. attention: [B, T*(hs/2)*(ws/2), C]
    a, message = _self_attention(sd, f"{p}.attn", y, T, hs, ws, C, nh, stage, message)
    # 4. per task: [B, C, hs/2, ws/2] -> bilinear (size-based) back to (hs, ws) -> tokens
    qh, qw = hs // 2, ws // 2
    qres = qh * qw
    a = torch.cat(
        [_map_to_tokens(_resize(_tokens_to_map(a[:, k * qres:(k + 1) * qres], qh, qw), (hs, ws))) for k in range(T)],
        dim=1,
    )  # [B, T*hs*ws, C]
    # 5. residuals; DropPath is Identity (spec §2)
    X = X + a
    y = _ln(X, sd, f"{p}.norm2", DEC_LN_EPS)
    y = _lin(F.gelu(_lin(y, sd, f"{p}.mlp.fc1")), sd, f"{p}.mlp.fc2")  # C -> 4C -> C
    X = X + y
    # 6. split back into T maps [B, C, hs, ws]
    assert mlp_ratio * C == sd[f"{p}.mlp.fc1.weight"].shape[0]
    return [_tokens_to_map(X[:, k * res:(k + 1) * res], hs, ws) for k in range(T)], message


# ----------------------------------------------------------------------------------------------
# Full forward (spec §1, §4, §5)
# ----------------------------------------------------------------------------------------------

def reference_forward(sd: dict[str, Tensor], cfg: dict, x: Tensor) -> dict:
    """Eval-mode forward of the official TransformerNet.

    sd: bare official state_dict. x: [B, 3, H, W] float32 with (H, W) == cfg['image_size'].
    Returns {task: [B, C_t, H, W], 'inter_preds': {task: [B, C_t, H, W]}}.
    """
    d = _derived(cfg)
    tasks = list(cfg["tasks"])
    T = len(tasks)
    nh = int(cfg.get("dec_heads", 2))
    mlp_ratio = int(cfg.get("mlp_ratio", 4))
    Cs = d["stage_dims"]
    h16, w16, h, w = d["h16"], d["w16"], d["h32"], d["w32"]
    img_size = tuple(x.shape[-2:])  # spec §1.1
    md = "multi_task_decoder"
    ip = f"{md}.invpt"

    # ---- §1.1 / §3: backbone taps, each [B, N, D] ----
    taps = vit_forward(sd, cfg, x)

    # ---- §4.1: taps -> maps [B, D, h16, w16] with config ints ----
    maps = [_tokens_to_map(t, h16, w16) for t in taps]

    # ---- §4.2: scale_embed ----
    # [0] ConvTranspose2d(D->C2, k3, s2, p1, output_padding 1) on tap a: [B, C2, 2*h16, 2*w16]
    back0 = F.conv_transpose2d(
        maps[0], sd[f"{md}.scale_embed.0.weight"], sd[f"{md}.scale_embed.0.bias"],
        stride=2, padding=1, output_padding=1,
    )
    # [1] Conv2d(D->C1, 3, p1) on tap b: [B, C1, h16, w16]
    back1 = F.conv2d(maps[1], sd[f"{md}.scale_embed.1.weight"], sd[f"{md}.scale_embed.1.bias"], padding=1)
    # [2] Conv2d(D->C0, 3, p1) on tap c: [B, C0, h16, w16]; computed as upstream, then discarded (§6)
    _back2 = F.conv2d(maps[2], sd[f"{md}.scale_embed.2.weight"], sd[f"{md}.scale_embed.2.bias"], padding=1)
    del _back2
    back_fea = [back0, back1]

    # ---- §4.3: decoder input: normed final map resized (bilinear, size) to mtt_resolution ----
    feat = _resize(maps[3], (h, w))  # [B, D, h32, w32]

    # ---- §4.4 / §4.5: preliminary decoder and intermediate head, per task ----
    prelim: dict[str, Tensor] = {}
    inter: dict[str, Tensor] = {}
    for t in tasks:
        pp = f"{md}.preliminary_decoder.{t}"
        y = F.relu(_bn(F.conv2d(feat, sd[f"{pp}.0.conv.weight"], None, padding=1), sd, f"{pp}.0.bn1"))  # [B, D, h, w]
        y = F.relu(_bn(F.conv2d(y, sd[f"{pp}.1.conv.weight"], None, padding=1), sd, f"{pp}.1.bn1"))  # [B, Eo, h, w]
        prelim[t] = y
        inter[t] = F.conv2d(
            y, sd[f"{md}.intermediate_head.{t}.weight"], sd[f"{md}.intermediate_head.{t}.bias"]
        )  # [B, C_t, h, w]

    # ---- §5.1: mix_proj on cat([feature (Eo ch), inter_pred (C_t ch)]) -> [B, E, h, w] ----
    xs = [
        F.conv2d(
            torch.cat([prelim[t], inter[t]], dim=1),
            sd[f"{ip}.mix_proj.{t}.0.weight"], sd[f"{ip}.mix_proj.{t}.0.bias"],
        )
        for t in tasks
    ]

    # ---- §5.2 - §5.5: three stages with multi-scale aggregation ----
    th, tw = 8 * h, 8 * w  # H/4 x W/4
    agg: list[Tensor | None] = [None] * T
    message: Tensor | None = None
    for s in range(3):
        sp = f"{ip}.invpt_stages.{s}"
        C = Cs[s]
        if s > 0:
            # UpEmbed per task (§5.2): x2 bilinear (scale_factor) -> dil. conv -> BN -> ReLU -> dil. conv -> BN -> ReLU
            skip = back_fea[1] if s == 1 else back_fea[0]  # stage 1: layer-b tap; stage 2: ConvT of layer-a tap
            new = []
            for k, m in enumerate(xs):
                pp = f"{sp}.patch_embed.{k}.proj"
                m = _up2(m)  # [B, C_{s-1}, 2hs, 2ws]
                m = F.relu(_bn(F.conv2d(m, sd[f"{pp}.1.weight"], None, padding=2, dilation=2), sd, f"{pp}.2"))
                m = F.relu(_bn(F.conv2d(m, sd[f"{pp}.4.weight"], None, padding=2, dilation=2), sd, f"{pp}.5"))
                new.append(m + skip)  # same skip tensor added to every task
            xs = new
        # InvPTBlock (§5.3): stage 0 at (h, w), stage 1 at (2h, 2w), stage 2 at (4h, 4w)
        xs, message = _invpt_block(sd, f"{sp}.blocks.0", xs, C, nh, mlp_ratio, s, message)

        # §5.5 multi-scale aggregation: concat tasks along channels, one LN over T*C_s
        hs, ws = xs[0].shape[-2:]
        assert (hs, ws) == (h * 2 ** s, w * 2 ** s)
        z = torch.cat([_map_to_tokens(m) for m in xs], dim=2)  # [B, hs*ws, T*C]
        z = _ln(z, sd, f"{ip}.norm_mts.{s}", DEC_LN_EPS)
        z = _tokens_to_map(z, h * 2 ** s, w * 2 ** s)  # [B, T*C, nh, nw] with config ints
        for k in range(T):
            zk = z[:, k * C:(k + 1) * C]  # task k's C_s channels
            if s > 0:  # redu_chan[s][k]: Conv2d(C_s -> E, 1); redu_chan[0] is never used
                zk = F.conv2d(zk, sd[f"{ip}.redu_chan.{s}.{k}.weight"], sd[f"{ip}.redu_chan.{s}.{k}.bias"])
            zk = _resize(zk, (th, tw))  # [B, E, H/4, W/4]
            agg[k] = zk if agg[k] is None else agg[k] + zk
        # the next stage receives the un-normed xs

    # ---- §5.6: mt_proj (conv3x3 bias -> BN -> ReLU) = task_features; §1.3: heads + upsample ----
    out: dict[str, Any] = {}
    for k, t in enumerate(tasks):
        f = F.conv2d(agg[k], sd[f"{ip}.mt_proj.{t}.0.weight"], sd[f"{ip}.mt_proj.{t}.0.bias"], padding=1)
        f = F.relu(_bn(f, sd, f"{ip}.mt_proj.{t}.1"))  # [B, E, H/4, W/4]
        o = F.conv2d(f, sd[f"heads.{t}.linear_pred.weight"], sd[f"heads.{t}.linear_pred.bias"])  # [B, C_t, H/4, W/4]
        out[t] = _resize(o, img_size)  # [B, C_t, H, W]
    out["inter_preds"] = {t: _resize(inter[t], img_size) for t in tasks}  # [B, C_t, H, W]
    return out


# ----------------------------------------------------------------------------------------------
# Self-check
# ----------------------------------------------------------------------------------------------

def compare_shapes_with_json(cfg: dict, json_path: str | Path) -> list[str]:
    """Differences between state_dict_shapes(cfg) and an official key->shape JSON ([] if equal,
    including key order)."""
    ref = json.loads(Path(json_path).read_text())
    ours = state_dict_shapes(cfg)
    problems = []
    for k in ref.keys() - ours.keys():
        problems.append(f"missing key {k}")
    for k in ours.keys() - ref.keys():
        problems.append(f"unexpected key {k}")
    for k in ref.keys() & ours.keys():
        if tuple(ref[k]) != tuple(ours[k]):
            problems.append(f"shape {k}: ours {tuple(ours[k])} vs official {tuple(ref[k])}")
    if not problems and list(ref.keys()) != list(ours.keys()):
        problems.append("same keys and shapes, but a different order")
    return problems


def _numel(shapes: dict[str, tuple[int, ...]], keys=None) -> int:
    keys = shapes.keys() if keys is None else keys
    return sum(math.prod(shapes[k]) for k in keys)


def _self_check() -> None:
    # 1. key/shape equality with the official listings (spec §9) and counts (spec §6, §8)
    for name, cfg, n_keys, n_param, n_numel, n_dead in (
        ("pascal", pascal_vitl_cfg(), 727, 422_929_810, 422_969_700, 6_972_202),
        ("nyud", nyud_vitl_cfg(), 654, 402_092_888, 402_124_800, 6_639_562),
    ):
        problems = compare_shapes_with_json(cfg, REFERENCE_DIR / f"official_state_dict_{name}_vitL.json")
        assert not problems, problems[:20]
        shapes = state_dict_shapes(cfg)
        params = [k for k in shapes if not k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")]
        assert len(shapes) == n_keys, len(shapes)
        assert _numel(shapes, params) == n_param, _numel(shapes, params)
        assert _numel(shapes) == n_numel, _numel(shapes)
        assert _numel(shapes, dead_keys(cfg)) == n_dead, _numel(shapes, dead_keys(cfg))
        print(f"[ok] {name} ViT-L: {len(shapes)} keys, order and shapes equal to the JSON; "
              f"{n_param:,} params, {n_dead:,} dead")

    # 2. tiny variants: shapes and finiteness (spec §18)
    for name, cfg, n_keys in (("pascal", tiny_pascal_cfg(), 487), ("nyud", tiny_nyud_cfg(), 414)):
        sd = random_state_dict(cfg, seed=0)
        assert len(sd) == n_keys, len(sd)
        H, W = cfg["image_size"]
        x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out = reference_forward(sd, cfg, x)
        assert set(out) == set(cfg["tasks"]) | {"inter_preds"}
        for t in cfg["tasks"]:
            C = cfg["task_channels"][t]
            for o in (out[t], out["inter_preds"][t]):
                assert o.shape == (2, C, H, W) and o.dtype == torch.float32, o.shape
                assert torch.isfinite(o).all()
        # batch independence: sample 1 alone gives the same result
        with torch.no_grad():
            out1 = reference_forward(sd, cfg, x[1:])
        err = max((out[t][1:] - out1[t]).abs().max().item() for t in cfg["tasks"])
        assert err < 1e-4, err
        # std=0.02 variant as in the brief
        with torch.no_grad():
            out2 = reference_forward(random_state_dict(cfg, seed=3, std=0.02), cfg, x)
        assert all(torch.isfinite(out2[t]).all() for t in cfg["tasks"])
        print(f"[ok] tiny {name}: {len(sd)} keys, outputs {[tuple(out[t].shape) for t in cfg['tasks']]} finite")


if __name__ == "__main__":
    _self_check()
