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
EXPORT_PER_WEIGHT = 2.2           # torch.onnx dynamo export + optimizer + saving (ViT-L: 4.4 GiB in the step)
EXPORT_VERIFY_PER_WEIGHT = 2.3    # PyTorch reference next to the model (ViT-L: 4.6 GiB, the peak; ONNX Runtime 3.7)
EXPORT_SIMPLIFY_PER_WEIGHT = 5.5  # onnxslim (opt-in) copies the graph several times (ViT-L: ~16 GiB before)
# Quantize, per byte of the FP32 ONNX (ViT-L: 1.67 GB).
QUANTIZE_REFERENCE_PER_MODEL = 2.2  # FP32 PyTorch reference on the held-out images, released before conversion
FP16_PER_MODEL = 3.7              # the range pass's sessions (AutoCast converts the graph alone; ViT-L: 6.36 GiB
                                  # on 2026-11-25, 6.70 GiB on 2026-12-07 with OMP_NUM_THREADS=2, at the range pass)
INT8_PER_NODE_PER_MODEL = 12.0    # ModelOpt node by node (ViT-L: 19.7 GiB measured with the reference)
INT8_WHOLE_GRAPH_PER_MODEL = 7.0  # ModelOpt whole graph: its copies of the model, the augmented session
# Whole graph keeps one step's calibrated tensors (session outputs) at a time: this share of the sum of one sample's
# intermediate tensors (activation_bytes; ModelOpt exposes only the inputs of quantized nodes) per sample in the step.
# Fitted to ViT-L (model 1.55 GiB, activation_bytes 12.9 GiB): batch 1 a step 16.4 GiB (max, 32 steps: flat across
# the steps) and 17.1 GiB (entropy, 4 steps); batch 2 in one step 20.9 GiB.
INT8_WHOLE_GRAPH_PER_ACTIVATION = 0.35
# Whole-graph calibration: bytes of one step's intermediate tensors (sets the samples per step, at least one).
WHOLE_GRAPH_STEP_BYTES = 2 * GiB
# INT8 by default (invpt.calib.ranges): invpt measures the ranges, ModelOpt inserts Q/DQ. Phases run one after another,
# each released before the next. Fitted to ViT-L (1.55 GiB model, 32 samples, max and entropy alike: 7.3 GiB peak).
INT8_PREPARE_PER_MODEL = 3.0      # the model loaded once, its weights written to one external file (ViT-L: 5.7 GiB)
INT8_RANGES_PER_MODEL = 1.0       # the range session's weights, plus one step's exposed tensors (at most the chunk
INT8_RANGES_PER_ACTIVATION = 0.1  # below) and the forward pass's live tensors: this share of activation_bytes
INT8_INSERT_PER_MODEL = 4.1       # ModelOpt's INT8 quantizer inserting Q/DQ from the ranges (ViT-L: 7.3 GiB, the peak)
# Bytes of measured tensors one range session exposes per step (bounds the range pass's memory beyond the model).
INT8_RANGE_CHUNK_BYTES = 2 * GiB
QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")  # nodes whose activation inputs the ranges are measured for
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
    return tensor_bytes(onnx_path, batch)[0]


def tensor_bytes(onnx_path: str | os.PathLike, batch: int = 1,
                 op_types: Sequence[str] = QUANTIZED_OP_TYPES) -> tuple[int, int]:
    """(:func:`activation_bytes`, the sum of the sizes of the distinct activation inputs of ``op_types`` nodes): the
    second bounds what INT8 range measurement exposes per sample (invpt.calib.ranges measures a subset of them)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    for init in proto.graph.initializer:  # shapes only: drop inline weights before inference copies the graph
        init.ClearField("raw_data")
        del init.float_data[:]
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception as err:  # the estimate is advice; a graph shape inference cannot follow is still checked later
        _logger.debug("shape inference failed for the memory estimate (%s)", err)
        return 0, 0
    sizes = {}
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
        sizes[vi.name] = n * item
    inputs = {t for node in proto.graph.node if node.op_type in op_types for t in node.input}
    return sum(sizes.values()), sum(b for t, b in sizes.items() if t in inputs)


def step_batch(sample_activation_bytes: int, budget: int = WHOLE_GRAPH_STEP_BYTES,
               max_batch: int = MAX_STEP_BATCH) -> int:
    """Samples per whole-graph calibration step whose intermediate tensors fit in ``budget`` (1 to ``max_batch``)."""
    if sample_activation_bytes <= 0:
        return 1
    return int(max(1, min(max_batch, budget // sample_activation_bytes)))


def estimate_quantize(model_bytes: int, precision: str, *, verify: bool = True, per_node: Optional[bool] = None,
                      calib_samples: int = 32, sample_activation_bytes: int = 0, method: str = "entropy",
                      samples_per_step: Optional[int] = None, sample_range_bytes: int = 0,
                      _alternatives: bool = True) -> MemoryEstimate:
    """Peak of ``invpt-quantize`` for an FP32 ONNX of ``model_bytes``.

    INT8 ``per_node`` None (the default): invpt measures the ranges (``sample_range_bytes`` a sample exposed, capped
    per step by :data:`INT8_RANGE_CHUNK_BYTES`) and ModelOpt inserts Q/DQ; True / False: ModelOpt calibrates itself,
    node by node / the whole graph. ``sample_activation_bytes`` (see :func:`activation_bytes`, batch 1) sizes the
    forward pass and whole-graph calibration, whose memory follows the samples per step (default :func:`step_batch`),
    not the number of samples.
    """
    parts = {"process": BASE_BYTES}
    if verify:
        parts["reference"] = int(QUANTIZE_REFERENCE_PER_MODEL * model_bytes)
    if precision == "fp16":
        parts["convert"] = int(FP16_PER_MODEL * model_bytes)
    elif per_node is None:
        batch = samples_per_step or step_batch(sample_activation_bytes)
        exposed = (min(sample_range_bytes * batch, INT8_RANGE_CHUNK_BYTES) if sample_range_bytes
                   else INT8_RANGE_CHUNK_BYTES)
        parts["prepare"] = int(INT8_PREPARE_PER_MODEL * model_bytes)
        parts["ranges"] = int(INT8_RANGES_PER_MODEL * model_bytes + exposed
                              + INT8_RANGES_PER_ACTIVATION * batch * sample_activation_bytes)
        parts["insert_qdq"] = int(INT8_INSERT_PER_MODEL * model_bytes)
    elif per_node:
        parts["calibrate"] = int(INT8_PER_NODE_PER_MODEL * model_bytes)
    else:
        batch = samples_per_step or step_batch(sample_activation_bytes)
        parts["calibrate"] = int(INT8_WHOLE_GRAPH_PER_MODEL * model_bytes
                                 + INT8_WHOLE_GRAPH_PER_ACTIVATION * batch * sample_activation_bytes)
    peak = parts["process"] + max(v for k, v in parts.items() if k != "process")
    alternatives: list[tuple[str, int]] = []
    if precision == "int8" and _alternatives and per_node is not None:
        kw = dict(verify=verify, calib_samples=calib_samples, sample_activation_bytes=sample_activation_bytes,
                  sample_range_bytes=sample_range_bytes, _alternatives=False)
        ranges = estimate_quantize(model_bytes, precision, per_node=None, **kw).peak_bytes
        other = estimate_quantize(model_bytes, precision, per_node=not per_node, **kw).peak_bytes
        flag = "--calibrate-per-node" if per_node else "--no-calibrate-per-node"
        alternatives.append((f"leave out {flag} (invpt measures the ranges with bounded memory)", ranges))
        alternatives.append(("--no-calibrate-per-node (ModelOpt, whole graph, one sample a step)" if per_node
                             else "--calibrate-per-node (slower)", other))
    return MemoryEstimate(f"invpt-quantize --precision {precision}", peak, parts, alternatives)


def check_quantize_memory(onnx_path: str | os.PathLike, precision: str, *, verify: bool, per_node: Optional[bool],
                          calib_samples: int, method: str, model_bytes: Optional[int] = None) -> MemoryEstimate:
    """Estimate ``invpt-quantize``'s peak for ``onnx_path`` with these options and :func:`check_memory` it (exit 2 when
    the machine clearly cannot hold it). ``per_node`` is ``--calibrate-per-node`` as given (None: invpt measures the
    INT8 ranges). ``model_bytes`` defaults to the file's size (pass it with external data)."""
    size = model_bytes if model_bytes is not None else Path(onnx_path).stat().st_size
    act, ranged = tensor_bytes(onnx_path, 1) if precision == "int8" and method != "percentile" else (0, 0)
    est = estimate_quantize(size, precision, verify=verify, per_node=True if method == "percentile" else per_node,
                            calib_samples=calib_samples, sample_activation_bytes=act, method=method,
                            sample_range_bytes=ranged)
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
