"""INT8 activation ranges measured by invpt with bounded memory; ModelOpt then only inserts the Q/DQ nodes.

ModelOpt's INT8 PTQ calibrates with onnxruntime's calibrators (as ModelOpt patches them): an augmented copy of the
model exposes the inputs and outputs of every node it quantizes as outputs of one ONNX Runtime session, next to
ModelOpt's other copies of the model (ViT-L: about 15 GiB for one sample a step, entropy ~42 s a sample). Its
``calibration_cache_path`` does not avoid that: ModelOpt 0.47 still calibrates and only overwrites the scales from the
cache afterwards (``modelopt/onnx/quantization/int8.py``). So invpt measures the ranges itself and hands ModelOpt a
calibrator that returns them:

* :func:`plan_quantization` finds the nodes ModelOpt will quantize with ModelOpt's own graph rules (its MHA,
  GEMV/small-GEMM, Conv and concat-group functions), on the graph alone (no weights). Only the tensors the Q/DQ nodes
  need are measured: the activation inputs of those nodes (ViT-L: 184 tensors, 1.0 GiB a sample, instead of the ~375
  inputs and outputs ModelOpt exposes).
* :func:`compute_ranges` runs ONNX Runtime sessions that each expose a bounded subset of those tensors (by bytes, like
  the FP16 range pass), feeds the samples in the steps ModelOpt would use, and folds every step into ModelOpt's own
  accumulators: running min/max for ``max``; for ``entropy`` onnxruntime's ``HistogramCollector`` fed through ModelOpt's
  ``_collect_value`` with ModelOpt's 128 bins / 128 quantized bins, so each tensor's step-by-step merged histogram and
  KL threshold are ModelOpt's. Tensors that ModelOpt gives one shared scale (inputs and output of a Concat, "concat
  elimination") share one accumulator. Sessions use ModelOpt's calibration settings (no graph optimisation, so
  exposing a tensor changes no kernel) and are released one after another.
* :func:`quantize_with_ranges` calls ModelOpt's INT8 quantizer (``modelopt.onnx.quantization.int8.quantize``) with that
  calibrator and the node exclusions of the plan, then converts the weights to INT8 + DequantizeLinear like
  ``quantize(..., dq_only=True)``. It skips what ModelOpt's top-level ``quantize()`` adds around it for a model exported
  by invpt: two more saved clones of the model and an ONNX Runtime session to read the attention sizes (the plan has
  them from shape inference) or the GEMM sizes (likewise), and it loads the model for ONNX Runtime's quantizer with
  shape inference on the graph alone (see :func:`_lean_model_loader`). ViT-L: 7.3 GiB at its peak instead of ~16.

The Q/DQ model this writes is ModelOpt's own for the same samples and steps (pinned on the tiny model by
``tests/test_int8_ranges.py``: same nodes, same weights, same scales).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from invpt.errors import DependencyError, ToolError, library_version
from invpt.preflight import INT8_RANGE_CHUNK_BYTES, release_memory

_logger = logging.getLogger(__name__)

# Bytes of the measured tensors one session exposes per step (ViT-L: 1.0 GiB a sample, so one session).
RANGE_CHUNK_BYTES = INT8_RANGE_CHUNK_BYTES
# The prepared model keeps its weights in an external-data file above this size (sessions and shape inference then
# read the graph alone, and every session reads the one weight file).
EXTERNAL_DATA_BYTES = 64 * 2**20
# What ModelOpt passes when it creates onnxruntime's calibrators (ort_patching._create_calibrator_with_extra_options):
ENTROPY_NUM_BINS = 128
ENTROPY_NUM_QUANTIZED_BINS = 128
# ModelOpt's INT8 rule for attention (graph_utils.find_nodes_from_mha_to_exclude): no Q/DQ on the two MatMuls of an
# attention block whose sequence is longer than this.
MHA_MAX_SEQ_LEN = 512
# The lowest opset ModelOpt's INT8 output uses; an older model is converted by ModelOpt's preprocessing, which the
# lean path does not run (such a model is calibrated by ModelOpt itself).
MIN_OPSET = 19
_UNKNOWN_TENSOR_BYTES = 4 * 2**20


@dataclass
class QuantPlan:
    """What ModelOpt will quantize, decided before any weight is loaded."""

    nodes: list[str]                       # nodes ModelOpt quantizes (graph order)
    tensors: list[str]                     # their activation inputs: the tensors whose ranges are measured
    groups: dict[str, frozenset] = field(default_factory=dict)  # tensor -> tensors sharing its scale (ModelOpt's)
    mha_excluded: list[str] = field(default_factory=list)      # attention MatMuls over MHA_MAX_SEQ_LEN
    gemv_excluded: list[str] = field(default_factory=list)     # GEMV / small-GEMM MatMuls
    tensor_bytes: dict[str, int] = field(default_factory=dict)  # per calibration step, from shape inference
    graph_inputs: frozenset = frozenset()

    def step_bytes(self) -> int:
        """Bytes of the measured tensors for one calibration step."""
        return sum(self.tensor_bytes.get(t, _UNKNOWN_TENSOR_BYTES) for t in self.tensors)

    def to_dict(self) -> dict:
        return {"nodes": len(self.nodes), "tensors": len(self.tensors), "concat_groups": len(set(self.groups.values())),
                "mha_excluded": len(self.mha_excluded), "gemv_excluded": len(self.gemv_excluded),
                "bytes_per_step": self.step_bytes()}


def _modelopt():
    """The ModelOpt modules this uses (its extra is needed)."""
    try:
        import modelopt.onnx.quantization.graph_utils as graph_utils
        import modelopt.onnx.quantization.int8 as int8
        import modelopt.onnx.quantization.ort_patching as ort_patching
        import modelopt.onnx.utils as utils
    except ImportError as err:
        raise DependencyError("nvidia-modelopt is not installed; install the calib extra: "
                              "pip install 'invpt[calib]'.") from err
    return graph_utils, int8, ort_patching, utils


def lean_path_supported() -> Optional[str]:
    """None when the installed ModelOpt has every function the lean path calls, else what is missing."""
    graph_utils, int8, ort_patching, utils = _modelopt()
    needed = {graph_utils: ("find_mha_partitions", "_exclude_matmuls_by_shape_inference", "find_nodes_to_exclude",
                            "find_nodes_from_convs_to_exclude", "get_concat_eliminated_tensors"),
              int8: ("quantize",),
              ort_patching: ("_create_calibrator_with_extra_options", "load_model_with_shape_infer", "_collect_value",
                             "add_infer_metadata"),
              utils: ("clear_stale_value_info", "name_onnx_nodes", "duplicate_shared_constants", "save_onnx",
                      "get_opset_version")}
    missing = [f"{m.__name__}.{name}" for m, names in needed.items() for name in names
               if not callable(getattr(m, name, None))]
    return ", ".join(missing) or None


def prepare_model(src: str | os.PathLike, dst: str | os.PathLike, external_over: int = EXTERNAL_DATA_BYTES) -> Path:
    """Write the model ModelOpt's quantizer and the range sessions read: ``src`` after the preprocessing ModelOpt's
    ``quantize()`` applies to a model exported by invpt (``modelopt.onnx.trt_utils.load_onnx_model`` and
    ``quantize._preprocess_onnx``: nodes in topological order, IR version at most 10, stale ``value_info`` cleared,
    every node named, shared constants duplicated), with ModelOpt's own functions. Above ``external_over`` bytes the
    weights go to ``dst.name + ".data"`` first and the graph is then processed without them. ``src`` is only read."""
    import onnx
    import onnx_graphsurgeon as gs

    _, _, _, utils = _modelopt()
    dst = Path(dst)
    proto = onnx.load(str(src))
    big = proto.ByteSize() > external_over
    if big:  # weights out once; everything below handles the graph and references to them
        onnx.save_model(proto, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dst.name + ".data", size_threshold=1024)
        del proto
        release_memory()
        proto = onnx.load(str(dst), load_external_data=False)
    graph = gs.import_onnx(proto)  # a weight stays a reference to its bytes (gs keeps the TensorProto)
    graph.toposort()
    del proto
    proto = gs.export_onnx(graph)
    del graph
    proto.ir_version = min(proto.ir_version, 10)
    utils.clear_stale_value_info(proto)
    utils.name_onnx_nodes(proto.graph)
    proto, _ = utils.duplicate_shared_constants(proto)  # a duplicate of an external weight points at the same bytes
    onnx.save_model(proto, str(dst))
    del proto
    release_memory()
    return dst


def _graph_only(model_path: Path):
    """The model without the bytes of its large weights (their dims stay; small constants such as Reshape shapes keep
    their values), so shape inference and graph analysis run without loading the weights."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    cleared = set()
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
            cleared.add(init.name)
    return proto, cleared


def _shape_only_graph(proto, cleared: set):
    """``proto`` as an onnx-graphsurgeon graph whose ``cleared`` weights (see :func:`_graph_only`) are zero-byte
    read-only arrays of their shape, so ModelOpt's rules that read a weight's shape work without loading it."""
    import onnx
    import onnx_graphsurgeon as gs

    empty = {i.name: i for i in proto.graph.initializer if i.name in cleared}
    graph = gs.import_onnx(proto)
    for name, tensor in graph.tensors().items():
        init = empty.get(name)
        if init is not None and isinstance(tensor, gs.Constant) and int(np.prod(init.dims)) > 0:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            tensor.values = np.broadcast_to(np.zeros((), dtype), tuple(init.dims))
    graph.toposort()
    return graph


def _static_shapes(proto, shapes: Mapping[str, Sequence[int]]):
    """A copy of ``proto`` with its graph inputs fixed to ``shapes`` (ModelOpt sets dims it is not told to 1) and
    shapes inferred."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    for inp in m.graph.input:
        dims = inp.type.tensor_type.shape.dim
        for k, d in enumerate(dims):
            want = shapes.get(inp.name)
            value = want[k] if want is not None and k < len(want) else (d.dim_value if d.HasField("dim_value") else 1)
            d.Clear()
            d.dim_value = int(value)
    return onnx.shape_inference.infer_shapes(m, strict_mode=False)


def _dims(vi) -> Optional[list[int]]:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim]


def plan_quantization(model_path: str | os.PathLike, op_types: Sequence[str], exclude_patterns: Sequence[str],
                      input_shapes: Mapping[str, Sequence[int]]) -> QuantPlan:
    """The nodes ModelOpt's INT8 quantizer will quantize in ``model_path`` (a :func:`prepare_model` output) and the
    tensors to measure, with ModelOpt's rules, for calibration steps of ``input_shapes``.

    The rules are ModelOpt's functions, applied as ``modelopt.onnx.quantization.quantize`` applies them for INT8 with
    ``op_types_to_quantize``: the attention MatMuls of sequences over :data:`MHA_MAX_SEQ_LEN` (lengths from shape
    inference instead of ModelOpt's inference run), GEMV/small-GEMM MatMuls (its shape-inference variant), Conv nodes it
    cannot quantize, the ``exclude_patterns`` (regexes, ``re.match`` as ModelOpt does), and the concat groups that share
    a scale. A length shape inference cannot tell is a :class:`~invpt.errors.ToolError` (ModelOpt's own calibration,
    ``--calibrate-per-node`` or ``--no-calibrate-per-node``, reads it from an inference run instead).
    """
    import onnx

    graph_utils, _, _, _ = _modelopt()
    model_path = Path(model_path)
    proto, cleared = _graph_only(model_path)
    inferred = _static_shapes(proto, input_shapes)
    types = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
             + list(inferred.graph.input)}
    graph = _shape_only_graph(proto, cleared)

    mha: list[str] = []
    for part in graph_utils.find_mha_partitions(graph):
        key = part[0].inputs[1].name
        dims = _dims(types[key]) if key in types else None
        if not dims or len(dims) < 1 or dims[-1] <= 0:
            raise ToolError(f"The sequence length of the attention MatMul '{part[0].name}' (input '{key}') is "
                            "not known from shape inference, which ModelOpt's attention rule needs; calibrate with "
                            "ModelOpt itself (--no-calibrate-per-node).", "onnx", library_version("onnx"))
        if dims[-1] > MHA_MAX_SEQ_LEN:
            mha += [part[0].name, part[2].name]

    spec = ",".join(f"{k}:" + "x".join(str(int(d)) for d in v) for k, v in input_shapes.items())
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)  # ModelOpt fixes the input dims of the model it is given
    matmuls = [n for n in graph.nodes if n.op in ("MatMul", "Gemm")]
    try:
        gemv = list(graph_utils._exclude_matmuls_by_shape_inference(probe, matmuls, spec)) if matmuls else []
    except RuntimeError as err:  # "Shape inference did not find shape for ..."
        raise ToolError.from_exception("ModelOpt", "finding GEMV MatMuls by shape inference", err,
                                       "nvidia-modelopt") from err
    del probe

    excluded = set(graph_utils.find_nodes_to_exclude(graph, list(exclude_patterns) + mha + gemv, None))
    excluded.update(graph_utils.find_nodes_from_convs_to_exclude(graph, quantize_mode="int8"))
    nodes = [n.name for n in graph.nodes if n.op in op_types and n.name not in excluded]
    groups = {t: frozenset(g) for t, g in graph_utils.get_concat_eliminated_tensors(proto, nodes).items()}

    inits = {i.name for i in proto.graph.initializer}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    by_name = {n.name: n for n in proto.graph.node}
    tensors: list[str] = []
    seen: set[str] = set()
    for name in nodes:
        for t in by_name[name].input:
            if not t or t in inits or t in seen:
                continue
            vi = types.get(t)
            if vi is not None and vi.type.tensor_type.elem_type not in float_types:
                continue
            seen.add(t)
            tensors.append(t)
    missing = {m for g in groups.values() for m in g} - seen
    if missing:  # ModelOpt's calibrator would fail on them too (it only merges tensors it exposes)
        raise ToolError(f"ModelOpt groups tensors that are no quantized node's input ({sorted(missing)[:3]}); "
                        "calibrate with ModelOpt itself (--no-calibrate-per-node).", "ModelOpt",
                        library_version("nvidia-modelopt"))
    sizes = {}
    for t in tensors:
        dims = _dims(types[t]) if t in types else None
        if dims and all(d > 0 for d in dims):
            item = onnx.helper.tensor_dtype_to_np_dtype(types[t].type.tensor_type.elem_type).itemsize
            sizes[t] = int(np.prod(dims)) * item
    return QuantPlan(nodes, tensors, groups, mha, gemv, sizes, frozenset(i.name for i in proto.graph.input))


# ---- measuring the ranges -----------------------------------------------------------------------------------------
def _chunks(plan: QuantPlan, chunk_bytes: int) -> list[list[str]]:
    """The measured tensors in graph order, split into chunks of about ``chunk_bytes`` (one step's bytes); the
    tensors of one concat group stay in one chunk (they share one accumulator)."""
    units: list[list[str]] = []
    placed: set[str] = set()
    for t in plan.tensors:
        if t in placed:
            continue
        members = [m for m in plan.tensors if m in plan.groups.get(t, ())] or [t]
        placed.update(members)
        units.append(members)
    chunks: list[list[str]] = [[]]
    size = 0
    for unit in units:
        b = sum(plan.tensor_bytes.get(t, _UNKNOWN_TENSOR_BYTES) for t in unit)
        if chunks[-1] and size + b > chunk_bytes:
            chunks.append([])
            size = 0
        chunks[-1].extend(unit)
        size += b
    return chunks


def session_options(threads: Optional[int] = None):
    """ONNX Runtime options of a range session: ModelOpt's calibration settings (no graph optimisation, so exposing a
    tensor changes no kernel; no CPU memory arena, so a step's buffers go back when it ends) and no memory-pattern
    planning. Weight pre-packing stays on as in ModelOpt's session: without it MatMul rounds differently in the last
    bit, and the ranges would no longer be ModelOpt's exactly."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def _open_session(model_path: Path, proto, outputs: Sequence[str], k: int, inline: bool, threads: Optional[int]):
    """A session of ``proto`` (the graph of ``model_path``) with ``outputs`` as extra graph outputs."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    existing = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=t) for t in outputs if t not in existing)
    opts = session_options(threads)
    if inline:  # a small model: hand ONNX Runtime the bytes
        return ort.InferenceSession(m.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    part = model_path.with_name(f"{model_path.stem}.range{k}.onnx")  # beside the weights file it points at
    onnx.save_model(m, str(part))
    try:
        return ort.InferenceSession(str(part), sess_options=opts, providers=["CPUExecutionProvider"])
    finally:
        part.unlink()


class _MinMax:
    """ModelOpt's ``max`` accumulator: onnxruntime's MinMaxCalibrater (ReduceMin/ReduceMax of every step, as [1]
    float arrays) merged by ModelOpt over steps and over a concat group."""

    method = "max"

    def __init__(self) -> None:
        self.low: dict[str, np.ndarray] = {}
        self.high: dict[str, np.ndarray] = {}

    def add(self, key: str, arrays: Sequence[np.ndarray]) -> None:
        lo = min(np.min(a).reshape(1) for a in arrays)
        hi = max(np.max(a).reshape(1) for a in arrays)
        self.low[key] = lo if key not in self.low else min(self.low[key], lo)
        self.high[key] = hi if key not in self.high else max(self.high[key], hi)

    def result(self) -> dict[str, tuple]:
        return {k: (self.low[k], self.high[k]) for k in self.low}


class _Entropy:
    """ModelOpt's ``entropy`` accumulator: onnxruntime's ``HistogramCollector`` (method ``entropy``, ModelOpt's bins)
    fed each step through ModelOpt's ``_collect_value`` (which concatenates a concat group's tensors)."""

    method = "entropy"

    def __init__(self) -> None:
        from onnxruntime.quantization.calibrate import HistogramCollector

        _, _, ort_patching, _ = _modelopt()
        self._collect = ort_patching._collect_value
        self.collector = HistogramCollector(method="entropy", symmetric=False, num_bins=ENTROPY_NUM_BINS,
                                            num_quantized_bins=ENTROPY_NUM_QUANTIZED_BINS, percentile=99.999,
                                            scenario="same")

    def add(self, key: str, arrays: Sequence[np.ndarray]) -> None:
        _, _, ort_patching, _ = _modelopt()
        with _replaced((ort_patching, "tqdm", lambda it, *a, **k: it)):  # no progress bar per tensor and step
            self._collect(self.collector, {key: list(arrays)})

    def result(self) -> dict[str, tuple]:
        return self.collector.compute_collection_result()


@dataclass
class RangeReport:
    """How the ranges were measured (recorded in the manifest)."""

    method: str
    tensors: int
    steps: int
    sessions: int
    step_bytes: int
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"method": self.method, "tensors": self.tensors, "steps": self.steps, "sessions": self.sessions,
                "bytes_per_step": self.step_bytes, "seconds": round(self.seconds, 2)}


def compute_ranges(model_path: str | os.PathLike, plan: QuantPlan, steps: Sequence[Mapping[str, np.ndarray]],
                   method: str, chunk_bytes: int = RANGE_CHUNK_BYTES, threads: Optional[int] = None,
                   progress: bool = False):
    """The ranges ModelOpt's ``method`` calibration (``entropy`` or ``max``) would compute for ``plan.tensors`` of
    ``model_path`` (a :func:`prepare_model` output) over the calibration ``steps`` (one feed per step, ModelOpt's
    steps), with bounded memory (see the module docstring). Returns (onnxruntime ``TensorsData``, :class:`RangeReport`).

    Peak memory: one session (the weights) plus one step's exposed tensors of one chunk (``chunk_bytes``).
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

    t0 = time.perf_counter()
    model_path = Path(model_path)
    if method not in ("entropy", "max"):
        raise ValueError(f"compute_ranges measures 'entropy' or 'max' ranges, not '{method}'")
    acc = _Entropy() if method == "entropy" else _MinMax()
    proto = onnx.load(str(model_path), load_external_data=False)
    inline = not any(i.data_location == onnx.TensorProto.EXTERNAL for i in proto.graph.initializer)
    chunks = _chunks(plan, chunk_bytes)
    rep = {t: (sorted(plan.groups[t])[0] if t in plan.groups else t) for t in plan.tensors}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(chunks) * len(steps), desc=f"INT8 {method} ranges", unit="step", leave=False,
                   disable=None)  # only on a terminal
    try:
        for k, chunk in enumerate(chunks):
            exposed = [t for t in chunk if t not in plan.graph_inputs]
            t_open = time.perf_counter()
            sess = _open_session(model_path, proto, exposed, k, inline, threads)
            _logger.debug("ranges: session %d/%d opened in %.1f s (%d tensors exposed)", k + 1, len(chunks),
                          time.perf_counter() - t_open, len(exposed))
            units: dict[str, list[str]] = {}
            for t in chunk:
                units.setdefault(rep[t], []).append(t)
            for i, feed in enumerate(steps):
                t_step = time.perf_counter()
                values = sess.run_with_ort_values(exposed, {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
                                                            for n, v in feed.items()})
                t_run = time.perf_counter() - t_step
                by_name = dict(zip(exposed, values))
                del values
                for key, members in units.items():
                    arrays = [np.asarray(feed[m]) if m in plan.graph_inputs else by_name.pop(m).numpy()
                              for m in members]
                    acc.add(key, arrays)
                    del arrays
                del by_name
                _logger.debug("ranges: session %d/%d, step %d/%d: %.1f s (inference %.1f s)", k + 1, len(chunks), i + 1,
                              len(steps), time.perf_counter() - t_step, t_run)
                if bar is not None:
                    bar.update(1)
            del sess
            release_memory()
            _logger.debug("ranges: chunk %d/%d (%d tensors) done", k + 1, len(chunks), len(chunk))
        merged = acc.result()
    finally:
        if bar is not None:
            bar.close()
    data = {t: merged[rep[t]] for t in plan.tensors}
    cal = CalibrationMethod.Entropy if method == "entropy" else CalibrationMethod.MinMax
    report = RangeReport(method, len(plan.tensors), len(steps), len(chunks), plan.step_bytes(),
                         time.perf_counter() - t0)
    return TensorsData(cal, data), report


# ---- handing the ranges to ModelOpt -------------------------------------------------------------------------------
class _PrecomputedCalibrator:
    """Stands in for onnxruntime's calibrator inside ModelOpt: nothing to run, the ranges are known."""

    def __init__(self, ranges) -> None:
        self.ranges = ranges

    def collect_data(self, data_reader) -> None:  # noqa: D102 - the calibrator protocol
        return None

    def compute_data(self):
        return self.ranges


def _calibrator_factory(ranges, plan: QuantPlan, method: str):
    """A replacement for ModelOpt's ``_create_calibrator_with_extra_options`` that returns the ranges, after checking
    that ModelOpt asks for what the plan predicted (the same nodes, the same concat groups, the same method): a
    mismatch is a :class:`~invpt.errors.ToolError`, never ranges for other tensors."""
    from onnxruntime.quantization.calibrate import CalibrationMethod

    want_method = CalibrationMethod.Entropy if method == "entropy" else CalibrationMethod.MinMax
    version = library_version("nvidia-modelopt")

    def create(model, op_types_to_calibrate=None, augmented_model_path="", calibrate_method=None,
               use_external_data_format=False, providers=None, extra_options=None):
        nodes = set(op_types_to_calibrate or ())  # ModelOpt passes the nodes to quantize here
        groups = {k: frozenset(v) for k, v in ((extra_options or {}).get("group_qdq_tensors") or {}).items()}
        problems = []
        if nodes != set(plan.nodes):
            problems.append(f"{len(nodes ^ set(plan.nodes))} node(s) differ from the plan "
                            f"(e.g. {sorted(nodes ^ set(plan.nodes))[:3]})")
        if groups != plan.groups:
            problems.append("the concat groups differ from the plan")
        if calibrate_method != want_method:
            problems.append(f"calibration method {calibrate_method} instead of {want_method}")
        if problems:
            raise ToolError(f"ModelOpt {version} asked for other ranges than invpt measured: {'; '.join(problems)}. "
                            "This is an invpt bug for this ModelOpt version: report it; meanwhile calibrate with "
                            "ModelOpt itself (--no-calibrate-per-node).", "ModelOpt", version)
        _logger.debug("ModelOpt's calibrator replaced: %d precomputed ranges for %d nodes", len(ranges.data),
                      len(nodes))
        return _PrecomputedCalibrator(ranges)

    return create


def _lean_model_loader(original):
    """ModelOpt's ``load_model_with_shape_infer`` (full model, then shape inference, which serialises the whole model
    and parses it back) as: the graph, shape inference on it alone, then its external weights. The model it returns
    is the same; for a model without external data the original runs."""

    def load(model_path: Path):
        import onnx
        from onnx.external_data_helper import load_external_data_for_model

        _, _, ort_patching, _ = _modelopt()
        proto = onnx.load(str(model_path), load_external_data=False)
        if not any(i.data_location == onnx.TensorProto.EXTERNAL for i in proto.graph.initializer):
            del proto
            return original(model_path)
        try:
            proto = onnx.shape_inference.infer_shapes(proto)
            ort_patching.add_infer_metadata(proto)
        except Exception as err:  # ModelOpt logs and goes on with the model as loaded
            _logger.info("shape inference failed for %s: %s", model_path, err)
        load_external_data_for_model(proto, str(Path(model_path).parent))
        return proto

    return load


@contextmanager
def _replaced(*triples) -> Iterator[None]:
    """Set ``(object, attribute, value)`` for the block; put the original values back afterwards."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in triples]
    try:
        for obj, name, value in triples:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


@contextmanager
def _temp_files_in(folder: Path) -> Iterator[None]:
    """ModelOpt and onnxruntime write their intermediate models with ``tempfile`` (a full copy of the model each):
    inside the block they go to ``folder`` (the stage's staging folder, removed with it) instead of /tmp."""
    saved = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = saved


def quantize_with_ranges(model_path: str | os.PathLike, out_path: str | os.PathLike, plan: QuantPlan, ranges,
                         method: str, exclude_patterns: Sequence[str], op_types: Sequence[str], input_shapes,
                         log_level: str = "WARNING") -> Path:
    """ModelOpt's INT8 Q/DQ model of ``model_path`` (a :func:`prepare_model` output) with ``ranges`` (from
    :func:`compute_ranges` for ``plan``), weights as INT8 + DequantizeLinear, written to ``out_path``.

    Calls ``modelopt.onnx.quantization.int8.quantize`` as ModelOpt's ``quantize(quantize_mode="int8", dq_only=True)``
    does, with the plan's attention and GEMV exclusions added to ``exclude_patterns`` (as ``quantize`` adds those it
    finds) and its calibrator replaced by the ranges; then ``qdq_to_dq`` and ModelOpt's ``save_onnx``. Failures inside
    ModelOpt are :class:`~invpt.errors.ToolError`.
    """
    import onnxruntime.quantization.calibrate as ort_calibrate
    from modelopt.onnx.quantization.qdq_utils import qdq_to_dq

    _, int8, ort_patching, utils = _modelopt()
    model_path, out_path = Path(model_path), Path(out_path)
    big = model_path.stat().st_size + sum(p.stat().st_size for p in model_path.parent.glob(model_path.name + ".data"))
    external = big > 1_800_000_000
    spec = ",".join(f"{k}:" + "x".join(str(int(d)) for d in v) for k, v in input_shapes.items())
    generated: list[str] = []
    work = Path(tempfile.mkdtemp(prefix=".invpt-modelopt.", dir=out_path.parent))
    try:
        with _temp_files_in(work), _replaced(
                (ort_patching, "_create_calibrator_with_extra_options", _calibrator_factory(ranges, plan, method)),
                (ort_patching, "load_model_with_shape_infer",
                 _lean_model_loader(ort_patching.load_model_with_shape_infer)),
                (ort_calibrate, "create_calibrator", ort_calibrate.create_calibrator)):
            try:
                proto = int8.quantize(
                    str(model_path),
                    calibration_method=method,
                    calibration_data_reader=None,  # the calibrator does not read data
                    calibration_shapes=spec,
                    calibration_eps=["cpu"],
                    op_types_to_quantize=list(op_types),
                    nodes_to_exclude=list(exclude_patterns) + plan.mha_excluded + plan.gemv_excluded,
                    use_external_data_format=external,
                    intermediate_generated_files=generated,
                    high_precision_dtype="fp32",
                    log_level=log_level,
                    enable_gemv_detection_for_trt=False,  # the plan's GEMV exclusions are in nodes_to_exclude
                )
                release_memory()
                proto = qdq_to_dq(proto)
                utils.save_onnx(proto, str(out_path), external)
                del proto
            except ToolError:
                raise
            except Exception as err:
                raise ToolError.from_exception("ModelOpt", f"inserting Q/DQ nodes into a copy of the model ({method} "
                                               "ranges measured by invpt)", err, "nvidia-modelopt") from err
    finally:
        for f in generated:
            for p in (Path(f), Path(f + ".data"), Path(f + "_data")):
                p.unlink(missing_ok=True)
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        release_memory()
    return out_path
