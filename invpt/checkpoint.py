"""Reading, checking and writing InvPT checkpoints.

Three formats are read, always with ``torch.load(weights_only=True)`` (a checkpoint never runs code):

* official: ``{'model': {'module.' + key: tensor}, ...}`` (DDP-wrapped keys; optimizer etc. ignored);
* bare: ``{key: tensor}`` (with or without ``module.``);
* ours: ``{'format': 'invpt', 'format_version': 1, 'config': {...}, 'state_dict': {...}}``.

Every loader goes through :func:`read_checkpoint`, which refuses a path that is not a readable regular file and a
checkpoint holding a NaN or Inf in any floating-point tensor. Loading is all-or-nothing: a mismatch raises
:class:`~invpt.errors.CheckpointError` listing missing, unexpected and differently shaped keys and the likely
cause, and nothing is half-loaded. Checkpoints are written atomically (temporary file beside the target, then
``os.replace``) with the mode any new file gets (``0o666 & ~umask``).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from invpt.atomic import check_output_file, write_atomic  # noqa: F401 (re-exported)
from invpt.config import ConfigLike, InvPTConfig, load_config, preset_names
from invpt.errors import CheckpointError, InputError, InvptError
from invpt.paths import require_file

_logger = logging.getLogger(__name__)

FORMAT_NAME = "invpt"
FORMAT_VERSION = 1

#: A checkpoint that differs from a preset in at most this many tensors is reported as a near miss of it.
NEAR_MISS_MAX = 4

_CKPT_FIX = "Pass the path of an InvPT .pth/.pth.tar file (official release or one written by invpt)."


@dataclass
class RawCheckpoint:
    """What a checkpoint file holds once unwrapped: bare state_dict keys, and our config if present."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    config: Optional[dict[str, Any]]
    origin: str  # "official", "bare" or "invpt"


def read_checkpoint(path: str | os.PathLike) -> RawCheckpoint:
    """Read any supported checkpoint format safely, unwrap it to bare state_dict keys and check it is finite.

    Raises:
        CheckpointError: the path is not a readable regular file, the file is not a weights-only PyTorch
            checkpoint, holds no tensors, or a floating-point tensor holds NaN or Inf.
    """
    path = require_file(path, "Checkpoint", _CKPT_FIX, CheckpointError)
    try:
        obj = _load_weights_only(path)
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
    sd = checkpoint_filter_fn(sd)
    check_finite(sd, path)
    return RawCheckpoint(path, sd, config, origin)


def _load_weights_only(path: Path) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped where the file allows it.

    A zip-format checkpoint (every ``torch.save`` since PyTorch 1.6) is mapped instead of read: its tensors are pages
    of the file, loaded on first touch and never held twice (the model is then built on the meta device and takes
    these tensors with ``assign=True``, see :func:`load_model`). The mapping is private (copy on write): writing a
    parameter never writes the file. A legacy (pre-zip) file cannot be mapped and is read as before.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err) and "zip" not in str(err):
            raise
        _logger.debug("checkpoint %s cannot be memory-mapped (%s); reading it", path, str(err).splitlines()[0])
    return torch.load(path, map_location="cpu", weights_only=True)


def _is_finite(v: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN/Inf: one ``aminmax`` pass (NaN propagates; an Inf is the min or
    max), no temporary tensor, ~15x faster than ``isfinite(v).all()``. Complex tensors use ``isfinite``."""
    if v.is_complex():
        return bool(torch.isfinite(v).all())
    lo, hi = torch.aminmax(v.reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite(state_dict: Mapping[str, torch.Tensor], path: Path | str, shown: int = 4) -> None:
    """Raise CheckpointError if any floating-point (or complex) tensor holds a NaN or an Inf.

    One reduction per tensor without copies (a ViT-L, 423M parameters, takes a fraction of a second); the NaN/Inf
    counts in the message are computed only for the tensors named. Integer tensors (BatchNorm's
    ``num_batches_tracked``) cannot be non-finite and are skipped.
    """
    bad = [
        k for k, v in state_dict.items()
        if (v.is_floating_point() or v.is_complex()) and v.numel() and not _is_finite(v)
    ]
    if not bad:
        return
    checked = sum(1 for v in state_dict.values() if v.is_floating_point() or v.is_complex())

    def _what(key: str) -> str:
        v = state_dict[key]
        nan, inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
        parts = ([f"{nan} NaN"] if nan else []) + ([f"{inf} Inf"] if inf else [])
        return f"{key} {tuple(v.shape)}: {' and '.join(parts)} of {v.numel()} values"

    more = f" (+{len(bad) - shown} more)" if len(bad) > shown else ""
    raise CheckpointError(
        f"Checkpoint '{path}' holds non-finite weights (NaN or Inf) in {len(bad)} of {checked} floating-point "
        f"tensor(s): {'; '.join(_what(k) for k in bad[:shown])}{more}. A model with such weights gives meaningless "
        "outputs (e.g. every pixel class 0) and cannot be exported or quantized faithfully. The file is corrupt "
        "or was saved after training diverged: re-download it (check its sha256) or use a checkpoint from before "
        "the loss became NaN; nothing was loaded."
    )


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map foreign key names onto ours: strip the DDP ``module.`` prefix where present (only there)."""
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def shape_signature(model_or_sd: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a model or state dict (works on meta tensors)."""
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else model_or_sd
    return {k: tuple(v.shape) for k, v in sd.items()}


@dataclass
class SignatureDiff:
    """How a checkpoint's shapes (``have``) differ from a model's (``want``)."""

    missing: list[str]  # in the model, not in the checkpoint
    unexpected: list[str]  # in the checkpoint, not in the model
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, checkpoint shape, model shape

    @property
    def count(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.shapes)

    def __bool__(self) -> bool:
        return self.count > 0


def diff_signatures(have: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]]) -> SignatureDiff:
    """Compare a checkpoint's key -> shape map with a model's."""
    return SignatureDiff(
        missing=[k for k in want if k not in have],
        unexpected=[k for k in have if k not in want],
        shapes=[(k, tuple(have[k]), tuple(want[k])) for k in want if k in have and tuple(have[k]) != tuple(want[k])],
    )


def _few(items: list, n: int = 6) -> str:
    return ", ".join(map(str, items[:n])) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _describe_diff(diff: SignatureDiff, have: Mapping, want: Mapping, other: str, n: int = 6) -> str:
    """'N missing key(s): k (shape), ...; M unexpected key(s): ...; K shape mismatch(es): ...' (non-empty parts)."""
    parts = []
    if diff.missing:
        parts.append(f"{len(diff.missing)} missing key(s): " + _few([f"{k} {tuple(want[k])}" for k in diff.missing], n))
    if diff.unexpected:
        parts.append(f"{len(diff.unexpected)} unexpected key(s): "
                     + _few([f"{k} {tuple(have[k])}" for k in diff.unexpected], n))
    if diff.shapes:
        parts.append(f"{len(diff.shapes)} shape mismatch(es): "
                     + _few([f"{k} {a} in checkpoint vs {b} in {other}" for k, a, b in diff.shapes], n))
    return "; ".join(parts)


def infer_config(raw: RawCheckpoint) -> InvPTConfig:
    """Find the config that built a checkpoint: its own (ours), else the one preset whose shapes match exactly.

    Shapes cannot tell ViT head counts or tap positions, so only checkpoints that match a shipped preset
    (the official ViT-L PASCAL and NYUD models among them) are inferred; anything else asks for --config. A
    checkpoint a few tensors away from a preset is reported as a near miss naming the differing tensors.
    """
    if raw.config is not None:
        return load_config(raw.config)
    from invpt import build_model

    sig = shape_signature(raw.state_dict)
    matches = []
    near: list[tuple[int, str, SignatureDiff, dict]] = []
    for name in preset_names():
        cfg = load_config(name)
        with torch.device("meta"):
            want = shape_signature(build_model(cfg))
        diff = diff_signatures(sig, want)
        if not diff:
            matches.append(cfg)
        elif diff.count <= NEAR_MISS_MAX:
            near.append((diff.count, name, diff, want))
    if len(matches) == 1:
        _logger.info("config inferred from checkpoint shapes: preset '%s'", matches[0].name)
        return matches[0]
    heads = sorted(k.split(".")[1] for k in sig if k.startswith("heads.") and k.endswith("linear_pred.weight"))
    if not matches and near:
        count, name, diff, want = min(near, key=lambda t: t[0])
        causes = likely_causes(diff, sig, want, load_config(name), other=f"preset {name!r}")
        raise CheckpointError(
            f"Cannot infer the model config of '{raw.path}': it nearly matches preset '{name}' but differs in "
            f"{count} tensor(s): {_describe_diff(diff, sig, want, f'preset {name!r}')}"
            f"{'. Likely cause: ' + '; '.join(causes) if causes else ''}. If it was trained with a "
            f"modified {name} config, pass --config with that YAML; if it should be {name}, the file was edited "
            "or damaged: re-download or re-save it."
        )
    raise CheckpointError(
        f"Cannot infer the model config of '{raw.path}': it matches {'no' if not matches else 'several'} shipped "
        f"preset ({', '.join(preset_names())}), and head counts, tap blocks and image size cannot be read from "
        f"weights alone (it has tasks {heads}, {describe_backbone(sig)}). Pass --config with a preset name or the "
        "YAML that built it."
    )


def _backbone_facts(sig: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """What a checkpoint's shapes say about its ViT: width, depth, patch tokens, MLP width, qkv bias."""
    facts: dict[str, Any] = {}
    pos = sig.get("backbone.pos_embed")
    if pos is not None and len(pos) == 3:
        facts["ViT width"] = pos[2]
        facts["patch tokens"] = pos[1] - 1
    facts["ViT depth"] = len({k.split(".")[2] for k in sig if k.startswith("backbone.blocks.")})
    fc1 = sig.get("backbone.blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        facts["ViT MLP width"] = fc1[0]
    facts["qkv bias"] = "present" if "backbone.blocks.0.attn.qkv.bias" in sig else "absent"
    return facts


def describe_backbone(sig: Mapping[str, tuple[int, ...]]) -> str:
    """Short human description of a checkpoint's ViT (width, depth, token count) from its shapes."""
    f = _backbone_facts(sig)
    if "ViT width" not in f:
        return "no backbone.pos_embed"
    return f"ViT width {f['ViT width']}, depth {f['ViT depth']}, {f['patch tokens']} patch tokens"


def _decoder_facts(sig: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Decoder widths readable from shapes: decoder.embed_dim (intermediate heads) and E (mt_proj)."""
    facts: dict[str, Any] = {}
    for k, s in sig.items():
        if k.startswith("multi_task_decoder.intermediate_head.") and k.endswith(".weight") and len(s) == 4:
            facts["decoder.embed_dim"] = s[1]
        if k.startswith("multi_task_decoder.invpt.mt_proj.") and k.endswith(".0.weight") and len(s) == 4:
            facts["decoder width E (embed_dim + pred_channels)"] = s[0]
    return facts


def _head_channels(sig: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    return {
        k.split(".")[1]: s[0] for k, s in sig.items() if k.startswith("heads.") and k.endswith("linear_pred.weight")
    }


def _differing(have: Mapping[str, Any], want: Mapping[str, Any], other: str = "config") -> list[str]:
    """'name X in checkpoint vs Y in OTHER' for every fact known on both sides that differs."""
    return [f"{k} {have[k]} in checkpoint vs {want[k]} in {other}" for k in want if k in have and have[k] != want[k]]


def likely_causes(
    diff: SignatureDiff, have: Mapping, want: Mapping, cfg: Optional[InvPTConfig] = None, other: str = "config"
) -> list[str]:
    """Distinct, informative causes of a mismatch; each names the values that differ on both sides.

    A cause is only listed with facts that actually differ, so it never shows two identical descriptions; when
    the differing keys say nothing about sizes (e.g. a missing bias), the keys themselves are named.
    """
    causes = []
    model_tasks = {k.split(".")[1] for k in want if k.startswith("heads.")}
    ckpt_tasks = {k.split(".")[1] for k in have if k.startswith("heads.")}
    if model_tasks != ckpt_tasks:
        causes.append(
            f"wrong dataset or tasks: the checkpoint predicts {sorted(ckpt_tasks)}, the {other} {sorted(model_tasks)}"
        )
    hc, wc = _head_channels(have), _head_channels(want)
    chan = [
        f"{t} has {hc[t]} channels in checkpoint vs {wc[t]} in {other}"
        for t in sorted(set(hc) & set(wc)) if hc[t] != wc[t]
    ]
    if chan:
        causes.append(f"wrong dataset: {', '.join(chan)}")

    changed = diff.missing + diff.unexpected + [k for k, _, _ in diff.shapes]
    backbone_keys = [k for k in changed if k.startswith("backbone.")]
    if backbone_keys:
        hf, wf = _backbone_facts(have), _backbone_facts(want)
        facts = _differing(hf, wf, other)
        if facts:
            hint = ""
            if cfg is not None and hf.get("patch tokens") != wf.get("patch tokens") and "patch tokens" in hf:
                h, w = cfg.image_size
                side = math.isqrt(hf["patch tokens"])
                square = side * side == hf["patch tokens"]
                fits = f"; the checkpoint's fit e.g. {side * 16}x{side * 16}" if square else ""
                hint = f" (image_size {h}x{w} of the {other} gives {(h // 16) * (w // 16)} tokens at patch 16{fits})"
            size = any(f.startswith("patch tokens") for f in facts)
            label = "wrong backbone"
            if size:
                label = "wrong image size" if len(facts) == 1 else "wrong backbone and image size"
            causes.append(f"{label}: {', '.join(facts)}{hint}")
        else:
            causes.append(
                f"the ViT sizes agree ({describe_backbone(want)}) but backbone tensors differ "
                f"({_few(backbone_keys, 3)}): a different ViT variant, or an incomplete or edited checkpoint"
            )
    decoder_keys = [k for k in changed if k.startswith("multi_task_decoder.")]
    if decoder_keys and model_tasks == ckpt_tasks:
        facts = _differing(_decoder_facts(have), _decoder_facts(want), other)
        if facts:
            causes.append(f"wrong decoder width (decoder.embed_dim / pred_channels): {', '.join(facts)}")
        elif not causes:  # ViT width and head channels also reshape decoder tensors; only say this if nothing else does
            causes.append(
                f"the decoder widths agree but decoder tensors differ ({_few(decoder_keys, 3)}): a different "
                "decoder variant, or an incomplete or edited checkpoint"
            )
    return causes


def check_compatible(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], path: Path | str) -> None:
    """Raise one CheckpointError naming every missing/unexpected/mis-shaped key and the likely cause."""
    want = shape_signature(model)
    have = shape_signature(sd)
    diff = diff_signatures(have, want)
    if not diff:
        return
    causes = likely_causes(diff, have, want, getattr(model, "cfg", None))
    raise CheckpointError(
        f"Checkpoint '{path}' does not match the model config: {_describe_diff(diff, have, want, 'model')}. "
        f"Likely cause: {'; '.join(causes) if causes else 'a checkpoint of a different architecture'}. "
        "Pass the --config that built this checkpoint (or omit it to infer it); nothing was loaded."
    )


def resolve_device(device: str | torch.device) -> torch.device:
    """Return ``torch.device(device)`` if this machine can use it; else raise InputError saying why.

    Cheap (no CUDA context is created), so CLIs call it before loading anything.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(
            f"Device {str(device)!r} is not a torch device. Use cpu, cuda (the current GPU), cuda:N (the N-th GPU) "
            "or mps (Apple GPU)."
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"Device '{device}' was requested but PyTorch sees no CUDA GPU (torch {torch.__version__}, built "
                f"for CUDA {torch.version.cuda or 'none: a CPU-only build'}). Use --device cpu, or check the NVIDIA "
                "driver, CUDA_VISIBLE_DEVICES and that a CUDA build of PyTorch is installed."
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InputError(
                f"Device '{device}' was requested but PyTorch sees {count} CUDA GPU(s) (cuda:0..cuda:{count - 1}). "
                "Pick one of them, or check CUDA_VISIBLE_DEVICES."
            )
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise InputError(
                f"Device '{device}' was requested but MPS (Apple GPU) is not available here. Use --device cpu."
            )
    elif dev.type not in ("cpu", "meta"):
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise InputError(
                f"Device '{device}' ({dev.type}) is not available in this PyTorch build. Use --device cpu or cuda."
            )
    return dev


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
        device: where the model lives (checked before the checkpoint is read).
        fused_attn: see :class:`invpt.model.InvPT` (False for export).

    Raises:
        CheckpointError: unreadable, non-finite or mismatching checkpoint; nothing is half-loaded.
        InputError: ``device`` is not usable here.
    """
    from invpt import build_model

    dev = resolve_device(device)
    cfg_given = load_config(config) if config is not None else None
    raw = read_checkpoint(ckpt_path)
    cfg = cfg_given if cfg_given is not None else infer_config(raw)
    if cfg_given is not None and raw.config is not None:
        _warn_config_differs(raw, cfg_given)
    # Built on the meta device (no memory, no random init), then the checkpoint's own tensors are assigned: one copy
    # of the weights (memory-mapped, see _load_weights_only) instead of a random-initialised model plus a checkpoint.
    with torch.device("meta"):
        model = build_model(cfg, fused_attn=fused_attn)
    check_compatible(model, raw.state_dict, raw.path)
    want = {k: v.dtype for k, v in model.state_dict().items()}
    sd = {k: (v if v.dtype == want[k] else v.to(want[k])) for k, v in raw.state_dict.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    del sd
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # every parameter and buffer is in the state dict (strict), so this is an invpt bug
        raise RuntimeError(f"tensors left on the meta device after loading: {left[:5]}")
    _logger.info("loaded %s checkpoint '%s' (%s)", raw.origin, raw.path, cfg.name or cfg.dataset)
    return model.to(dev).eval()


def _warn_config_differs(raw: RawCheckpoint, given: InvPTConfig) -> None:
    """Warn when --config differs from the config stored in an invpt checkpoint (shapes may still match)."""
    try:
        own = load_config(raw.config).to_dict()
    except InvptError:
        return
    theirs = given.to_dict()
    changed = []
    for section in own:
        a, b = own[section], theirs.get(section)
        if section in ("name",):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            changed += [
                f"{section}.{k}: {a[k]!r} -> {b.get(k)!r}" for k in a if a[k] != b.get(k) and k != "drop_path_rate"
            ]
        elif a != b:
            changed.append(f"{section}: {a!r} -> {b!r}")
    if changed:
        _logger.warning(
            "checkpoint '%s' stores its own config; the config passed differs (%s). Weights load only because the "
            "shapes agree; outputs are right only if the passed config is the one it was trained with (omit "
            "--config to use the stored one)", raw.path, "; ".join(changed))


# ---- writing -------------------------------------------------------------------------------------------------

def _atomic_save(obj: Any, path: Path) -> None:
    write_atomic(path, lambda f: torch.save(obj, f), "Checkpoint", CheckpointError)


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
