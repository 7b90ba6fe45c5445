"""Evaluation metrics of InvPT (spec §13), accumulated over a whole split and mergeable across processes.

:func:`build_evaluator` returns a :class:`MultiTaskEvaluator`: ``update(outputs, targets, meta=None)`` per batch,
``score()`` at the end, ``reset()`` between evaluations. ``outputs`` are the model's raw outputs at label resolution
(``inter_preds`` is ignored); the official test-time decoding (spec §11) is applied inside, in torch on the outputs'
device. ``targets`` use the official sample layout (255 = ignored): ``[B,1,H,W]`` class ids / {0,1} / metres,
``[B,3,H,W]`` normals in [-1, 1].

Every accumulator is a sum or a count (int64 counts, float64 sums, kept on the CPU), never a per-image mean, so

* ``update`` over batches == one ``update`` over their concatenation (split-level metrics, as upstream);
* ``merge(other)`` == one evaluator that saw both halves of the split; :meth:`MultiTaskEvaluator.all_reduce`
  sums the accumulators over ``torch.distributed`` ranks, so the reduced score equals the single-process score.

Metrics (keys as upstream; scales noted):

========  ==========================================================================================================
task      ``score()[task]``
========  ==========================================================================================================
label     ``mIoU`` (**percent**; upstream stores a fraction and prints x100, the README's 79.91 is percent),
          ``IoU`` (per-class list, percent). Per class TP/FP/FN over valid pixels, IoU = TP / max(TP+FP+FN, 1e-8),
          mean over **all** classes: a class absent from both GT and prediction counts as IoU 0 (upstream's
          formula). Images without any valid pixel (human_parts without part annotations arrive all-255) add
          nothing.
sal       ``maxF`` (**percent**, upstream's quirk) and ``maxF_prob`` (percent, the usual definition); see
          :class:`SaliencyMeter`.
normals   ``mean`` angular error in degrees (the official metric), plus ``rmse``, ``median`` (from a 0.01-degree
          histogram, so within 0.005 degrees; it merges across ranks), ``11.25``, ``22.5``, ``30`` (percent of
          valid pixels under that many degrees).
depth     ``rmse`` (metres), ``log_rmse`` (natural log), ``abs_rel``, ``sq_rel`` (no percent anywhere).
boundary  ``loss``: upstream's ``EdgeMeter`` value, for reference only (the real odsF is computed offline from
          the PNGs written with ``save_dir``).
========  ==========================================================================================================

No valid pixel at all: ``mIoU`` and ``maxF`` are 0.0 (their formulas), the normals, depth and boundary means are
``nan`` (upstream divides by zero there).
"""
from __future__ import annotations

import abc
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from invpt.errors import ConfigError, InputError
from invpt.tasks import TaskSpec
from invpt.train.losses import EDGE_POS_WEIGHT, IGNORE_INDEX, NORMALIZE_EPS, BalancedBCEWithLogits

SAL_THRESHOLD_STEP = 0.05
SAL_BETA_SQUARED = 0.3
DEPTH_MIN = 1e-9  # official: values <= 0 are replaced by 1e-9 before the logs and ratios
NORMALS_BINS_PER_DEGREE = 100
NORMALS_THRESHOLDS = (11.25, 22.5, 30.0)

#: The headline metric of each task kind and whether higher is better (for model selection and logs).
PRIMARY_METRICS: dict[str, tuple[str, bool]] = {
    "label": ("mIoU", True),
    "saliency": ("maxF", True),
    "normals": ("mean", False),
    "depth": ("rmse", False),
    "boundary": ("loss", False),
}


# ---- official decoding in torch ---------------------------------------------------------------------------------
# The same definitions as invpt.data.decode (numpy, shared by every runtime); these twins run on the outputs' device
# so evaluation never copies full-size logits to the host. tests/test_train_metrics.py pins them to invpt.data.decode.
def decode_labels_torch(raw: torch.Tensor) -> torch.Tensor:
    """Class ids ``[B,H,W]`` (int64): argmax over channels (first maximum on ties, like numpy)."""
    return raw.argmax(dim=1)


def decode_saliency_torch(raw: torch.Tensor) -> torch.Tensor:
    """Salient-class probability ``[B,H,W]``: ``softmax(raw)[:, 1]``, round-tripped through the official ``x255 /
    255`` (the evaluation code receives ``255 * p`` and divides by 255)."""
    return torch.softmax(raw.float(), dim=1)[:, 1] * 255.0 / 255.0


def _boundary_255(x: torch.Tensor) -> torch.Tensor:
    """``255 * sigmoid(x)`` with upstream's exact float32 arithmetic, ``255 / (1 + exp(-x))`` (its ``get_output``
    writes ``255 * 1 / (1 + torch.exp(-x))``, evaluated left to right), so the uint8 PNGs truncate identically."""
    return 255.0 / (1.0 + torch.exp(-x))


def decode_boundary_torch(raw: torch.Tensor) -> torch.Tensor:
    """Boundary probability ``[B,H,W]``: upstream's ``255 / (1 + exp(-x))`` divided by 255 (the EdgeMeter input)."""
    return _boundary_255(raw.float()[:, 0]) / 255.0


def decode_normals_torch(raw: torch.Tensor) -> torch.Tensor:
    """Unit normals ``[B,3,H,W]`` as the official metric sees them: ``F.normalize`` (eps 1e-12), encoded
    ``(n + 1) * 255 / 2`` and decoded ``2 * v / 255 - 1`` in float (no rounding: the meter receives the float
    encoding in memory)."""
    encoded = (F.normalize(raw.float(), p=2, dim=1, eps=NORMALIZE_EPS) + 1.0) * 255.0 / 2.0
    return 2.0 * encoded / 255.0 - 1.0


def decode_depth_torch(raw: torch.Tensor) -> torch.Tensor:
    """Depth in metres ``[B,H,W]``: the regression clamped at 0."""
    return raw.float()[:, 0].clamp(min=0.0)


def _unit_or_zero(x: torch.Tensor) -> torch.Tensor:
    """Divide by the L2 norm over channels; vectors of norm 0 stay 0 (the official ``normalize_tensor``)."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    zero = norm == 0
    return torch.where(zero, torch.zeros_like(x), x / torch.where(zero, torch.ones_like(norm), norm))


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


# ------------------------------------------------------------------------------------------------------------------
class Meter(abc.ABC):
    """One task's accumulators: named CPU tensors (int64 counts, float64 sums) that add up across batches and
    processes. Subclasses define :meth:`_new_state`, :meth:`update` and :meth:`score`."""

    def __init__(self) -> None:
        self._state = self._new_state()

    @abc.abstractmethod
    def _new_state(self) -> dict[str, torch.Tensor]:
        """Zeroed accumulators."""

    @abc.abstractmethod
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: the raw output ``[B,C,H,W]`` and its target ``[B,c,H,W]`` (same H, W)."""

    @abc.abstractmethod
    def score(self) -> dict[str, Any]:
        """Metrics over everything accumulated so far."""

    def reset(self) -> None:
        self._state = self._new_state()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._state.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ref = self._new_state()
        if set(state) != set(ref):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: keys {sorted(state)} do not match {sorted(ref)}; the state "
                "comes from an evaluator built for other tasks or another version."
            )
        new = {}
        for k, r in ref.items():
            v = torch.as_tensor(state[k]).detach().to("cpu")
            if tuple(v.shape) != tuple(r.shape):
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: '{k}' has shape {tuple(v.shape)}, expected "
                    f"{tuple(r.shape)} (another number of classes or thresholds)."
                )
            new[k] = v.to(r.dtype).clone()
        self._state = new

    def merge(self, other: "Meter") -> None:
        """Add ``other``'s accumulators (same meter kind and sizes) to this one."""
        if type(other) is not type(self):
            raise ValueError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}.")
        theirs = other.state_dict()
        if set(theirs) != set(self._state) or any(theirs[k].shape != v.shape for k, v in self._state.items()):
            raise ValueError(f"cannot merge {type(other).__name__}s of different sizes (classes or thresholds).")
        for k, v in self._state.items():
            v += theirs[k]

    def _add(self, **values: torch.Tensor) -> None:
        for k, v in values.items():
            acc = self._state[k]
            acc += v.detach().to(device="cpu", dtype=acc.dtype)

    @staticmethod
    def _check(name: str, output: torch.Tensor, target: torch.Tensor, out_c: int, tgt_c: int) -> None:
        if output.dim() != 4 or target.dim() != 4 or output.shape[0] != target.shape[0] \
                or output.shape[-2:] != target.shape[-2:] or output.shape[1] != out_c or target.shape[1] != tgt_c:
            raise ValueError(
                f"{name}: output {tuple(output.shape)} and target {tuple(target.shape)} do not fit: expected "
                f"[B,{out_c},H,W] and [B,{tgt_c},H,W] with the same B, H, W. Evaluate outputs at label resolution."
            )


class SegmentationMeter(Meter):
    """mIoU of a label task from a confusion matrix over valid pixels (GT != ignore).

    The matrix has one extra GT row for valid GT ids outside ``[0, C)``: such pixels count as false positives of
    the predicted class (as upstream's per-class TP/FP/FN loop counts them) and as nobody's false negative.

    Args:
        num_classes: C (PASCAL semseg 21, human_parts 7, NYUD 40).
        ignore_index: GT value of ignored pixels.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        super().__init__()

    def _new_state(self) -> dict[str, torch.Tensor]:
        return {"confusion": torch.zeros(self.num_classes + 1, self.num_classes, dtype=torch.int64)}

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        c = self.num_classes
        self._check(type(self).__name__, output, target, c, 1)
        pred = decode_labels_torch(output)
        gt = target[:, 0].to(pred.device).long()
        valid = gt != self.ignore_index
        g, p = gt[valid], pred[valid]
        g = torch.where((g >= 0) & (g < c), g, torch.full_like(g, c))
        counts = torch.bincount(g * c + p, minlength=(c + 1) * c)
        self._add(confusion=counts.reshape(c + 1, c))

    def iou(self) -> np.ndarray:
        """Per-class IoU as fractions (upstream's ``jac``)."""
        conf = self._state["confusion"].to(torch.float64)
        tp = torch.diagonal(conf[: self.num_classes])
        fp = conf.sum(0) - tp
        fn = conf[: self.num_classes].sum(1) - tp
        return (tp / torch.clamp(tp + fp + fn, min=1e-8)).numpy()

    def score(self) -> dict[str, Any]:
        iou = self.iou()
        return {"mIoU": float(np.mean(iou)) * 100.0, "IoU": [float(v) * 100.0 for v in iou]}


class SaliencyMeter(Meter):
    """Saliency max F-measure, in percent, two ways.

    * ``maxF`` replicates the official meter, quirk included: the prediction it receives is the probability
      ``softmax[:, 1]`` and, because prediction and target ranks match, it applies ``sigmoid`` **again**. Thresholds
      ``arange(0.05, 1, 0.05)`` (19, float32) then act on ``sigmoid(p)`` in [0.5, 0.731]: every threshold <= 0.5 marks
      all pixels positive, only 0.55-0.70 are informative (probability thresholds 0.2007, 0.4055, 0.6190, 0.8473) and
      thresholds >= 0.75 give F = 0. Use it to compare with published numbers (README 84.38).
    * ``maxF_prob`` applies the same thresholds to the probability itself (the usual definition).

    Over the split, per threshold: TP, predicted positives and actual positives among valid pixels (GT != 255;
    GT 1 = salient). P = TP / predicted, R = TP / actual, F = (1 + b2) P R / (b2 P + R) with b2 = 0.3, NaN -> 0,
    max over thresholds. (Upstream sums the counts in float32, which rounds on a large split; ours are exact int64.)

    Args:
        ignore_index: GT value of ignored pixels.
        threshold_step: 0.05 officially.
        beta_squared: 0.3 officially.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, threshold_step: float = SAL_THRESHOLD_STEP,
                 beta_squared: float = SAL_BETA_SQUARED) -> None:
        self.ignore_index = ignore_index
        self.beta_squared = float(beta_squared)
        self.thresholds = torch.arange(threshold_step, 1, threshold_step)  # float32, as upstream
        super().__init__()

    def _new_state(self) -> dict[str, torch.Tensor]:
        n = len(self.thresholds)
        z = lambda: torch.zeros(n, dtype=torch.int64)  # noqa: E731
        return {"tp": z(), "pred_pos": z(), "tp_prob": z(), "pred_pos_prob": z(),
                "actual_pos": torch.zeros((), dtype=torch.int64)}

    def _counts(self, scores: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per threshold t_k: #(score >= t_k) and #(score >= t_k and positive), via one bucketize."""
        n = len(self.thresholds)
        idx = torch.bucketize(scores, self.thresholds.to(scores.device), right=True)  # #{k: t_k <= score}
        above = torch.bincount(idx, minlength=n + 1)
        above_pos = torch.bincount(idx[positive], minlength=n + 1)
        # score >= t_k  <=>  idx > k: reverse cumulative sums from bucket k+1 on
        pred_pos = above.flip(0).cumsum(0).flip(0)[1:]
        tp = above_pos.flip(0).cumsum(0).flip(0)[1:]
        return tp, pred_pos

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self._check(type(self).__name__, output, target, 2, 1)
        prob = decode_saliency_torch(output)
        gt = target[:, 0].to(prob.device)
        valid = gt != self.ignore_index
        p = prob[valid]
        positive = gt[valid].long() == 1
        tp, pp = self._counts(torch.sigmoid(p), positive)  # the official double squashing
        tp_prob, pp_prob = self._counts(p, positive)
        self._add(tp=tp, pred_pos=pp, tp_prob=tp_prob, pred_pos_prob=pp_prob, actual_pos=positive.sum())

    def _max_f(self, tp: torch.Tensor, pred_pos: torch.Tensor) -> float:
        tp = tp.to(torch.float64)
        actual = self._state["actual_pos"].to(torch.float64)
        precision = tp / pred_pos.to(torch.float64)
        recall = tp / actual
        f = (1.0 + self.beta_squared) * precision * recall / (self.beta_squared * precision + recall)
        f = torch.nan_to_num(f, nan=0.0)
        return float(f.max()) * 100.0

    def score(self) -> dict[str, Any]:
        s = self._state
        return {"maxF": self._max_f(s["tp"], s["pred_pos"]), "maxF_prob": self._max_f(s["tp_prob"], s["pred_pos_prob"])}


class NormalsMeter(Meter):
    """Angular error of surface normals in degrees over valid pixels (all 3 GT channels != 255).

    The prediction goes through the official decoding (:func:`decode_normals_torch`); prediction and GT are then
    normalised (norm 0 -> 0) and the angle is ``2 * atan2(|p - g|, |p + g|)``.

    Args:
        ignore_index: GT value of ignored pixels.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        self.ignore_index = ignore_index
        super().__init__()

    def _new_state(self) -> dict[str, torch.Tensor]:
        return {
            "sum_deg": torch.zeros((), dtype=torch.float64),
            "sum_sq_deg": torch.zeros((), dtype=torch.float64),
            "count": torch.zeros((), dtype=torch.int64),
            "below": torch.zeros(len(NORMALS_THRESHOLDS), dtype=torch.int64),
            "histogram": torch.zeros(180 * NORMALS_BINS_PER_DEGREE, dtype=torch.int64),
        }

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self._check(type(self).__name__, output, target, 3, 3)
        pred = _unit_or_zero(decode_normals_torch(output))
        target = target.to(pred.device)
        valid = (target != self.ignore_index).all(dim=1)
        gt = _unit_or_zero(target.float())
        deg = torch.rad2deg(2.0 * torch.atan2(torch.linalg.vector_norm(pred - gt, dim=1),
                                              torch.linalg.vector_norm(pred + gt, dim=1)))[valid]
        bins = (deg * NORMALS_BINS_PER_DEGREE).long().clamp(0, 180 * NORMALS_BINS_PER_DEGREE - 1)
        d64 = deg.double()
        self._add(
            sum_deg=d64.sum(), sum_sq_deg=(d64 * d64).sum(), count=torch.tensor(deg.numel()),
            below=torch.stack([(deg < t).sum() for t in NORMALS_THRESHOLDS]),
            histogram=torch.bincount(bins, minlength=180 * NORMALS_BINS_PER_DEGREE),
        )

    def _median(self) -> float:
        hist = self._state["histogram"]
        n = int(hist.sum())
        if n == 0:
            return float("nan")
        # the bins of the middle value(s) (1-based ranks; two of them for an even count, averaged like numpy)
        ranks = torch.tensor(sorted({(n + 1) // 2, n // 2 + 1}))
        bins = torch.searchsorted(hist.cumsum(0), ranks).to(torch.float64)
        return (float(bins.mean()) + 0.5) / NORMALS_BINS_PER_DEGREE

    def score(self) -> dict[str, Any]:
        s = self._state
        n = int(s["count"])
        out = {"mean": _ratio(s["sum_deg"], n), "median": self._median(), "rmse": math.sqrt(_ratio(s["sum_sq_deg"], n))}
        for t, below in zip(NORMALS_THRESHOLDS, s["below"].tolist()):
            out[f"{t:g}"] = _ratio(below * 100.0, n)
        return out


class DepthMeter(Meter):
    """Depth errors in metres over valid pixels (GT != 255, as upstream; the official pipeline has already turned
    GT 0 into 255).

    The prediction is the official decoding (clamped at 0); predictions **and GT values** <= 0 become 1e-9 before
    the logs and ratios (upstream's quirk: a GT 0 that was not turned into 255 counts, with depth 1e-9).
    ``rmse = sqrt(sum (g - p)^2 / n)``, ``log_rmse = sqrt(sum (ln g - ln p)^2 / n)``,
    ``abs_rel = sum |g - p| / g / n``, ``sq_rel = sum (g - p)^2 / g / n``, n = valid pixels of the split.

    Args:
        ignore_index: GT value of ignored pixels.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        self.ignore_index = ignore_index
        super().__init__()

    def _new_state(self) -> dict[str, torch.Tensor]:
        z = lambda: torch.zeros((), dtype=torch.float64)  # noqa: E731
        return {"sq": z(), "log_sq": z(), "abs_rel": z(), "sq_rel": z(), "count": torch.zeros((), dtype=torch.int64)}

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self._check(type(self).__name__, output, target, 1, 1)
        pred = decode_depth_torch(output)
        gt = target[:, 0].to(pred.device).float()
        valid = gt != self.ignore_index
        g, p = gt[valid], pred[valid]
        g = torch.where(g <= 0, torch.full_like(g, DEPTH_MIN), g)
        p = torch.where(p <= 0, torch.full_like(p, DEPTH_MIN), p)
        diff2 = (g - p) ** 2  # float32 per pixel, as upstream; sums in float64
        self._add(
            sq=diff2.double().sum(), log_sq=((torch.log(g) - torch.log(p)) ** 2).double().sum(),
            abs_rel=((g - p).abs() / g).double().sum(), sq_rel=(diff2 / g).double().sum(),
            count=torch.tensor(g.numel()),
        )

    def score(self) -> dict[str, Any]:
        s = self._state
        n = int(s["count"])
        return {
            "rmse": math.sqrt(_ratio(s["sq"], n)), "log_rmse": math.sqrt(_ratio(s["log_sq"], n)),
            "abs_rel": _ratio(s["abs_rel"], n), "sq_rel": _ratio(s["sq_rel"], n),
        }


class EdgeMeter(Meter):
    """Upstream's in-code boundary "loss", for reference only (odsF is computed offline from saved PNGs).

    It feeds the *probabilities* ``sigmoid(x)`` as logits into the training loss
    (:class:`~invpt.train.losses.BalancedBCEWithLogits`, pos_weight ``p``) and averages over the valid pixels of the
    split: each batch's mean weighted by its number of valid pixels, as upstream (computed in float64 here).

    Args:
        pos_weight: ``p`` = ``edge_w`` (0.95).
        ignore_index: GT value of ignored pixels.
    """

    def __init__(self, pos_weight: float = EDGE_POS_WEIGHT, ignore_index: int = IGNORE_INDEX) -> None:
        self.loss = BalancedBCEWithLogits(pos_weight, ignore_index)
        self.ignore_index = ignore_index
        super().__init__()

    def _new_state(self) -> dict[str, torch.Tensor]:
        return {"loss_sum": torch.zeros((), dtype=torch.float64), "count": torch.zeros((), dtype=torch.int64)}

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self._check(type(self).__name__, output, target, 1, 1)
        prob = decode_boundary_torch(output)[:, None].double()
        target = target.to(prob.device).double()
        n_valid = int((target != self.ignore_index).sum())
        self._add(loss_sum=self.loss(prob, target) * n_valid, count=torch.tensor(n_valid))

    def score(self) -> dict[str, Any]:
        return {"loss": _ratio(self._state["loss_sum"], int(self._state["count"]))}


def meter_for_task(task: TaskSpec, *, edge_w: float = EDGE_POS_WEIGHT, ignore_index: int = IGNORE_INDEX) -> Meter:
    """The official meter for one task."""
    if task.kind == "label":
        return SegmentationMeter(task.channels, ignore_index)
    if task.kind == "saliency":
        return SaliencyMeter(ignore_index)
    if task.kind == "normals":
        return NormalsMeter(ignore_index)
    if task.kind == "depth":
        return DepthMeter(ignore_index)
    if task.kind == "boundary":
        return EdgeMeter(edge_w, ignore_index)
    raise ConfigError(f"no metric for task '{task.name}' of kind '{task.kind}'.")


# ---- prediction files ------------------------------------------------------------------------------------------
def prediction_image(task: TaskSpec, raw: torch.Tensor) -> np.ndarray:
    """One image's official prediction file content from its raw output ``[C,H,W]``.

    uint8 maps are made as upstream's writer makes them (``astype(uint8)`` on the float map: truncation, not
    rounding): label ids ``[H,W]``; saliency / boundary ``255 * p``; normals ``(n + 1) * 255 / 2`` as ``[H,W,3]``
    RGB (x, y, z). Depth is float32 metres ``[H,W]`` (clamped at 0).
    """
    x = raw[None]
    if task.kind == "label":
        return decode_labels_torch(x)[0].cpu().numpy().astype(np.uint8 if task.channels <= 256 else np.int64)
    if task.kind == "saliency":
        m = torch.softmax(x.float(), dim=1)[0, 1] * 255.0
    elif task.kind == "boundary":
        m = _boundary_255(x.float()[0, 0])
    elif task.kind == "normals":
        m = ((F.normalize(x.float(), p=2, dim=1, eps=NORMALIZE_EPS) + 1.0) * 255.0 / 2.0)[0].permute(1, 2, 0)
    elif task.kind == "depth":
        return decode_depth_torch(x)[0].cpu().numpy().astype(np.float32)
    else:
        raise ConfigError(f"no prediction file format for task '{task.name}' of kind '{task.kind}'.")
    return m.clamp(0.0, 255.0).cpu().numpy().astype(np.uint8)


def _meta_list(meta: Any, batch: int) -> list[dict[str, Any]]:
    """``meta`` as a list of per-image dicts; a default-collated dict of lists / tensors is accepted too."""
    if isinstance(meta, Mapping):
        def item(v: Any, i: int) -> Any:
            if isinstance(v, torch.Tensor):
                return v[i].tolist() if v.dim() > 1 else v[i].item()
            if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(e, torch.Tensor) for e in v):
                return (int(v[0][i]), int(v[1][i]))  # default_collate of (h, w) tuples: [tensor(h...), tensor(w...)]
            return v[i]
        meta = [{k: item(v, i) for k, v in meta.items()} for i in range(batch)]
    meta = list(meta)
    if len(meta) != batch:
        raise ValueError(f"meta has {len(meta)} entries for a batch of {batch} images; give one dict per image.")
    return meta


def _safe_id(image_id: Any) -> str:
    text = str(image_id)
    p = Path(text)
    if not text or p.is_absolute() or ".." in p.parts:
        raise InputError(
            f"image id '{text}' cannot name a prediction file inside save_dir (empty, absolute or with '..'); "
            "use the dataset's ids."
        )
    return text


# ---- the multi-task evaluator ------------------------------------------------------------------------------------
class MultiTaskEvaluator:
    """Official metrics of every task of a config, accumulated over a split (see the module docstring).

    Args:
        tasks: the tasks to evaluate, in order.
        edge_w: the boundary meter's positive weight (0.95).
        ignore_index: GT value of ignored pixels (255).
        save_dir: when given, ``update`` also writes each image's prediction of ``save_tasks`` to
            ``save_dir/<task>/<id>.png`` (depth: ``.npy``), cropped back to the original size, atomically. Boundary
            PNGs are what ``prismformore/Boundary-Detection-Evaluation-Tools`` reads for odsF.
        save_tasks: task names to save, or ``"all"``; default: the boundary task(s) only (the official behaviour).
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        *,
        edge_w: float = EDGE_POS_WEIGHT,
        ignore_index: int = IGNORE_INDEX,
        save_dir: Optional[Union[str, os.PathLike]] = None,
        save_tasks: Optional[Union[str, Iterable[str]]] = None,
    ) -> None:
        self.tasks: dict[str, TaskSpec] = {t.name: t for t in tasks}
        self.ignore_index = ignore_index
        self.meters: dict[str, Meter] = {
            n: meter_for_task(t, edge_w=edge_w, ignore_index=ignore_index) for n, t in self.tasks.items()
        }
        self.save_dir = Path(save_dir) if save_dir is not None else None
        if save_tasks is None:
            chosen = [n for n, t in self.tasks.items() if t.kind == "boundary"]
        elif isinstance(save_tasks, str) and save_tasks == "all":
            chosen = list(self.tasks)
        else:
            chosen = [save_tasks] if isinstance(save_tasks, str) else list(save_tasks)
            unknown = [t for t in chosen if t not in self.tasks]
            if unknown:
                raise ConfigError(f"save_tasks {unknown} are not evaluated tasks ({list(self.tasks)}).")
        self.save_tasks: tuple[str, ...] = tuple(n for n in self.tasks if n in chosen) if self.save_dir else ()
        if self.save_dir is not None and self.save_dir.exists() and not self.save_dir.is_dir():
            raise InputError(f"save_dir '{self.save_dir}' exists and is not a folder; choose a folder for predictions.")

    # ---- accumulation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, outputs: Mapping[str, Any], targets: Mapping[str, Any],
               meta: Optional[Union[Sequence[Mapping[str, Any]], Mapping[str, Any]]] = None) -> None:
        """Add one batch. ``outputs``: task -> raw ``[B,C,H,W]`` at label resolution (``inter_preds`` ignored);
        ``targets``: task -> label ``[B,c,H,W]``; ``meta`` (needed when predictions are saved): one dict per image
        with ``id``, ``size`` (original h, w) and ``pad`` (top, left offsets of the image inside the output)."""
        missing = [t for t in self.tasks if t not in outputs or t not in targets]
        if missing:
            raise ConfigError(
                f"evaluator for tasks {list(self.tasks)}: task(s) {missing} missing from the outputs or the targets; "
                "build the evaluator and the model from the same config."
            )
        outs = {t: torch.as_tensor(outputs[t]) for t in self.tasks}
        tgts = {t: torch.as_tensor(targets[t]) for t in self.tasks}
        for t, meter in self.meters.items():
            meter.update(outs[t], tgts[t])
        if self.save_tasks:
            if meta is None:
                raise ValueError(
                    f"save_dir is set, so update() needs meta (id, size, pad per image) to name and crop the "
                    f"{', '.join(self.save_tasks)} predictions."
                )
            self._save(outs, tgts, _meta_list(meta, outs[self.save_tasks[0]].shape[0]))

    def _save(self, outs: Mapping[str, torch.Tensor], tgts: Mapping[str, torch.Tensor],
              meta: list[dict[str, Any]]) -> None:
        from invpt.atomic import write_atomic
        from invpt.data.visualize import save_png

        assert self.save_dir is not None
        for j, m in enumerate(meta):
            image_id = _safe_id(m["id"])
            h, w = (int(v) for v in m["size"])
            top, left = (int(v) for v in m.get("pad", (0, 0)))
            for name in self.save_tasks:
                if bool((tgts[name][j] == self.ignore_index).all()):
                    continue  # upstream skips images whose label of this task is entirely ignored
                raw = outs[name][j]
                if top < 0 or left < 0 or top + h > raw.shape[-2] or left + w > raw.shape[-1]:
                    raise ValueError(
                        f"meta of image '{image_id}': size {(h, w)} at pad {(top, left)} does not fit in the "
                        f"{tuple(raw.shape[-2:])} output."
                    )
                img = prediction_image(self.tasks[name], raw[:, top:top + h, left:left + w])
                if self.tasks[name].kind == "depth":
                    path = self.save_dir / name / f"{image_id}.npy"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_atomic(path, lambda f, a=img: np.save(f, a), "Depth prediction")
                else:
                    save_png(self.save_dir / name / f"{image_id}.png", img)

    # ---- results --------------------------------------------------------------------------------------------------
    def score(self) -> dict[str, dict[str, Any]]:
        """``{task: {metric: value}}`` over everything accumulated (see the module docstring for names and scales)."""
        return {t: m.score() for t, m in self.meters.items()}

    def primary(self) -> dict[str, float]:
        """The headline metric of each task (:data:`PRIMARY_METRICS`): ``{task: value}``."""
        scores = self.score()
        return {t: scores[t][PRIMARY_METRICS[spec.kind][0]] for t, spec in self.tasks.items()}

    def reset(self) -> None:
        for m in self.meters.values():
            m.reset()

    # ---- state, merging and distributed reduction -------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``{"<task>.<accumulator>": tensor}`` (plain tensors: ``torch.save`` / ``weights_only`` friendly)."""
        return {f"{t}.{k}": v for t, m in self.meters.items() for k, v in m.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        prefixes = {k.split(".", 1)[0] for k in state}
        if prefixes != set(self.meters):
            raise ValueError(f"state holds tasks {sorted(prefixes)}, this evaluator {sorted(self.meters)}.")
        for t, m in self.meters.items():
            m.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == t})

    def merge(self, other: "MultiTaskEvaluator") -> "MultiTaskEvaluator":
        """Add ``other``'s accumulators (an evaluator of the same tasks) to this one; returns ``self``."""
        if list(other.meters) != list(self.meters):
            raise ValueError(
                f"cannot merge an evaluator of tasks {list(other.meters)} into one of {list(self.meters)}."
            )
        for t, m in self.meters.items():
            m.merge(other.meters[t])
        return self

    def all_reduce(self, group: Any = None) -> "MultiTaskEvaluator":
        """Sum the accumulators over the ranks of ``group`` (every rank must call it); a no-op without an
        initialised ``torch.distributed``. Afterwards every rank's :meth:`score` is the score over all ranks'
        images. NCCL groups reduce on the current CUDA device, others on the CPU. Returns ``self``."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        state = self.state_dict()
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        reduced: dict[str, torch.Tensor] = {}
        for dtype in (torch.int64, torch.float64):
            keys = [k for k, v in state.items() if v.dtype == dtype]
            if not keys:
                continue
            flat = torch.cat([state[k].reshape(-1) for k in keys]).to(device)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            flat = flat.cpu()
            offset = 0
            for k in keys:
                n = state[k].numel()
                reduced[k] = flat[offset:offset + n].reshape(state[k].shape)
                offset += n
        self.load_state_dict(reduced)
        return self

    reduce = all_reduce

    def __repr__(self) -> str:
        return (f"MultiTaskEvaluator(tasks={list(self.tasks)}, save_dir={self.save_dir}, "
                f"save_tasks={list(self.save_tasks)})")


def build_evaluator(
    config,
    save_dir: Optional[Union[str, os.PathLike]] = None,
    *,
    save_tasks: Optional[Union[str, Iterable[str]]] = None,
    edge_w: float = EDGE_POS_WEIGHT,
    ignore_index: int = IGNORE_INDEX,
) -> MultiTaskEvaluator:
    """The official evaluator for a config's tasks.

    Args:
        config: preset name, YAML path, dict or :class:`~invpt.config.InvPTConfig` (as
            :func:`invpt.config.load_config` takes).
        save_dir: also write prediction files there (boundary PNGs for the offline odsF by default).
        save_tasks: which tasks' predictions to write (names or ``"all"``); default the boundary task.
        edge_w: positive weight of the boundary meter (official 0.95).
        ignore_index: label value of ignored pixels (official 255).
    """
    from invpt.config import load_config

    cfg = load_config(config)
    return MultiTaskEvaluator(cfg.task_specs, edge_w=edge_w, ignore_index=ignore_index, save_dir=save_dir,
                              save_tasks=save_tasks)
