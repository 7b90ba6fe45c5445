"""How close a reduced-precision ONNX stays to FP32 PyTorch, per task, on held-out samples.

The metrics, the tolerance table and the runners live in the core (:mod:`invpt.compare`, :mod:`invpt.runners`);
this module keeps the calib stage's names for them. Two layers: the numerical parity (max/mean/p99 abs, rel err,
cosine, agreement) judged against the precision's stated tolerance, and task-level agreement of the decoded
predictions with PyTorch's predictions: mIoU and pixel agreement for label tasks, agreement for saliency and
boundaries, depth RMSE (m) and normals mean angular difference (degrees).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from invpt.compare import TOLERANCES, ComparisonResult, compare, miou, task_agreement, task_table
from invpt.errors import ExportError
from invpt.runners import OnnxRuntimeRunner, PyTorchRunner
from invpt.tasks import TaskSpec

_logger = logging.getLogger(__name__)

# The stated tolerances of every precision vs FP32 PyTorch (ONNX Runtime CPU; see README): the core's one table
# (the same dict object, so a change to an entry is seen everywhere). The calib stage uses fp16 and int8.
PRECISION_TOLERANCES = TOLERANCES
REDUCED_PRECISIONS = ("fp16", "int8")

REFERENCE_PYTORCH = "pytorch-fp32"
REFERENCE_ONNX_VERIFIED = "onnxruntime-fp32 (verified against PyTorch at export)"
REFERENCE_ONNX_UNVERIFIED = "onnxruntime-fp32 (NOT verified against PyTorch: exported with --no-verify)"

__all__ = [
    "PRECISION_TOLERANCES", "REDUCED_PRECISIONS", "evaluate", "miou", "reference_outputs", "run_onnx_batches",
    "task_agreement", "task_table",
]


def run_onnx_batches(path: str | Path, inputs: np.ndarray, tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """ONNX Runtime CPU outputs for ``inputs``, fed in chunks of the model's static batch (1 if dynamic).

    The last chunk of a static-batch model is padded by repeating its final sample; padding is dropped.
    The session lives only for this call.
    """
    return OnnxRuntimeRunner(path, tasks=tasks, error_cls=ExportError).run_batches(inputs)


def reference_outputs(inputs: np.ndarray, tasks: Sequence[str], model=None, fp32_onnx: Optional[Path] = None,
                      *, onnx_verified: bool = True) -> tuple[dict, str]:
    """FP32 reference: the PyTorch model when given (one sample at a time), else the FP32 ONNX in ONNX Runtime.

    The returned label says which; ``onnx_verified`` says whether that ONNX was verified against PyTorch at export.
    """
    if model is not None:
        runner = PyTorchRunner(model, tasks, name=REFERENCE_PYTORCH)
    else:
        runner = OnnxRuntimeRunner(fp32_onnx, tasks=tasks, error_cls=ExportError,
                                   name=REFERENCE_ONNX_VERIFIED if onnx_verified else REFERENCE_ONNX_UNVERIFIED)
    return runner.run_batches(inputs, 1 if model is not None else None), runner.name


def evaluate(specs: Sequence[TaskSpec], ref: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray], precision: str,
             reference: str, backend: str) -> tuple[ComparisonResult, dict[str, dict[str, float]]]:
    """Numerical parity (against the precision's stated tolerance) plus task-level agreement per task."""
    result = compare(ref, test, specs, precision, reference, backend, tolerance=PRECISION_TOLERANCES[precision],
                     task_level=True)
    return result, dict(result.task_agreement or {})
