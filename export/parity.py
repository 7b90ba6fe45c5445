"""Per-task numerical parity between a reference (PyTorch FP32) and a test backend (ONNX Runtime, TensorRT).

Shared by export verification, the calib stage's precision checks, and the runtime's parity reports.
Metrics per task:

* ``max_abs``, ``mean_abs``: absolute error;
* ``rel_err``: ``max_abs / max|ref|`` (scale-relative max error; stable where ref is near 0);
* ``rel_l2``: ``||test - ref|| / ||ref||``;
* ``cosine``: cosine similarity of the flattened maps;
* ``agreement``: fraction of pixels whose decoded decision agrees (argmax for label and saliency
  tasks, the sign of the logit for boundaries); None for regression tasks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from invpt.tasks import TaskSpec

DECISION_KINDS = ("label", "saliency", "boundary")


@dataclass(frozen=True)
class Tolerance:
    """Pass thresholds for one precision. A task passes when every stated bound holds."""

    max_rel_err: float
    min_cosine: float
    min_agreement: float

    def to_dict(self) -> dict:
        return asdict(self)


# FP32 ONNX Runtime vs PyTorch differ only by float rounding and kernel order.
FP32_TOLERANCE = Tolerance(max_rel_err=1e-4, min_cosine=0.99999, min_agreement=0.999)


@dataclass
class TaskParity:
    task: str
    max_abs: float
    mean_abs: float
    rel_err: float
    rel_l2: float
    cosine: float
    agreement: Optional[float]
    passed: bool
    failures: list[str] = field(default_factory=list)


@dataclass
class ParityReport:
    """Per-task parity plus the overall verdict; truthy when every task passed."""

    tasks: dict[str, TaskParity]
    tolerance: Tolerance
    samples: int
    reference: str = "pytorch-fp32"
    backend: str = "onnxruntime-cpu"

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.tasks.values())

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "reference": self.reference,
            "backend": self.backend,
            "samples": self.samples,
            "tolerance": self.tolerance.to_dict(),
            "tasks": {k: asdict(v) for k, v in self.tasks.items()},
        }

    def markdown(self) -> str:
        """A Markdown table, one row per task, with a status column."""
        rows = [
            "| task | status | max abs | mean abs | rel err | cosine | agreement |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in self.tasks.values():
            agree = "-" if t.agreement is None else f"{t.agreement:.5f}"
            rows.append(
                f"| {t.task} | {'PASS' if t.passed else 'FAIL'} | {t.max_abs:.3g} | {t.mean_abs:.3g} | {t.rel_err:.3g} "
                f"| {t.cosine:.7f} | {agree} |"
            )
        tol = self.tolerance
        rows.append(
            f"\n{self.backend} vs {self.reference} on {self.samples} sample(s). Pass: rel err <= {tol.max_rel_err:g}, "
            f"cosine >= {tol.min_cosine:g}, agreement >= {tol.min_agreement:g}."
        )
        return "\n".join(rows)


def decisions(task: TaskSpec, raw: np.ndarray) -> Optional[np.ndarray]:
    """Per-pixel discrete decision of a raw [B, C, H, W] output, or None for regression tasks."""
    if task.kind in ("label", "saliency"):
        return raw.argmax(axis=1)
    if task.kind == "boundary":
        return raw[:, 0] > 0
    return None


def compare_task(task: TaskSpec, ref: np.ndarray, test: np.ndarray, tol: Tolerance) -> TaskParity:
    """Parity metrics of one task's raw outputs (same shape, any batch)."""
    if ref.shape != test.shape:
        return TaskParity(task.name, np.inf, np.inf, np.inf, np.inf, 0.0, None, False,
                          [f"shape {test.shape} != reference {ref.shape}"])
    ref64 = ref.astype(np.float64)
    diff = np.abs(test.astype(np.float64) - ref64)
    finite = bool(np.isfinite(test).all())
    max_abs = float(diff.max()) if finite else float("inf")
    scale = float(np.abs(ref64).max()) or 1.0
    norm_ref = float(np.linalg.norm(ref64)) or 1.0
    a, b = ref64.ravel(), test.astype(np.float64).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(a @ b / denom) if denom > 0 and finite else (1.0 if np.array_equal(a, b) else 0.0)
    d_ref, d_test = decisions(task, ref), decisions(task, test)
    agreement = None if d_ref is None else float((d_ref == d_test).mean())
    res = TaskParity(
        task=task.name,
        max_abs=max_abs,
        mean_abs=float(diff.mean()) if finite else float("inf"),
        rel_err=max_abs / scale,
        rel_l2=float(np.linalg.norm(diff)) / norm_ref if finite else float("inf"),
        cosine=cosine,
        agreement=agreement,
        passed=True,
    )
    if not finite:
        res.failures.append("non-finite values in output")
    if res.rel_err > tol.max_rel_err:
        res.failures.append(f"rel err {res.rel_err:.3g} > {tol.max_rel_err:g}")
    if res.cosine < tol.min_cosine:
        res.failures.append(f"cosine {res.cosine:.7f} < {tol.min_cosine:g}")
    if agreement is not None and agreement < tol.min_agreement:
        res.failures.append(f"agreement {agreement:.5f} < {tol.min_agreement:g}")
    res.passed = not res.failures
    return res


def compare_outputs(
    ref: Mapping[str, np.ndarray],
    test: Mapping[str, np.ndarray],
    task_specs: Sequence[TaskSpec],
    tol: Tolerance = FP32_TOLERANCE,
    reference: str = "pytorch-fp32",
    backend: str = "onnxruntime-cpu",
) -> ParityReport:
    """Compare every task of ``task_specs`` present in ``ref``; a task missing from ``test`` fails."""
    out = {}
    samples = 0
    for spec in task_specs:
        if spec.name not in ref:
            continue
        samples = int(ref[spec.name].shape[0])
        if spec.name not in test:
            out[spec.name] = TaskParity(spec.name, np.inf, np.inf, np.inf, np.inf, 0.0, None, False, ["missing output"])
            continue
        out[spec.name] = compare_task(spec, np.asarray(ref[spec.name]), np.asarray(test[spec.name]), tol)
    return ParityReport(out, tol, samples, reference, backend)
