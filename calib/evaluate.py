"""How close a reduced-precision ONNX stays to FP32 PyTorch, per task, on held-out samples.

Two layers: the numerical parity of :mod:`invpt.export.parity` (max/mean abs, rel err, cosine,
agreement), and task-level agreement of the decoded predictions with PyTorch's predictions:
mIoU and pixel agreement for label tasks, agreement for saliency and boundaries, depth RMSE (m) and
normals mean angular difference (degrees).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from invpt.data.decode import decode
from invpt.export.ort import ort_session, run_session
from invpt.export.parity import ParityReport, Tolerance, compare_outputs
from invpt.tasks import TaskSpec

_logger = logging.getLogger(__name__)

# Stated tolerances of reduced-precision artifacts vs FP32 PyTorch (ONNX Runtime CPU; see README).
PRECISION_TOLERANCES = {
    "fp16": Tolerance(max_rel_err=1e-2, min_cosine=0.9999, min_agreement=0.99),
    "int8": Tolerance(max_rel_err=0.15, min_cosine=0.99, min_agreement=0.90),
}


def miou(a: np.ndarray, b: np.ndarray, num_classes: int) -> float:
    """Mean IoU of label map ``b`` against ``a`` over the classes present in either."""
    ious = []
    for c in range(num_classes):
        inter = np.logical_and(a == c, b == c).sum()
        union = np.logical_or(a == c, b == c).sum()
        if union:
            ious.append(inter / union)
    return float(np.mean(ious)) if ious else 1.0


def task_agreement(spec: TaskSpec, ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Task-level agreement of decoded predictions (raw [B, C, H, W] in, metrics out)."""
    r, t = decode(spec, ref), decode(spec, test)
    if spec.kind == "label":
        return {"pixel_agreement": float((r == t).mean()), "miou_vs_reference": miou(r, t, spec.channels)}
    if spec.kind in ("saliency", "boundary"):
        rb, tb = r > 0.5, t > 0.5
        return {"pixel_agreement": float((rb == tb).mean()), "miou_vs_reference": miou(rb, tb, 2),
                "mean_abs_probability": float(np.abs(r - t).mean())}
    if spec.kind == "normals":
        cos = np.clip((r * t).sum(axis=-3), -1.0, 1.0)
        return {"mean_angle_deg": float(np.degrees(np.arccos(cos)).mean())}
    if spec.kind == "depth":
        return {"rmse_m": float(np.sqrt(np.mean((r - t) ** 2)))}
    return {}


def run_onnx_batches(path: str | Path, inputs: np.ndarray, tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """ONNX Runtime CPU outputs for ``inputs``, fed in chunks of the model's static batch (1 if dynamic).

    The last chunk of a static-batch model is padded by repeating its final sample; padding is dropped.
    """
    sess = ort_session(path)
    dim0 = sess.get_inputs()[0].shape[0]
    step = dim0 if isinstance(dim0, int) and dim0 > 0 else 1
    outs: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
    for i in range(0, len(inputs), step):
        chunk = inputs[i:i + step]
        n = len(chunk)
        if n < step:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - n, axis=0)])
        res = run_session(sess, {"image": chunk}, tasks)
        for t in tasks:
            outs[t].append(res[t][:n])
    return {t: np.concatenate(v) for t, v in outs.items()}


def reference_outputs(inputs: np.ndarray, tasks: Sequence[str], model=None, fp32_onnx: Optional[Path] = None) -> tuple[dict, str]:
    """FP32 reference: the PyTorch model when given, else the (export-verified) FP32 ONNX in ONNX Runtime."""
    if model is not None:
        import torch

        with torch.no_grad():
            outs = [model(torch.from_numpy(inputs[i:i + 1]), tasks=tasks) for i in range(len(inputs))]
        return {t: np.concatenate([o[t].numpy() for o in outs]) for t in tasks}, "pytorch-fp32"
    return run_onnx_batches(fp32_onnx, inputs, tasks), "onnxruntime-fp32 (verified against PyTorch at export)"


def evaluate(specs: Sequence[TaskSpec], ref: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray], precision: str,
             reference: str, backend: str) -> tuple[ParityReport, dict[str, dict[str, float]]]:
    """Numerical parity (against the precision's stated tolerance) plus task-level agreement per task."""
    parity = compare_outputs(ref, test, specs, PRECISION_TOLERANCES[precision], reference, backend)
    tasks = {s.name: task_agreement(s, np.asarray(ref[s.name]), np.asarray(test[s.name])) for s in specs if s.name in ref}
    return parity, tasks


def task_table(task_metrics: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table of task-level agreement."""
    rows = ["| task | metric | value |", "|---|---|---|"]
    for task, metrics in task_metrics.items():
        for k, v in metrics.items():
            rows.append(f"| {task} | {k} | {v:.4f} |")
    return "\n".join(rows)
