"""Preflight memory estimate: refuse at once a stage the machine clearly cannot hold, instead of being killed later.

Before export or quantization does any heavy work, the stage estimates its peak resident memory from the model size
and the options (coefficients measured on ViT-L and the tiny model, see ``bench/README.md``), compares it with the
memory the kernel says is available now (``MemAvailable`` in ``/proc/meminfo``) and, when the estimate exceeds it,
stops with exit 2: the figure, what is available, and the option that fits (node-by-node calibration, fewer samples
per step, no verification...). Where the estimate is close to the limit it only warns. ``INVPT_SKIP_MEMORY_CHECK=1``
turns the refusal into a warning (for a machine whose free memory the kernel under-reports, e.g. with large
reclaimable caches it does not count). Where ``/proc/meminfo`` cannot be read (not Linux) nothing is checked.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from invpt.errors import InvptError

_logger = logging.getLogger(__name__)

GiB = 2**30
SKIP_ENV = "INVPT_SKIP_MEMORY_CHECK"
WARN_FRACTION = 0.85  # warn when the estimate is above this share of the available memory

# Coefficients fitted to single ViT-L runs on the 2-core 24 GB machine (bench/README.md, 2026-11-25) and the tiny model.
# Fixed cost of a Python process with torch, onnx, onnxscript and onnxruntime imported (tiny export: 1.1 GiB peak).
BASE_BYTES = int(1.0 * GiB)
# Export, per byte of FP32 weights (ViT-L: 1.69 GB). Each is the peak of one phase above the process; phases run one
# after another (PyTorch is freed before ONNX Runtime opens), so the stage's peak is the largest, not the sum.
EXPORT_PER_WEIGHT = 2.4           # torch.onnx dynamo export + optimizer + saving (ViT-L: 4.6 GiB in the step)
EXPORT_VERIFY_PER_WEIGHT = 3.3    # ONNX Runtime session of the graph (ViT-L: 5.6 GiB in the step, 6.2 peak)
EXPORT_SIMPLIFY_PER_WEIGHT = 5.5  # onnxslim (opt-in) copies the graph several times (ViT-L: ~16 GiB before)
# Quantize, per byte of the FP32 ONNX (ViT-L: 1.67 GB).
QUANTIZE_REFERENCE_PER_MODEL = 2.2  # FP32 PyTorch reference on the held-out images, released before conversion
FP16_PER_MODEL = 5.2              # range pass, then AutoCast's model + its converter's copy (ViT-L: 8.9 GiB peak)
INT8_PER_NODE_PER_MODEL = 12.0    # ModelOpt node by node (ViT-L: 19.7 GiB measured with the reference)
INT8_WHOLE_GRAPH_PER_MODEL = 7.0  # ModelOpt whole graph: its copies of the model, the augmented session
# Whole graph keeps one step's calibrated tensors (session outputs) at a time: this share of the sum of one sample's
# intermediate tensors (activation_bytes; ModelOpt exposes only the inputs of quantized nodes) per sample in the step.
# Fitted to ViT-L (model 1.55 GiB, activation_bytes 12.9 GiB): batch 1 a step 16.4 GiB (max, 32 steps: flat across
# the steps) and 17.1 GiB (entropy, 4 steps); batch 2 in one step 20.9 GiB.
INT8_WHOLE_GRAPH_PER_ACTIVATION = 0.35
# Whole-graph calibration: bytes of one step's intermediate tensors (sets the samples per step, at least one).
WHOLE_GRAPH_STEP_BYTES = 2 * GiB
MAX_STEP_BATCH = 16


class InsufficientMemoryError(InvptError):
    """A stage's estimated peak memory is more than the machine has available (exit 2, before any heavy work)."""


@dataclass
class MemoryEstimate:
    """The estimated peak of one stage, its parts, and cheaper alternatives (advice, their estimated peak)."""

    stage: str
    peak_bytes: int
    parts: dict[str, int] = field(default_factory=dict)
    alternatives: list[tuple[str, int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "peak_bytes": self.peak_bytes, "parts": dict(self.parts),
                "alternatives": [{"option": a, "peak_bytes": b} for a, b in self.alternatives]}


def mem_available_bytes(meminfo: str | os.PathLike = "/proc/meminfo") -> Optional[int]:
    """``MemAvailable`` from /proc/meminfo in bytes (what can be allocated without swapping), or None if unknown."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``), between heavy phases.

    glibc keeps freed blocks of up to 32 MB in its heap (its mmap threshold rises as large blocks are freed), so a
    phase's tensors stay in the process's resident memory after they are freed and add to the next phase's peak.
    Elsewhere than glibc this only collects garbage.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def estimate_export(weight_bytes: int, *, verify: bool = True, simplify: bool = False) -> MemoryEstimate:
    """Peak of ``invpt-export`` for a model with ``weight_bytes`` of FP32 weights."""
    parts = {"process": BASE_BYTES, "export": int(EXPORT_PER_WEIGHT * weight_bytes)}
    if verify:
        parts["verification"] = int(EXPORT_VERIFY_PER_WEIGHT * weight_bytes)
    if simplify:
        parts["onnxslim"] = int(EXPORT_SIMPLIFY_PER_WEIGHT * weight_bytes)
    # The phases run one after another: the peak is the largest phase on top of the process, not their sum.
    peak = parts["process"] + max(v for k, v in parts.items() if k != "process")
    alternatives = []
    if simplify:
        alternatives.append(("leave out --simplify", estimate_export(weight_bytes, verify=verify).peak_bytes))
    if verify:
        alt = estimate_export(weight_bytes, verify=False, simplify=False).peak_bytes
        if alt < peak:
            alternatives.append(("--no-verify (the manifest then records that it was not verified)", alt))
    return MemoryEstimate("invpt-export", peak, parts, alternatives)


def activation_bytes(onnx_path: str | os.PathLike, batch: int = 1) -> int:
    """Sum of the sizes of every intermediate tensor of one forward pass at ``batch`` (ONNX shape inference on the
    graph only; symbolic dims taken as ``batch``, tensors of unknown shape not counted)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    for init in proto.graph.initializer:  # shapes only: drop inline weights before inference copies the graph
        init.ClearField("raw_data")
        del init.float_data[:]
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception as err:  # the estimate is advice; a graph shape inference cannot follow is still checked later
        _logger.debug("shape inference failed for the memory estimate (%s)", err)
        return 0
    total = 0
    for vi in proto.graph.value_info:
        tt = vi.type.tensor_type
        if not tt.HasField("shape") or not tt.elem_type:
            continue
        n = 1
        for d in tt.shape.dim:
            n *= d.dim_value if d.HasField("dim_value") else batch
        try:
            item = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize
        except Exception:
            item = 4
        total += n * item
    return total


def step_batch(sample_activation_bytes: int, budget: int = WHOLE_GRAPH_STEP_BYTES,
               max_batch: int = MAX_STEP_BATCH) -> int:
    """Samples per whole-graph calibration step whose intermediate tensors fit in ``budget`` (1 to ``max_batch``)."""
    if sample_activation_bytes <= 0:
        return 1
    return int(max(1, min(max_batch, budget // sample_activation_bytes)))


def estimate_quantize(model_bytes: int, precision: str, *, verify: bool = True, per_node: bool = True,
                      calib_samples: int = 32, sample_activation_bytes: int = 0, method: str = "entropy",
                      samples_per_step: Optional[int] = None, _alternatives: bool = True) -> MemoryEstimate:
    """Peak of ``invpt-quantize`` for an FP32 ONNX of ``model_bytes``.

    ``sample_activation_bytes`` (see :func:`activation_bytes`, batch 1) sizes whole-graph INT8 calibration, whose
    memory follows the samples per step (default :func:`step_batch`), not the number of samples.
    """
    parts = {"process": BASE_BYTES}
    if verify:
        parts["reference"] = int(QUANTIZE_REFERENCE_PER_MODEL * model_bytes)
    if precision == "fp16":
        parts["convert"] = int(FP16_PER_MODEL * model_bytes)
    elif per_node:
        parts["calibrate"] = int(INT8_PER_NODE_PER_MODEL * model_bytes)
    else:
        batch = samples_per_step or step_batch(sample_activation_bytes)
        parts["calibrate"] = int(INT8_WHOLE_GRAPH_PER_MODEL * model_bytes
                                 + INT8_WHOLE_GRAPH_PER_ACTIVATION * batch * sample_activation_bytes)
    peak = parts["process"] + max(v for k, v in parts.items() if k != "process")
    alternatives: list[tuple[str, int]] = []
    if precision == "int8" and _alternatives:
        other = estimate_quantize(model_bytes, precision, verify=verify, per_node=not per_node,
                                  calib_samples=calib_samples, sample_activation_bytes=sample_activation_bytes,
                                  _alternatives=False).peak_bytes
        alternatives.append(("--no-calibrate-per-node (whole graph, one sample a step)" if per_node
                             else "--calibrate-per-node (slower)", other))
    return MemoryEstimate(f"invpt-quantize --precision {precision}", peak, parts, alternatives)


def check_quantize_memory(onnx_path: str | os.PathLike, precision: str, *, verify: bool, per_node: bool,
                          calib_samples: int, method: str, model_bytes: Optional[int] = None) -> MemoryEstimate:
    """Estimate ``invpt-quantize``'s peak for ``onnx_path`` with these options and :func:`check_memory` it (exit 2 when
    the machine clearly cannot hold it). ``model_bytes`` defaults to the file's size (pass it with external data)."""
    size = model_bytes if model_bytes is not None else Path(onnx_path).stat().st_size
    act = activation_bytes(onnx_path, 1) if precision == "int8" and method != "percentile" else 0
    est = estimate_quantize(size, precision, verify=verify, per_node=per_node or method == "percentile",
                            calib_samples=calib_samples, sample_activation_bytes=act, method=method)
    check_memory(est, what=f"'{onnx_path}'")
    return est


def check_memory(estimate: MemoryEstimate, what: str = "", available: Optional[int] = None) -> Optional[int]:
    """Refuse (:class:`InsufficientMemoryError`, exit 2) when ``estimate`` exceeds the available memory.

    ``available`` defaults to :func:`mem_available_bytes`. Near the limit it warns. The message gives the estimate,
    what is available, and the alternatives that fit. Returns the available bytes used (None when unknown).
    """
    if available is None:
        available = mem_available_bytes()
    if available is None:
        _logger.debug("available memory unknown; %s estimated at %s", estimate.stage, gib(estimate.peak_bytes))
        return None
    _logger.info("%s: estimated peak memory %s, %s available", estimate.stage, gib(estimate.peak_bytes), gib(available))
    if estimate.peak_bytes <= available:
        if estimate.peak_bytes > WARN_FRACTION * available:
            _logger.warning("%s needs an estimated %s of the %s available: close to the limit; other programs "
                            "using memory meanwhile may get it killed.", estimate.stage, gib(estimate.peak_bytes),
                            gib(available))
        return available
    fitting = [f"{opt} (about {gib(b)})" for opt, b in estimate.alternatives if b <= available]
    others = [f"{opt} (about {gib(b)})" for opt, b in estimate.alternatives if b > available]
    advice = ("Options that fit: " + "; ".join(fitting) + ". ") if fitting else (
        ("None of the alternatives fits either (" + "; ".join(others) + "). ") if others else "")
    msg = (f"{estimate.stage}{' on ' + what if what else ''} needs an estimated {gib(estimate.peak_bytes)} of memory "
           f"at its peak ({', '.join(f'{k} {gib(v)}' for k, v in estimate.parts.items())}), but only "
           f"{gib(available)} is available (MemAvailable); it would be killed part way, so nothing was started. "
           f"{advice}Otherwise free memory (close other programs) or use a larger machine; set {SKIP_ENV}=1 to run "
           "anyway.")
    if os.environ.get(SKIP_ENV, "").strip() not in ("", "0"):
        _logger.warning("%s (%s is set: running anyway)", msg, SKIP_ENV)
        return available
    raise InsufficientMemoryError(msg)


def file_bytes(paths: Sequence[str | os.PathLike]) -> int:
    return sum(Path(p).stat().st_size for p in paths if Path(p).is_file())
