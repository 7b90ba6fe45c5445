"""FP16 mixed precision with NVIDIA ModelOpt AutoCast (TensorRT 11 takes precision from the ONNX).

Memory: AutoCast's own data-range rule (keep in FP32 the nodes whose inputs or outputs exceed ``data_max``) runs a
``ReferenceRunner`` that marks *every* tensor of the graph as an output of one ONNX Runtime session and keeps them
all (plus two more copies of the model): for ViT-L that pass alone went past 23.8 GB. invpt applies the same rule
with bounded memory (:func:`activation_absmax`: a few ONNX Runtime sessions, each exposing a chunk of the
intermediate tensors at a time, keeping only each tensor's max |x|), passes the nodes it selects to AutoCast as
``nodes_to_exclude`` and calls AutoCast with ``data_max=inf``, which skips its reference pass. The graph AutoCast
reads keeps its weights in an external-data file, so its shape inference works on the graph alone.
"""
from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from invpt.calib.int8 import modelopt_logging
from invpt.calib.policy import exact_name_regexes
from invpt.errors import DependencyError, ToolError
from invpt.preflight import release_memory

_logger = logging.getLogger(__name__)

# AutoCast's default: FP16's unit in the last place is 0.5 at 512, so values beyond it stay FP32.
DATA_MAX = 512.0
# Bytes of intermediate tensors one range-pass session exposes at a time (bounds the pass's memory beyond the model).
RANGE_CHUNK_BYTES = 2 * 2**30
# Weights go to an external-data file in the private copy above this size (shape inference then reads no weights).
EXTERNAL_DATA_BYTES = 64 * 2**20
# ModelOpt's in-memory onnx.checker is left to invpt's checks by path above this size (see _checks_by_path).
LEAN_CHECK_BYTES = 256 * 2**20
_UNKNOWN_TENSOR_BYTES = 4 * 2**20  # size assumed for a tensor whose shape shape inference could not tell


@dataclass
class RangeRule:
    """What the data-range rule saw and kept in FP32 (recorded in the manifest's precision policy)."""

    data_max: float
    inputs: str
    kept_nodes: list[str] = field(default_factory=list)
    tensor_absmax: dict[str, float] = field(default_factory=dict)  # only the tensors over data_max
    sessions: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"data_max": self.data_max, "inputs": self.inputs, "kept_nodes": list(self.kept_nodes),
                "tensors_over_data_max": {k: float(v) for k, v in self.tensor_absmax.items()},
                "sessions": self.sessions, "seconds": round(self.seconds, 3)}


@contextmanager
def _checks_by_path(clean: Path, limit: int = LEAN_CHECK_BYTES) -> Iterator[None]:
    """Inside the block, ModelOpt's ``check_model`` skips its in-memory check of models over ``limit`` bytes.

    AutoCast runs ``onnx.checker`` on its in-memory input and output (``modelopt.onnx.utils.check_model``), which
    serialises the whole model, weights included, and has the checker parse it again: two more copies of a 1.6 GB
    ViT-L next to the two AutoCast already holds (its model and its converter's deep copy): the FP16 stage's peak.
    invpt runs the same checker on the file it gives AutoCast, ``clean`` (graph only, weights in an external file),
    before the block, and the calib stage runs the full checker on AutoCast's output file right after it, so every
    graph is still checked; smaller models keep ModelOpt's own check. The original function is put back on exit.
    """
    import onnx
    import modelopt.onnx.utils as mo_utils

    onnx.checker.check_model(str(clean))
    original = mo_utils.check_model

    def check_model(model) -> None:
        if model.ByteSize() <= limit:
            return original(model)
        _logger.debug("ModelOpt's in-memory onnx.checker skipped for a %d-byte model (checked by path instead)",
                      model.ByteSize())

    mo_utils.check_model = check_model
    try:
        yield
    finally:
        mo_utils.check_model = original


def _strip_value_info(src: Path, dst: Path, external_over: int = EXTERNAL_DATA_BYTES) -> None:
    """Copy a model without intermediate shape annotations (``src`` is only read; ``dst`` is a new file).

    AutoCast copies stale ``value_info`` shapes onto the Casts it inserts around the message-passing
    Resize, which ONNX Runtime then rejects; without them shapes are inferred afresh and correctly.

    This copy is also AutoCast's private input (in the stage's staging folder): like
    :func:`~invpt.artifacts.private_copy`, it keeps the library away from the user's file, and since it has to be
    written anyway no second copy is made. Above ``external_over`` bytes its weights go to ``dst.name + ".data"``:
    AutoCast then infers types on the graph alone (a 1.6 GB model is otherwise serialised again for shape
    inference), and the range pass's sessions share the one weight file.
    """
    import onnx

    proto = onnx.load(str(src))
    del proto.graph.value_info[:]
    onnx.save_model(proto, str(dst), save_as_external_data=proto.ByteSize() > external_over,
                    all_tensors_to_one_file=True, location=dst.name + ".data", size_threshold=1024)


def _tensor_bytes(vi, batch: int) -> int:
    """Bytes of one tensor from its inferred type (symbolic dims taken as ``batch``), or a default when unknown."""
    import onnx

    tt = vi.type.tensor_type
    if not tt.HasField("shape") or not tt.elem_type:
        return _UNKNOWN_TENSOR_BYTES
    n = 1
    for d in tt.shape.dim:
        n *= d.dim_value if d.HasField("dim_value") else batch
    try:
        item = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize
    except Exception:  # string or exotic type
        item = 4
    return max(int(n) * item, 1)


def activation_absmax(model_path: str | os.PathLike, feeds: Sequence[Mapping[str, np.ndarray]],
                      chunk_bytes: int = RANGE_CHUNK_BYTES,
                      threads: Optional[int] = None) -> tuple[dict[str, float], int]:
    """Max |x| over ``feeds`` of every node input/output of ``model_path``, with bounded memory.

    The node outputs are split, in graph order, into chunks of about ``chunk_bytes`` (sizes from ONNX shape
    inference, symbolic dims taken as the feed's batch); for each chunk one ONNX Runtime session exposes just those
    tensors as extra outputs, runs every feed and keeps one float per tensor. The session is released before the
    next one opens. Peak memory is one session plus one chunk, instead of every tensor of the graph at once
    (AutoCast's ``ReferenceRunner``). Each chunk's model is a small graph file beside ``model_path`` that points at the
    same external-data file, so the weights are never copied. Returns (name -> absmax, sessions opened); graph
    inputs are measured from the feeds themselves.
    """
    import onnx
    import onnxruntime as ort

    model_path = Path(model_path)
    graph_only = onnx.load(str(model_path), load_external_data=False)
    inline_weights = any(i.data_location != onnx.TensorProto.EXTERNAL and i.ByteSize() > 1024
                         for i in graph_only.graph.initializer)
    try:
        inferred = onnx.shape_inference.infer_shapes(graph_only, strict_mode=False)
    except Exception as err:  # shapes only size the chunks; a graph ORT runs is still measured
        _logger.debug("shape inference failed (%s); chunk sizes use a default per tensor", err)
        inferred = graph_only
    types = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    del inferred
    graph_outputs = {o.name for o in graph_only.graph.output}
    batch = max((next(iter(f.values())).shape[0] for f in feeds if f), default=1)
    names: list[str] = []
    seen: set[str] = set()
    for node in graph_only.graph.node:
        for o in node.output:
            if o and o not in seen:
                seen.add(o)
                names.append(o)
    chunks: list[list[str]] = [[]]
    size = 0
    for name in names:
        b = _tensor_bytes(types[name], batch) if name in types else _UNKNOWN_TENSOR_BYTES
        if chunks[-1] and size + b > chunk_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(name)
        size += b

    absmax: dict[str, float] = {}
    for feed in feeds:
        for k, v in feed.items():
            absmax[k] = max(absmax.get(k, 0.0), float(np.max(np.abs(v))) if v.size else 0.0)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.disable_prepacking", "1")  # no second, pre-packed copy of the weights
    if threads:
        opts.intra_op_num_threads = threads
    base_outputs = list(graph_only.graph.output)
    for k, chunk in enumerate(chunks):
        del graph_only.graph.output[:]
        graph_only.graph.output.extend(base_outputs)
        for name in chunk:
            if name in graph_outputs:
                continue
            vi = onnx.ValueInfoProto()
            if name in types:
                vi.CopyFrom(types[name])
            else:
                vi.name = name
            graph_only.graph.output.append(vi)
        wanted = chunk
        if inline_weights:  # a small model: hand ORT the bytes
            sess = ort.InferenceSession(graph_only.SerializeToString(), sess_options=opts,
                                        providers=["CPUExecutionProvider"])
        else:
            part = model_path.with_name(f"{model_path.stem}.range{k}.onnx")
            onnx.save_model(graph_only, str(part))
            try:
                sess = ort.InferenceSession(str(part), sess_options=opts, providers=["CPUExecutionProvider"])
            finally:
                part.unlink()
        for feed in feeds:
            # OrtValues, read one at a time: ``run`` would copy every exposed tensor into a new array at once.
            values = sess.run_with_ort_values(wanted, {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()})
            for i, name in enumerate(wanted):
                value = values[i].numpy()
                if value.dtype.kind in "fiub" and value.size:
                    m = float(np.max(np.abs(value.astype(np.float64) if value.dtype.kind in "iub" else value)))
                else:
                    m = 0.0
                absmax[name] = max(absmax.get(name, 0.0), m)
                del value
            del values
        del sess
        release_memory()
        _logger.debug("range pass: chunk %d/%d (%d tensors) done", k + 1, len(chunks), len(chunk))
    return absmax, len(chunks)


def nodes_over_range(model_path: str | os.PathLike, absmax: Mapping[str, float], data_max: float,
                     skip: Sequence[str] = ()) -> tuple[list[str], dict[str, float]]:
    """AutoCast's ``IORangeRule``: the nodes (not Constants) with an input or output whose |x| exceeds ``data_max``.

    Initializers are not activations and are not checked (AutoCast's ``init_max`` rule covers them). Returns the
    node names (graph order, ``skip`` left out) and the offending tensors with their max |x|.
    """
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    skip = set(skip)
    kept, over = [], {}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            continue
        bad = [t for t in list(node.input) + list(node.output) if t and absmax.get(t, 0.0) > data_max]
        if bad:
            over.update({t: absmax[t] for t in bad})
            if node.name not in skip:
                kept.append(node.name)
    return kept, over


def range_feeds(model_path: str | os.PathLike, inputs: Optional[np.ndarray], seed: int = 0,
                input_name: str = "image") -> tuple[list[dict[str, np.ndarray]], str]:
    """The feeds of the range pass: ``inputs`` (one sample per run) if given, else one seeded uniform(-1, 1) sample
    of the input's shape (symbolic dims 1), the distribution AutoCast's ReferenceRunner draws."""
    import onnx

    if inputs is not None and len(inputs):
        return ([{input_name: np.ascontiguousarray(x[None], dtype=np.float32)} for x in inputs],
                f"{len(inputs)} held-out image(s)")
    proto = onnx.load(str(model_path), load_external_data=False)
    inp = next(i for i in proto.graph.input if i.name == input_name)
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim]
    x = np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)
    return [{input_name: x}], f"1 seeded uniform(-1, 1) input (seed {seed})"


def convert_fp16(onnx_path: str | os.PathLike, out_path: str | os.PathLike, keep_fp32_nodes: Sequence[str],
                 keep_fp32_op_types: Sequence[str], *, data_max: float = DATA_MAX,
                 range_inputs: Optional[np.ndarray] = None, range_chunk_bytes: int = RANGE_CHUNK_BYTES,
                 range_report: Optional[dict] = None, seed: int = 0) -> Path:
    """Write an FP16 model with the given nodes and op types kept FP32; graph inputs/outputs stay FP32.

    Besides ``keep_fp32_nodes``/``keep_fp32_op_types``, nodes whose activations exceed ``data_max`` stay FP32
    (AutoCast's rule, applied with bounded memory by :func:`activation_absmax` on ``range_inputs`` [N, 3, H, W]
    or one seeded random input; ``data_max=inf`` turns the rule off). When ``range_report`` is a dict it receives
    :meth:`RangeRule.to_dict` (for the manifest).

    AutoCast reads a private copy of ``onnx_path`` in ``out_path``'s folder (see :func:`_strip_value_info`), never the
    user's file; its log follows -q/-v (see :func:`~invpt.calib.int8.modelopt_logging`). A failure inside AutoCast is
    a :class:`~invpt.errors.ToolError`.
    """
    import time

    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as err:
        raise DependencyError("nvidia-modelopt is not installed; install the calib extra: pip install 'invpt[calib]'.") from err
    import onnx

    out_path = Path(out_path)
    keep = list(keep_fp32_nodes)
    with tempfile.TemporaryDirectory(prefix=".invpt-input.", dir=out_path.parent) as tmp:
        clean = Path(tmp) / "input.onnx"
        _strip_value_info(Path(onnx_path), clean)
        release_memory()
        rule = None
        if data_max is not None and np.isfinite(data_max):
            t0 = time.perf_counter()
            feeds, desc = range_feeds(clean, range_inputs, seed)
            try:
                absmax, sessions = activation_absmax(clean, feeds, range_chunk_bytes)
            except Exception as err:
                raise ToolError.from_exception("onnxruntime", "measuring activation ranges of a copy of the model "
                                               "for FP16", err) from err
            skip_ops = set(keep_fp32_op_types)
            graph = onnx.load(str(clean), load_external_data=False)
            already = set(keep) | {n.name for n in graph.graph.node if n.op_type in skip_ops}
            del graph
            kept, over = nodes_over_range(clean, absmax, data_max, skip=sorted(already))
            rule = RangeRule(float(data_max), desc, kept, over, sessions, time.perf_counter() - t0)
            _logger.info("FP16 data-range rule (|x| > %g on %s): %d more node(s) kept in FP32 (%d session(s), %.1f s)",
                         data_max, desc, len(kept), sessions, rule.seconds)
            keep += kept
            del absmax, feeds
        if range_report is not None:
            range_report.clear()
            range_report.update(rule.to_dict() if rule else {"data_max": None})
        release_memory()  # hand the range pass's (and the caller's reference pass's) freed memory back first
        with modelopt_logging(cpu_only=True), _checks_by_path(clean):
            try:
                proto = convert_to_mixed_precision(
                    str(clean),
                    low_precision_type="fp16",
                    nodes_to_exclude=exact_name_regexes(keep),
                    op_types_to_exclude=list(keep_fp32_op_types),
                    keep_io_types=True,
                    providers=["cpu"],
                    data_max=np.inf,  # the range rule ran above, with bounded memory
                    # Type inference without ONNX's shape inference, which serialises and re-parses the whole model
                    # with its weights (~4 extra copies of a 1.6 GB ViT-L); the graph it gives is the same (tested).
                    use_standalone_type_inference=True,
                )
            except Exception as err:  # any failure inside AutoCast (invpt checked the model before)
                raise ToolError.from_exception("ModelOpt AutoCast", "converting a copy of the model to FP16", err,
                                               "nvidia-modelopt") from err
        big = proto.ByteSize() > 1_800_000_000
        onnx.save_model(proto, str(out_path), save_as_external_data=big, location=out_path.name + ".data")
        del proto
        release_memory()
    return out_path
