"""The options of one training run: one frozen dataclass that ``invpt-train``'s argument groups parse into.

Defaults are the official recipe (spec §2): Adam, lr 2e-5, weight decay 1e-6, a per-iteration poly schedule
(power 0.9, down to 0) over 40,000 iterations, batch 2 per process, FP32. Everything else (bf16 autocast,
activation checkpointing, frozen BatchNorm statistics) is off by default and only changes memory or speed
trade-offs the user asks for.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from invpt.config import ConfigLike
from invpt.errors import InputError

ProgressMode = Literal["auto", "bar", "lines", "none"]
TensorBoardMode = Literal["auto", "on", "off"]

#: ``resume`` value meaning "the last.pth of the output folder".
RESUME_LAST = "last"

#: The official recipe's Adam learning rate (the ``--lr`` default).
DEFAULT_LR = 2e-5


def suggest_lower_lr(lr: float) -> float:
    """A learning rate to retry with after the loss diverged at ``lr``: half of it, or the official default where
    ``lr`` is far (100x or more) above that default (halving 1e30 would still diverge)."""
    return DEFAULT_LR if lr >= 100 * DEFAULT_LR else lr / 2


@dataclass(frozen=True)
class TrainOptions:
    """Everything one ``train()`` call needs; see ``invpt-train --help`` for the user-facing description.

    Attributes:
        config: preset name, YAML path, dict or InvPTConfig; None only when resuming (the checkpoint's own is used).
        data_root: dataset folder in the official layout (``PASCALContext/`` or ``NYUDv2/``, or their parent).
        out_dir: folder for checkpoints, logs and evaluation reports.
        resume: None (fresh run), :data:`RESUME_LAST` (``out_dir/last.pth``) or a checkpoint path.
        max_iter: total optimizer steps of the run (the poly schedule reaches 0 there).
        batch: images per process and step (global batch = batch x processes).
        lr, weight_decay: Adam's learning rate and (L2) weight decay.
        poly_power: lr(it) = lr * (1 - it / max_iter) ** poly_power.
        eval_every: evaluate on the validation split every N iterations (0: only at the end).
        final_eval: evaluate once more when training ends.
        eval_batch: images per process and step during evaluation.
        checkpoint_every: write ``ckpt_<iter>.pth`` and ``last.pth`` every N iterations (and always at the end).
        keep_checkpoints: keep only the newest N ``ckpt_<iter>.pth`` files (0 keeps all); ``last.pth`` is kept.
        seed: seeds model initialisation, data order, augmentation and dropout.
        workers: DataLoader worker processes per training process.
        bf16: bfloat16 autocast for the forward pass (losses and the optimizer stay FP32).
        grad_checkpointing: recompute ViT block activations in the backward pass (less activation memory, one more
            forward pass of the ViT blocks).
        backbone_weights: a local timm ViT checkpoint (.pth/.bin/.safetensors/.npz) loaded into the backbone.
        device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"; under torchrun each process
            uses cuda:LOCAL_RANK.
        augment: official training augmentation (scale, crop, flip, photometric); False trains on eval transforms.
        freeze_bn_stats: BatchNorm layers normalise with their running statistics and never update them.
        sync_bn: convert BatchNorm to SyncBatchNorm when training on several CUDA processes (as upstream).
        train_split, val_split: split names (``ImageSets``/``gt_sets`` file names).
        progress: "bar" (tqdm), "lines" (a log line every ``log_every`` iterations), "none", or "auto" (a bar on a
            terminal, lines otherwise).
        log_every: iterations between progress lines.
        tensorboard: "on" (error if TensorBoard is missing), "auto" (use it when installed), "off".
        command: the command line, recorded in checkpoints and reports.
    """

    config: Optional[ConfigLike]
    data_root: Path
    out_dir: Path
    resume: Optional[str] = None
    max_iter: int = 40000
    batch: int = 2
    lr: float = DEFAULT_LR
    weight_decay: float = 1e-6
    poly_power: float = 0.9
    eval_every: int = 5000
    final_eval: bool = True
    eval_batch: int = 6
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    seed: int = 0
    workers: int = 2
    bf16: bool = False
    grad_checkpointing: bool = False
    backbone_weights: Optional[Path] = None
    device: str = "auto"
    augment: bool = True
    freeze_bn_stats: bool = False
    sync_bn: bool = True
    train_split: str = "train"
    val_split: str = "val"
    progress: ProgressMode = "auto"
    log_every: int = 20
    tensorboard: TensorBoardMode = "auto"
    command: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_root", Path(self.data_root))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.backbone_weights is not None:
            object.__setattr__(self, "backbone_weights", Path(self.backbone_weights))
        if self.config is None and self.resume is None:
            raise InputError("No model config given. Pass --config (a preset name such as tiny_pascal or a YAML "
                             "file); only --resume may leave it out (the checkpoint stores its config).")
        for name, low in (("max_iter", 1), ("batch", 1), ("eval_batch", 1), ("log_every", 1), ("eval_every", 0),
                          ("checkpoint_every", 0), ("keep_checkpoints", 0), ("workers", 0), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InputError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}.")
        for name in ("lr", "weight_decay", "poly_power"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise InputError(f"--{name.replace('_', '-')} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, "
                                 f"got {value!r}.")
        for name, allowed in (("progress", ("auto", "bar", "lines", "none")), ("tensorboard", ("auto", "on", "off"))):
            if getattr(self, name) not in allowed:
                raise InputError(f"--{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}.")

    def replace(self, **changes) -> "TrainOptions":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def schedule_factor(self, iteration: int) -> float:
        """The poly factor applied to ``lr`` after ``iteration`` optimizer steps (0 at and after ``max_iter``)."""
        return max(0.0, 1.0 - iteration / self.max_iter) ** self.poly_power

    def recorded(self) -> dict:
        """The options as plain values (for checkpoints and reports); the config is recorded separately."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "config":
                continue
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else v
        return out


#: Options whose change on resume alters the optimisation itself (lr curve, batch composition): a warning names them.
TRAJECTORY_OPTIONS = ("max_iter", "batch", "lr", "weight_decay", "poly_power", "seed", "augment", "bf16",
                      "freeze_bn_stats")
