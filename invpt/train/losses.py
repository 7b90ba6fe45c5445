"""Training losses of InvPT (spec §12): one small module per loss kind and the weighted multi-task sum.

Targets use the official sample layout: ``[B,1,H,W]`` float maps for semseg / human_parts (class ids), sal and
edge ({0, 1}) and depth (metres); ``[B,3,H,W]`` normals in [-1, 1]; 255 marks ignored pixels in every task.

==========  ==============================  =====================================================================
task kind   module                          definition (upstream's ``losses/``)
==========  ==============================  =====================================================================
label       :class:`MaskedCrossEntropy`     CE, ignore 255, sum over valid pixels / number of valid pixels
saliency    :class:`BalancedCrossEntropy`   CE with class weights (1 - w, w), w = fraction of negatives among
                                            valid pixels; sum / number of valid pixels
boundary    :class:`BalancedBCEWithLogits`  BCE-with-logits, pos_weight = p / (1 - p) (p = ``edge_w`` = 0.95: 19),
                                            mean over valid pixels, times (1 - p): = p * pos term + (1 - p) * neg
normals     :class:`MaskedL1` (normalize)   L1 on the L2-normalised prediction; valid = all 3 GT channels != 255;
                                            sum over channels and pixels / number of valid *pixels*
depth       :class:`MaskedL1`               L1, ignore 255, sum / number of valid pixels
==========  ==============================  =====================================================================

Every loss divides by ``max(n_valid, 1)`` (upstream does so for CE and L1; for the BCE and the saliency weight it
would divide by zero): a batch without a single valid pixel gives a loss of exactly 0 that is still attached to the
graph, so ``backward()`` works and leaves zero gradients, never NaN. Half-precision outputs (autocast) are upcast to
float32 first; upstream trains in FP32.

:func:`build_criterion` assembles :class:`MultiTaskLoss` with the official weights of the dataset
(:data:`LOSS_WEIGHTS`) and intermediate supervision: the same losses and weights on the model's ``inter_preds``.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from invpt.errors import ConfigError

IGNORE_INDEX = 255
EDGE_POS_WEIGHT = 0.95  # the YAML's ``edge_w``
NORMALIZE_EPS = 1e-12  # F.normalize's default, as the official loss uses it

# Official loss weights per dataset (configs/*.yml ``loss_kwargs.loss_weights``).
LOSS_WEIGHTS: dict[str, dict[str, float]] = {
    "pascal_context": {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "edge": 50.0, "normals": 10.0},
    "nyud_v2": {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0},
}


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """Half / bfloat16 outputs (autocast) are computed in float32; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_shapes(name: str, output: torch.Tensor, target: torch.Tensor, target_channels: int) -> None:
    if output.dim() != 4 or target.dim() != 4:
        raise ValueError(
            f"{name}: output and target must be [B,C,H,W]; got {tuple(output.shape)} and {tuple(target.shape)}."
        )
    if (output.shape[0] != target.shape[0] or output.shape[-2:] != target.shape[-2:]
            or target.shape[1] != target_channels):
        raise ValueError(
            f"{name}: output {tuple(output.shape)} does not match target {tuple(target.shape)} (expected a target of "
            f"[B,{target_channels},H,W] with the output's batch and H, W). Upsample the outputs to the label size."
        )


def _n_valid(mask: torch.Tensor) -> torch.Tensor:
    """Number of valid pixels, at least 1 (a tensor, so the division needs no host sync)."""
    return mask.sum().clamp_min(1)


class MaskedCrossEntropy(nn.Module):
    """Cross-entropy over class ids with ignored pixels: sum over valid pixels / number of valid pixels (semseg,
    human_parts).

    Args:
        ignore_index: target value of ignored pixels.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shapes(type(self).__name__, output, target, 1)
        label = target[:, 0].long()
        loss = F.cross_entropy(_as_float(output), label, ignore_index=self.ignore_index, reduction="none")
        return loss.sum() / _n_valid(label != self.ignore_index)


class BalancedCrossEntropy(nn.Module):
    """Two-class cross-entropy balanced per batch (saliency): class weights ``(1 - w, w)`` for (negative, positive),
    ``w`` = fraction of negative pixels among the valid ones of the whole batch; the weighted sum over valid pixels
    is divided by the number of valid pixels (not by the sum of weights).

    Args:
        ignore_index: target value of ignored pixels.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shapes(type(self).__name__, output, target, 1)
        output = _as_float(output)
        label = target[:, 0].long()
        valid = label != self.ignore_index
        n_valid = _n_valid(valid)
        w = ((label == 0) & valid).sum().to(output.dtype) / n_valid  # fraction of negatives (0 when none valid)
        class_weight = torch.stack((1.0 - w, w))
        loss = F.cross_entropy(output, label, weight=class_weight, ignore_index=self.ignore_index, reduction="none")
        return loss.sum() / n_valid


class BalancedBCEWithLogits(nn.Module):
    """HED-style balanced binary cross-entropy with a fixed positive weight ``p`` (boundaries).

    BCE-with-logits with ``pos_weight = p / (1 - p)``, averaged over valid pixels and divided by ``1 / (1 - p)``:
    per pixel ``p * (-log sigmoid(x))`` on positives and ``(1 - p) * (-log(1 - sigmoid(x)))`` on negatives.

    Args:
        pos_weight: ``p``, the official ``edge_w`` (0.95); must lie in [0, 1).
        ignore_index: target value of ignored pixels.
    """

    def __init__(self, pos_weight: float = EDGE_POS_WEIGHT, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        if not 0.0 <= float(pos_weight) < 1.0:
            raise ConfigError(
                f"edge pos_weight (edge_w) must lie in [0, 1), got {pos_weight}; the official value is 0.95."
            )
        self.pos_weight = float(pos_weight)
        self.ignore_index = ignore_index

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shapes(type(self).__name__, output, target, 1)
        output = _as_float(output)
        valid = target != self.ignore_index
        label = torch.where(valid, target, torch.zeros_like(target)).to(output.dtype)
        factor = 1.0 / (1.0 - self.pos_weight)
        pos_weight = torch.tensor(self.pos_weight * factor, dtype=output.dtype, device=output.device)
        loss = F.binary_cross_entropy_with_logits(output, label, pos_weight=pos_weight, reduction="none")
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        return loss.sum() / _n_valid(valid) / factor


class MaskedL1(nn.Module):
    """L1 loss over pixels whose target channels are all valid: sum over channels and valid pixels / number of
    valid pixels (depth; normals with ``normalize=True``, which L2-normalises the prediction over channels first).

    Args:
        normalize: L2-normalise the prediction over channels (``F.normalize``, eps 1e-12) before the L1.
        ignore_index: target value of ignored pixels (a pixel is valid when no channel holds it).
    """

    def __init__(self, normalize: bool = False, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.normalize = normalize
        self.ignore_index = ignore_index

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shapes(type(self).__name__, output, target, output.shape[1] if output.dim() == 4 else 1)
        output = _as_float(output)
        if self.normalize:
            output = F.normalize(output, p=2, dim=1, eps=NORMALIZE_EPS)
        valid = (target != self.ignore_index).all(dim=1, keepdim=True)  # [B,1,H,W]
        diff = (output - target.to(output.dtype)).abs()
        diff = torch.where(valid, diff, torch.zeros_like(diff))
        return diff.sum() / _n_valid(valid)


def loss_for_kind(kind: str, *, edge_w: float = EDGE_POS_WEIGHT, ignore_index: int = IGNORE_INDEX) -> nn.Module:
    """The official loss module for a task kind (see :class:`invpt.tasks.TaskSpec`)."""
    if kind == "label":
        return MaskedCrossEntropy(ignore_index)
    if kind == "saliency":
        return BalancedCrossEntropy(ignore_index)
    if kind == "boundary":
        return BalancedBCEWithLogits(edge_w, ignore_index)
    if kind == "normals":
        return MaskedL1(normalize=True, ignore_index=ignore_index)
    if kind == "depth":
        return MaskedL1(normalize=False, ignore_index=ignore_index)
    raise ConfigError(f"no loss for task kind '{kind}'; known kinds: label, saliency, boundary, normals, depth.")


class MultiTaskLoss(nn.Module):
    """Weighted sum of per-task losses, optionally also on the intermediate predictions (upstream's
    ``MultiTaskLoss``).

    ``forward(outputs, targets)`` returns ``{task: loss, "inter_<task>": loss, "total": loss}``: ``outputs`` is the
    model's dict (with ``"inter_preds"`` when ``intermediate_supervision``), ``targets`` maps each task to its label
    tensor (other keys are ignored). ``total = sum_t weight_t * (loss_t + inter_loss_t)``.

    Args:
        losses: task name -> loss module, in task order.
        weights: task name -> weight; every task of ``losses`` needs one.
        intermediate_supervision: also supervise ``outputs["inter_preds"]`` with the same losses and weights.
    """

    def __init__(
        self, losses: Mapping[str, nn.Module], weights: Mapping[str, float], intermediate_supervision: bool = True
    ) -> None:
        super().__init__()
        missing = [t for t in losses if t not in weights]
        if missing:
            raise ConfigError(f"loss weights missing for task(s) {missing}; give a weight for every task.")
        self.tasks = tuple(losses)
        self.losses = nn.ModuleDict(dict(losses))
        self.weights = {t: float(weights[t]) for t in self.tasks}
        self.intermediate_supervision = intermediate_supervision

    def forward(
        self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        missing = [t for t in self.tasks if t not in outputs or t not in targets]
        if missing:
            raise ConfigError(
                f"criterion for tasks {list(self.tasks)}: task(s) {missing} missing from the outputs "
                f"({[k for k in outputs if k != 'inter_preds']}) or the targets ({list(targets)}). Build the "
                "criterion and the model from the same config."
            )
        inter: Optional[Mapping[str, torch.Tensor]] = None
        if self.intermediate_supervision:
            inter = outputs.get("inter_preds")
            if inter is None or any(t not in inter for t in self.tasks):
                raise ConfigError(
                    "intermediate supervision needs outputs['inter_preds'] for every task: call the model with "
                    "return_intermediate=True, or build the criterion with intermediate_supervision=False."
                )
        out: dict[str, torch.Tensor] = {t: self.losses[t](outputs[t], targets[t]) for t in self.tasks}
        if inter is not None:
            for t in self.tasks:
                out[f"inter_{t}"] = self.losses[t](inter[t], targets[t])
        total = sum(self.weights[t] * out[t] for t in self.tasks)
        if inter is not None:
            total = total + sum(self.weights[t] * out[f"inter_{t}"] for t in self.tasks)
        out["total"] = total
        return out

    def extra_repr(self) -> str:
        return f"weights={self.weights}, intermediate_supervision={self.intermediate_supervision}"


def default_loss_weights(dataset: str) -> dict[str, float]:
    """The official loss weights of ``dataset`` (a copy)."""
    try:
        return dict(LOSS_WEIGHTS[dataset])
    except KeyError:
        raise ConfigError(
            f"no official loss weights for dataset '{dataset}' (known: {', '.join(LOSS_WEIGHTS)}); pass weights= "
            "with one weight per task."
        ) from None


def build_criterion(
    config,
    *,
    intermediate_supervision: bool = True,
    weights: Optional[Mapping[str, float]] = None,
    edge_w: float = EDGE_POS_WEIGHT,
    ignore_index: int = IGNORE_INDEX,
) -> MultiTaskLoss:
    """The official multi-task criterion for a config's dataset and tasks.

    Args:
        config: preset name, YAML path, dict or :class:`~invpt.config.InvPTConfig` (as
            :func:`invpt.config.load_config` takes).
        intermediate_supervision: supervise the intermediate predictions too (official: on).
        weights: per-task weights that override the dataset's official ones (:data:`LOSS_WEIGHTS`); tasks not
            named keep theirs.
        edge_w: the boundary loss's positive weight (official 0.95).
        ignore_index: label value of ignored pixels (official 255).

    Raises:
        ConfigError: an override names a task the config does not have, or a weight is negative or not finite.
    """
    from invpt.config import load_config

    cfg = load_config(config)
    spec = cfg.dataset_spec
    table = LOSS_WEIGHTS.get(cfg.dataset, {})
    if weights:
        unknown = [t for t in weights if t not in cfg.tasks]
        if unknown:
            raise ConfigError(
                f"loss weight override for task(s) {unknown}, which the config does not train (tasks: "
                f"{list(cfg.tasks)}). Remove them or add the tasks to the config."
            )
        bad = {t: w for t, w in weights.items() if not (float(w) >= 0.0 and float(w) < float("inf"))}
        if bad:
            raise ConfigError(f"loss weights must be finite and >= 0, got {bad}.")
        table = {**table, **{t: float(w) for t, w in weights.items()}}
    missing = [t for t in cfg.tasks if t not in table]
    if missing:
        raise ConfigError(
            f"no loss weight for task(s) {missing} of dataset '{cfg.dataset}'; pass weights={{task: weight}}."
        )
    losses = {t: loss_for_kind(spec.task(t).kind, edge_w=edge_w, ignore_index=ignore_index) for t in cfg.tasks}
    return MultiTaskLoss(losses, {t: table[t] for t in cfg.tasks}, intermediate_supervision)
