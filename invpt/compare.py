"""Per-task comparison of a test backend's outputs with a reference's, and the tolerance of each precision.

Every stage compares outputs the same way: export verification (ONNX Runtime FP32 vs PyTorch), the calib stage's
precision checks (FP16/INT8 ONNX vs FP32), and the runtime's parity reports (TensorRT vs a reference), in the
spirit of Polygraphy's comparator. Two layers per task:

Numerical parity of the raw ``[B, C, H, W]`` maps (:class:`TaskParity`):

* ``max_abs``, ``mean_abs``, ``p99_abs``: absolute error (max, mean, 99th percentile, numpy's linear method);
* ``rel_err``: ``max_abs / max|ref|`` (scale-relative max error; stable where ref is near 0);
* ``rel_l2``: ``||test - ref|| / ||ref||``;
* ``cosine``: cosine similarity of the flattened maps;
* ``agreement``: fraction of pixels whose decision agrees (argmax for label and saliency tasks, the sign of the
  logit for boundaries); None for regression tasks.

A task passes when ``rel_err``, ``cosine`` and ``agreement`` are within the :class:`Tolerance` of the precision
(:data:`TOLERANCES`: one table, fp32 / fp16 / int8) and every value is finite.

Task-level agreement of the decoded predictions (:func:`task_agreement`, with :func:`invpt.data.decode.decode`)
against the reference's predictions, reported but not part of the verdict: pixel agreement and mIoU for label
tasks, agreement (and mIoU, mean probability difference) at 0.5 for saliency and boundaries, depth RMSE (m), normals
mean angular difference (degrees).

The result, :class:`ComparisonResult`, is truthy only when every task passed; ``to_dict()`` is what manifests record
under ``verification`` and ``markdown()`` the table the tools log.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import numpy as np

from invpt.errors import InputError
from invpt.tasks import TaskSpec

if TYPE_CHECKING:
    from invpt.runners import Runner


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

# The stated tolerance of each precision against the FP32 PyTorch reference (see README). One table for every stage:
# export verifies fp32, the calib stage fp16 and int8, the runtime uses the artifact's precision. Looked up at call
# time (tolerance_for), so a test may monkeypatch an entry.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": FP32_TOLERANCE,
    "fp16": Tolerance(max_rel_err=1e-2, min_cosine=0.9999, min_agreement=0.99),
    "int8": Tolerance(max_rel_err=0.15, min_cosine=0.99, min_agreement=0.90),
}


def tolerance_for(precision: str) -> Tolerance:
    """The stated tolerance of ``precision`` (fp32, fp16, int8); InputError for any other name."""
    try:
        return TOLERANCES[precision]
    except KeyError:
        raise InputError(f"No stated tolerance for precision '{precision}'; the precisions invpt checks are "
                         f"{', '.join(TOLERANCES)}.") from None


@dataclass
class TaskParity:
    """Numerical parity of one task's raw outputs, and why it failed (``failures``, empty when it passed)."""

    task: str
    max_abs: float
    mean_abs: float
    p99_abs: float
    rel_err: float
    rel_l2: float
    cosine: float
    agreement: Optional[float]
    passed: bool
    failures: list[str] = field(default_factory=list)

    @classmethod
    def failed(cls, task: str, reason: str) -> "TaskParity":
        """A task that could not be compared at all (missing output, wrong shape)."""
        inf = float("inf")
        return cls(task, inf, inf, inf, inf, inf, 0.0, None, False, [reason])


@dataclass
class ComparisonResult:
    """Per-task parity (and optionally task-level agreement) plus the overall verdict; truthy when every task passed."""

    tasks: dict[str, TaskParity]
    tolerance: Tolerance
    samples: int
    reference: str = "pytorch-fp32"
    backend: str = "onnxruntime-cpu"
    task_agreement: Optional[dict[str, dict[str, float]]] = None

    @property
    def passed(self) -> bool:
        """Every task passed (and at least one task was compared: an empty comparison proves nothing)."""
        return bool(self.tasks) and all(t.passed for t in self.tasks.values())

    def __bool__(self) -> bool:
        return self.passed

    @property
    def failures(self) -> dict[str, list[str]]:
        """``task -> reasons`` for every task that failed (empty when all passed)."""
        return {k: list(v.failures) for k, v in self.tasks.items() if not v.passed}

    def summary(self) -> str:
        """One line: PASS, or FAIL naming each failing task and why."""
        if not self.tasks:
            return f"FAIL: {self.backend} vs {self.reference}: no task was compared"
        if self.passed:
            return f"PASS: {self.backend} vs {self.reference}, {len(self.tasks)} task(s) on {self.samples} sample(s)"
        bad = "; ".join(f"{k}: {', '.join(v)}" for k, v in self.failures.items())
        return f"FAIL: {self.backend} vs {self.reference}: {bad}"

    def to_dict(self) -> dict:
        """What a manifest records under ``verification`` (``task_agreement`` only when it was computed)."""
        out = {
            "passed": self.passed,
            "reference": self.reference,
            "backend": self.backend,
            "samples": self.samples,
            "tolerance": self.tolerance.to_dict(),
            "tasks": {k: asdict(v) for k, v in self.tasks.items()},
        }
        if self.task_agreement is not None:
            out["task_agreement"] = {k: dict(v) for k, v in self.task_agreement.items()}
        return out

    def markdown(self) -> str:
        """A Markdown table, one row per task, with a status column; then the task-level table when computed."""
        rows = [
            "| task | status | max abs | mean abs | p99 abs | rel err | cosine | agreement |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in self.tasks.values():
            agree = "-" if t.agreement is None else f"{t.agreement:.5f}"
            rows.append(
                f"| {t.task} | {'PASS' if t.passed else 'FAIL'} | {t.max_abs:.3g} | {t.mean_abs:.3g} | {t.p99_abs:.3g} "
                f"| {t.rel_err:.3g} | {t.cosine:.7f} | {agree} |"
            )
        tol = self.tolerance
        rows.append(
            f"\n{self.backend} vs {self.reference} on {self.samples} sample(s). Pass: rel err <= {tol.max_rel_err:g}, "
            f"cosine >= {tol.min_cosine:g}, agreement >= {tol.min_agreement:g}."
        )
        text = "\n".join(rows)
        if self.task_agreement:
            text += "\n" + task_table(self.task_agreement)
        return text


# The name export and calib have always used; kept so existing code and pickles keep working.
ParityReport = ComparisonResult


# ----------------------------------------------------------------------------------------------- tensor metrics

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
        return TaskParity.failed(task.name, f"shape {test.shape} != reference {ref.shape}")
    ref64 = ref.astype(np.float64)
    test64 = test.astype(np.float64)
    diff = np.abs(test64 - ref64)
    finite = bool(np.isfinite(test).all())
    max_abs = float(diff.max()) if finite else float("inf")
    scale = float(np.abs(ref64).max()) or 1.0
    norm_ref = float(np.linalg.norm(ref64)) or 1.0
    a, b = ref64.ravel(), test64.ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(a @ b / denom) if denom > 0 and finite else (1.0 if np.array_equal(a, b) else 0.0)
    d_ref, d_test = decisions(task, ref), decisions(task, test)
    agreement = None if d_ref is None else float((d_ref == d_test).mean())
    res = TaskParity(
        task=task.name,
        max_abs=max_abs,
        mean_abs=float(diff.mean()) if finite else float("inf"),
        p99_abs=float(np.percentile(diff, 99)) if finite else float("inf"),
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


# ----------------------------------------------------------------------------------------------- task-level metrics

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
    from invpt.data.decode import decode

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


def task_table(task_metrics: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table of task-level agreement."""
    rows = ["| task | metric | value |", "|---|---|---|"]
    for task, metrics in task_metrics.items():
        for k, v in metrics.items():
            rows.append(f"| {task} | {k} | {v:.4f} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------- whole outputs

def compare_outputs(
    ref: Mapping[str, np.ndarray],
    test: Mapping[str, np.ndarray],
    task_specs: Sequence[TaskSpec],
    tol: Tolerance = FP32_TOLERANCE,
    reference: str = "pytorch-fp32",
    backend: str = "onnxruntime-cpu",
    *,
    task_level: bool = False,
) -> ComparisonResult:
    """Compare every task of ``task_specs`` present in ``ref``; a task missing from ``test`` fails.

    ``task_level`` also computes :func:`task_agreement` for each task whose test output has the reference's shape
    (recorded in ``result.task_agreement``; it does not change the verdict).
    """
    out = {}
    agreement: Optional[dict[str, dict[str, float]]] = {} if task_level else None
    samples = 0
    for spec in task_specs:
        if spec.name not in ref:
            continue
        samples = int(ref[spec.name].shape[0])
        if spec.name not in test:
            out[spec.name] = TaskParity.failed(spec.name, "missing output")
            continue
        r, t = np.asarray(ref[spec.name]), np.asarray(test[spec.name])
        out[spec.name] = compare_task(spec, r, t, tol)
        if agreement is not None and r.shape == t.shape:
            agreement[spec.name] = task_agreement(spec, r, t)
    return ComparisonResult(out, tol, samples, reference, backend, agreement)


def compare(
    ref: Mapping[str, np.ndarray],
    test: Mapping[str, np.ndarray],
    task_specs: Sequence[TaskSpec],
    precision: str = "fp32",
    reference: str = "pytorch-fp32",
    backend: str = "onnxruntime-cpu",
    *,
    tolerance: Optional[Tolerance] = None,
    task_level: bool = True,
) -> ComparisonResult:
    """:func:`compare_outputs` against the stated tolerance of ``precision`` (or ``tolerance``), with task-level
    agreement by default."""
    tol = tolerance if tolerance is not None else tolerance_for(precision)
    return compare_outputs(ref, test, task_specs, tol, reference, backend, task_level=task_level)


def collect_outputs(runner: "Runner", feeds: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """``runner``'s outputs for each ``[n, 3, H, W]`` array of ``feeds`` (each fed as one batch, or in the runner's
    static batch, the last chunk padded), concatenated per task. Activates the runner for the call if needed."""
    parts: list[dict[str, np.ndarray]] = []
    with runner.activated():
        for x in feeds:
            parts.append(runner.run_batches(x, runner.static_batch or len(x)))
    return {t: np.concatenate([p[t] for p in parts]) for t in parts[0]} if parts else {}


def compare_runners(
    reference: "Runner",
    test: "Runner",
    feeds: Sequence[np.ndarray],
    task_specs: Sequence[TaskSpec],
    tol: Tolerance = FP32_TOLERANCE,
    *,
    reference_name: Optional[str] = None,
    backend_name: Optional[str] = None,
    task_level: bool = False,
) -> ComparisonResult:
    """Run ``reference`` then ``test`` on the same ``feeds`` (one runner active at a time, so only one model is in
    memory) and compare every task of ``task_specs``. Labels default to the runners' names."""
    if not len(feeds):
        raise InputError("compare_runners needs at least one input array to compare the runners on.")
    ref = collect_outputs(reference, feeds)
    got = collect_outputs(test, feeds)
    return compare_outputs(ref, got, task_specs, tol, reference_name or reference.name, backend_name or test.name,
                           task_level=task_level)
