"""Reading, checking and writing InvPT checkpoints.

Three formats are read, always with ``torch.load(weights_only=True)`` (a checkpoint never runs code):

* official: ``{'model': {'module.' + key: tensor}, ...}`` (DDP-wrapped keys; optimizer etc. ignored);
* bare: ``{key: tensor}`` (with or without ``module.``);
* ours: ``{'format': 'invpt', 'format_version': 1, 'config': {...}, 'state_dict': {...}}``.

Loading is all-or-nothing: a mismatch raises :class:`~invpt.errors.CheckpointError` listing missing,
unexpected and differently shaped keys and the likely cause, and nothing is half-loaded.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from invpt.config import ConfigLike, InvPTConfig, load_config, preset_names
from invpt.errors import CheckpointError

_logger = logging.getLogger(__name__)

FORMAT_NAME = "invpt"
FORMAT_VERSION = 1


@dataclass
class RawCheckpoint:
    """What a checkpoint file holds once unwrapped: bare state_dict keys, and our config if present."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    config: Optional[dict[str, Any]]
    origin: str  # "official", "bare" or "invpt"


def read_checkpoint(path: str | os.PathLike) -> RawCheckpoint:
    """Read any supported checkpoint format safely and unwrap it to bare state_dict keys."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint '{path}' does not exist. Pass the path of an InvPT .pth/.pth.tar file (official "
            "release or one written by invpt)."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types: UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(
            f"Checkpoint '{path}' could not be read as a PyTorch checkpoint with weights_only=True ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). The file is truncated, not a checkpoint, or pickles "
            "code; invpt never loads code from checkpoints. If it is a trusted file from another tool, re-save "
            "its state_dict with torch.save(model.state_dict(), path)."
        ) from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"Checkpoint '{path}' holds a {type(obj).__name__}, not a dict of weights.")
    config = None
    if obj.get("format") == FORMAT_NAME:
        version = obj.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"Checkpoint '{path}' is invpt format version {version}; this invpt reads version {FORMAT_VERSION}. "
                "Upgrade invpt or re-save the checkpoint with this version."
            )
        sd, config, origin = obj["state_dict"], obj.get("config"), "invpt"
    elif "model" in obj and isinstance(obj["model"], Mapping):
        sd, origin = obj["model"], "official"
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        sd, origin = obj["state_dict"], "bare"
    else:
        sd, origin = obj, "bare"
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(
            f"Checkpoint '{path}' has no tensor state_dict (top-level keys: {sorted(map(str, obj))[:8]}). Expected "
            "{'model': state_dict} (official), a bare state_dict, or an invpt checkpoint."
        )
    return RawCheckpoint(path, checkpoint_filter_fn(sd), config, origin)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map foreign key names onto ours: strip the DDP ``module.`` prefix where present (only there)."""
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def shape_signature(model_or_sd: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a model or state dict (works on meta tensors)."""
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else model_or_sd
    return {k: tuple(v.shape) for k, v in sd.items()}


def infer_config(raw: RawCheckpoint) -> InvPTConfig:
    """Find the config that built a checkpoint: its own (ours), else the one preset whose shapes match exactly.

    Shapes cannot tell ViT head counts or tap positions, so only checkpoints that match a shipped preset
    (the official ViT-L PASCAL and NYUD models among them) are inferred; anything else asks for --config.
    """
    if raw.config is not None:
        return load_config(raw.config)
    from invpt import build_model

    sig = shape_signature(raw.state_dict)
    matches = []
    for name in preset_names():
        cfg = load_config(name)
        with torch.device("meta"):
            if shape_signature(build_model(cfg)) == sig:
                matches.append(cfg)
    if len(matches) == 1:
        _logger.info("config inferred from checkpoint shapes: preset '%s'", matches[0].name)
        return matches[0]
    heads = sorted(k.split(".")[1] for k in sig if k.startswith("heads.") and k.endswith("linear_pred.weight"))
    raise CheckpointError(
        f"Cannot infer the model config of '{raw.path}': it matches {'no' if not matches else 'several'} shipped "
        f"preset ({', '.join(preset_names())}), and head counts, tap blocks and image size cannot be read from "
        f"weights alone (it has tasks {heads}, {describe_backbone(sig)}). Pass --config with a preset name or the "
        "YAML that built it."
    )


def describe_backbone(sig: Mapping[str, tuple[int, ...]]) -> str:
    """Short human description of a checkpoint's ViT (width, depth, token count) from its shapes."""
    pos = sig.get("backbone.pos_embed")
    depth = len({k.split(".")[2] for k in sig if k.startswith("backbone.blocks.")})
    if pos is None:
        return "no backbone.pos_embed"
    return f"ViT width {pos[2]}, depth {depth}, {pos[1] - 1} patch tokens"


def check_compatible(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], path: Path | str) -> None:
    """Raise one CheckpointError naming every missing/unexpected/mis-shaped key and the likely cause."""
    want = shape_signature(model)
    have = shape_signature(sd)
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    shapes = [(k, have[k], want[k]) for k in want if k in have and have[k] != want[k]]
    if not (missing or unexpected or shapes):
        return

    def _few(items: list, n: int = 6) -> str:
        return ", ".join(map(str, items[:n])) + (f" (+{len(items) - n} more)" if len(items) > n else "")

    causes = []
    model_tasks = {k.split(".")[1] for k in want if k.startswith("heads.")}
    ckpt_tasks = {k.split(".")[1] for k in have if k.startswith("heads.")}
    if model_tasks != ckpt_tasks:
        causes.append(
            f"wrong dataset or tasks: the checkpoint predicts {sorted(ckpt_tasks)}, the config {sorted(model_tasks)}"
        )
    if have.get("backbone.pos_embed") != want.get("backbone.pos_embed") or any(
        k.startswith("backbone.blocks.") for k in missing + unexpected
    ):
        causes.append(f"wrong backbone or image size: checkpoint {describe_backbone(have)}, config {describe_backbone(want)}")
    if any(k.startswith("multi_task_decoder.invpt") for k, _, _ in shapes):
        causes.append("wrong decoder width (decoder.embed_dim / pred_channels)")
    raise CheckpointError(
        f"Checkpoint '{path}' does not match the model config: {len(missing)} missing key(s)"
        f"{': ' + _few(missing) if missing else ''}; {len(unexpected)} unexpected key(s)"
        f"{': ' + _few(unexpected) if unexpected else ''}; {len(shapes)} shape mismatch(es)"
        f"{': ' + _few([f'{k} {tuple(a)} in checkpoint vs {tuple(b)} in model' for k, a, b in shapes], 4) if shapes else ''}. "
        f"Likely cause: {'; '.join(causes) if causes else 'a checkpoint of a different architecture'}. "
        "Pass the --config that built this checkpoint (or omit it to infer it); nothing was loaded."
    )


def load_model(
    ckpt_path: str | os.PathLike,
    config: Optional[ConfigLike] = None,
    device: str | torch.device = "cpu",
    fused_attn: bool = True,
) -> torch.nn.Module:
    """Build the model a checkpoint describes, load its weights strictly, and return it in eval mode.

    Args:
        ckpt_path: official (``{'model': {'module.'+key: ...}}``), bare state_dict, or invpt checkpoint.
        config: preset name, YAML path, dict or InvPTConfig; None infers it (see :func:`infer_config`).
        device: where the model lives.
        fused_attn: see :class:`invpt.model.InvPT` (False for export).
    """
    from invpt import build_model

    raw = read_checkpoint(ckpt_path)
    cfg = load_config(config) if config is not None else infer_config(raw)
    with torch.device("meta"):
        probe = build_model(cfg)
    check_compatible(probe, raw.state_dict, raw.path)
    model = build_model(cfg, fused_attn=fused_attn)
    model.load_state_dict(raw.state_dict, strict=True)
    _logger.info("loaded %s checkpoint '%s' (%s)", raw.origin, raw.path, cfg.name or cfg.dataset)
    return model.to(device).eval()


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike, config: Optional[InvPTConfig] = None) -> Path:
    """Write our format (weights plus the config that built them), atomically."""
    cfg = config or model.cfg
    obj = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    _atomic_save(obj, path)
    return path


def save_official_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write the official format ``{'model': {'module.' + key: tensor}}`` (for the upstream code or tests)."""
    obj = {"model": {"module." + k: v.detach().cpu() for k, v in model.state_dict().items()}}
    path = Path(path)
    _atomic_save(obj, path)
    return path
