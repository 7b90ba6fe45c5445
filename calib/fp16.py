"""FP16 mixed precision with NVIDIA ModelOpt AutoCast (TensorRT 11 takes precision from the ONNX).

Memory: AutoCast's own data-range rule (keep in FP32 the nodes whose inputs or outputs exceed ``data_max``) runs a
``ReferenceRunner`` that marks *every* tensor of the graph as an output of one ONNX Runtime session and keeps them
all (plus two more copies of the model): for ViT-L that pass alone went past 23.8 GB. invpt applies the same rule
with bounded memory (:func:`activation_absmax`: a few ONNX Runtime sessions, each exposing a chunk of the
intermediate tensors at a time, keeping only each tensor's max |x|) and passes the nodes it selects to AutoCast as
nodes to exclude, with ``data_max=inf``, which skips its reference pass.

AutoCast's ``convert_to_mixed_precision`` then loads every weight into its model and its converter deep-copies it
(two copies of a 1.6 GB ViT-L plus the FP16 weights: 8.9 GiB at the stage's peak). invpt runs the same AutoCast steps
on the graph alone, its weights left in the private copy's external-data file (:func:`_lean_autocast`), and writes
the output one weight at a time, converted by AutoCast's own conversion (:func:`_fp16_plan`): the FP16 model is the
one AutoCast writes (``tests/test_fp16_memory.py``) and no copy of the model is ever held. The private copy's graph is
read once and handed to every step.
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
from invpt.onnx_summary import GraphSummary, WrittenOnnx, read_summary
from invpt.preflight import release_memory

_logger = logging.getLogger(__name__)

# AutoCast's default: FP16's unit in the last place is 0.5 at 512, so values beyond it stay FP32.
DATA_MAX = 512.0
# Bytes of intermediate tensors one range-pass session exposes at a time (bounds the pass's memory beyond the model).
RANGE_CHUNK_BYTES = 2 * 2**30
# Weights go to an external-data file in the private copy above this size (shape inference then reads no weights).
EXTERNAL_DATA_BYTES = 64 * 2**20
# Limit of _checks_by_path (no longer used by the conversion, which checks every graph by path: _checks_beside).
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

    No longer used by :func:`convert_fp16_model` (AutoCast now holds the graph alone, checked by path in
    :func:`_checks_beside`); kept while ``tests/test_memory.py`` still tests it.

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


def _strip_value_info(src: Path, dst: Path, external_over: int = EXTERNAL_DATA_BYTES):
    """Copy a model without intermediate shape annotations (``src`` is only read; ``dst`` is a new file).

    AutoCast copies stale ``value_info`` shapes onto the Casts it inserts around the message-passing
    Resize, which ONNX Runtime then rejects; without them shapes are inferred afresh and correctly.

    This copy is also AutoCast's private input (in the stage's staging folder): like
    :func:`~invpt.artifacts.private_copy`, it keeps the library away from the user's file, and since it has to be
    written anyway no second copy is made. Above ``external_over`` bytes its weights go to ``dst.name + ".data"``:
    AutoCast then infers types on the graph alone (a 1.6 GB model is otherwise serialised again for shape
    inference), and the range pass's sessions share the one weight file.

    Returns the copy's ``ModelProto`` as saved: with external data, the graph alone (its weights are references into
    the data file), which the FP16 steps use instead of reading the copy again.
    """
    import onnx

    proto = onnx.load(str(src))
    del proto.graph.value_info[:]
    onnx.save_model(proto, str(dst), save_as_external_data=proto.ByteSize() > external_over,
                    all_tensors_to_one_file=True, location=dst.name + ".data", size_threshold=1024)
    if not proto.graph.initializer or any(i.data_location != onnx.TensorProto.EXTERNAL and i.ByteSize() > 1024
                                          for i in proto.graph.initializer):
        return proto  # the weights are in it
    from invpt.export.onnx_export import compact_copy

    return compact_copy(proto)  # saving made the weights references in place; the copy drops their memory


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
                      chunk_bytes: int = RANGE_CHUNK_BYTES, threads: Optional[int] = None, *,
                      graph=None) -> tuple[dict[str, float], int]:
    """Max |x| over ``feeds`` of every node input/output of ``model_path``, with bounded memory.

    The node outputs are split, in graph order, into chunks of about ``chunk_bytes`` (sizes from ONNX shape
    inference, symbolic dims taken as the feed's batch); for each chunk one ONNX Runtime session exposes just those
    tensors as extra outputs, runs every feed and keeps one float per tensor. The session is released before the
    next one opens. Peak memory is one session plus one chunk, instead of every tensor of the graph at once
    (AutoCast's ``ReferenceRunner``). Each chunk's model is a small graph file beside ``model_path`` that points at the
    same external-data file, so the weights are never copied. Returns (name -> absmax, sessions opened); graph
    inputs are measured from the feeds themselves. ``graph``: the file's ``ModelProto`` when the caller holds it (not
    read again; its outputs are changed during the pass and put back at the end).
    """
    import onnx

    model_path = Path(model_path)
    graph_only = graph if graph is not None else onnx.load(str(model_path), load_external_data=False)
    outputs = []
    for o in graph_only.graph.output:
        keep = onnx.ValueInfoProto()
        keep.CopyFrom(o)
        outputs.append(keep)
    try:
        return _activation_absmax(model_path, graph_only, feeds, chunk_bytes, threads)
    finally:
        del graph_only.graph.output[:]
        graph_only.graph.output.extend(outputs)


def _activation_absmax(model_path: Path, graph_only, feeds, chunk_bytes: int,
                       threads: Optional[int]) -> tuple[dict[str, float], int]:
    import onnx
    import onnxruntime as ort

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
                     skip: Sequence[str] = (), *, graph=None) -> tuple[list[str], dict[str, float]]:
    """AutoCast's ``IORangeRule``: the nodes (not Constants) with an input or output whose |x| exceeds ``data_max``.

    Initializers are not activations and are not checked (AutoCast's ``init_max`` rule covers them). Returns the
    node names (graph order, ``skip`` left out) and the offending tensors with their max |x|. ``graph``: the file's
    ``ModelProto`` when the caller holds it (not read again).
    """
    import onnx

    proto = graph if graph is not None else onnx.load(str(model_path), load_external_data=False)
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
                input_name: str = "image", *,
                summary: Optional[GraphSummary] = None) -> tuple[list[dict[str, np.ndarray]], str]:
    """The feeds of the range pass: ``inputs`` (one sample per run) if given, else one seeded uniform(-1, 1) sample
    of the input's shape (symbolic dims 1), the distribution AutoCast's ReferenceRunner draws. ``summary``: the
    file's :class:`~invpt.onnx_summary.GraphSummary` when the caller has it (the file is then not read)."""
    if inputs is not None and len(inputs):
        return ([{input_name: np.ascontiguousarray(x[None], dtype=np.float32)} for x in inputs],
                f"{len(inputs)} held-out image(s)")
    inp = (summary or read_summary(model_path)).input(input_name)
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    x = np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)
    return [{input_name: x}], f"1 seeded uniform(-1, 1) input (seed {seed})"


@contextmanager
def _checks_beside(folder: Path) -> Iterator[None]:
    """Inside the block, ModelOpt's ``check_model`` checks a model by path, from a graph file written in ``folder``.

    AutoCast runs ``onnx.checker`` on the model it holds, before and after converting it. invpt hands it the graph
    alone, its weights left as references into the external-data file in ``folder`` (see :func:`_lean_autocast`); the
    checker resolves those references against a file's folder, so an in-memory check of such a model fails although
    the model is valid. Here the same check runs on the graph saved beside its weights (kilobytes to megabytes), so
    nothing is skipped. The original function is put back on exit.
    """
    import onnx
    import modelopt.onnx.utils as mo_utils

    original = mo_utils.check_model

    def check_model(model) -> None:
        fd, name = tempfile.mkstemp(suffix=".onnx", prefix=".check.", dir=folder)
        os.close(fd)
        try:
            onnx.save_model(model, name)
            onnx.checker.check_model(name)
        finally:
            os.unlink(name)

    mo_utils.check_model = check_model
    try:
        yield
    finally:
        mo_utils.check_model = original


def _read_tensor(t, folder: Path):
    """A copy of ``t`` with its data loaded from its external-data file in ``folder`` (as onnx.load would)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    full = onnx.TensorProto()
    full.CopyFrom(t)
    if full.data_location == onnx.TensorProto.EXTERNAL:
        load_external_data_for_tensor(full, str(folder))
        full.data_location = onnx.TensorProto.DEFAULT
        del full.external_data[:]
    return full


def _external_key(t) -> Optional[tuple[str, int]]:
    """(location, offset) of an external-data tensor: where its bytes are, whatever its name."""
    info = {e.key: e.value for e in t.external_data}
    return (info["location"], int(info.get("offset", 0))) if "location" in info else None


def _initializer_range_nodes(model, folder: Path, init_max: float) -> list[str]:
    """AutoCast's ``InitializerRangeRule``, one weight in memory at a time: the nodes with an FP32 initializer input
    whose |x| exceeds ``init_max`` (read from the external-data file in ``folder``)."""
    import onnx

    inits = {i.name: i for i in model.graph.initializer}
    over: dict[str, bool] = {}
    kept = []
    for node in model.graph.node:
        for name in node.input:
            t = inits.get(name)
            if t is None or t.data_type != onnx.TensorProto.FLOAT:
                continue
            if name not in over:
                arr = onnx.numpy_helper.to_array(_read_tensor(t, folder))
                over[name] = bool(arr.size) and float(np.max(np.abs(arr))) > float(init_max)
                del arr
            if over[name]:
                kept.append(node.name)
                break
    return kept


def _lean_autocast(clean: Path, graph, nodes_to_exclude: Sequence[str], op_types_to_exclude: Sequence[str]):
    """AutoCast's FP16 conversion (``convert_to_mixed_precision`` with ``keep_io_types=True``, ``data_max=inf``,
    standalone type inference) on the graph alone; returns ``(model, converter)``.

    ``convert_to_mixed_precision`` loads every weight into its model once the graph is sanitised, and its
    ``PrecisionConverter`` deep-copies that model (two 1.6 GB copies for ViT-L, plus the FP16 initializers: the FP16
    stage's peak). Here the same steps run in the same order (GraphSanitizer, type inference, NodeClassifier,
    PrecisionConverter) on ``graph``, the model whose weights stay references into ``clean``'s external-data file.
    Converting an external FP32 initializer to FP16 is deferred: the converter records the new type and keeps the
    reference to the FP32 bytes; :func:`_fp16_plan` converts each such tensor with AutoCast's own conversion while
    the file is written, one tensor in memory at a time. The two rules that read weights are applied the same way:
    the data-range rule ran before (:func:`activation_absmax`), and ``init_max`` is applied here
    (:func:`_initializer_range_nodes`) with the nodes it selects passed as nodes to exclude, as the rule would.
    """
    from modelopt.onnx.autocast import convert as ac_convert
    from modelopt.onnx.autocast import utils as ac_utils
    from modelopt.onnx.autocast.graphsanitizer import GraphSanitizer
    from modelopt.onnx.autocast.nodeclassifier import NodeClassifier
    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter
    import modelopt.onnx.utils as mo_utils

    class _DeferredConverter(PrecisionConverter):
        """AutoCast's converter, except that an external-data initializer is not read: its conversion is recorded
        (new type, same reference to the source bytes) and done when the file is written."""

        def _convert_initializer_data(self, init, from_type, to_type):
            import onnx

            if init.data_location != onnx.TensorProto.EXTERNAL:
                return super()._convert_initializer_data(init, from_type, to_type)
            t = onnx.TensorProto()
            t.dims.extend(init.dims)
            t.name = init.name
            t.data_type = to_type.onnx_type
            t.data_location = onnx.TensorProto.EXTERNAL
            t.external_data.extend(init.external_data)
            return t

        def _cleanup_no_consumer_nodes(self):
            """AutoCast's own clean-up rule (remove every node none of whose outputs is consumed by a node or is a
            network output), with the consumed tensor names collected once. ModelOpt asks ``get_consumer_nodes``,
            a scan of every node, for every output of every node: quadratic in the graph (half of the tiny model's
            conversion time). Same nodes removed, in the same order (tests/test_fp16_memory.py compares the result
            with AutoCast's own to the byte)."""
            network_outputs = {o.name for o in self.model.graph.output}
            consumed = {name for node in self.model.graph.node for name in node.input}
            dead = [node for node in self.model.graph.node
                    if not any(out in network_outputs or out in consumed for out in node.output)]
            for node in dead:
                if node.op_type != "Cast":  # AutoCast adds only Casts; anything else came with the model
                    _logger.debug("AutoCast clean-up: removing non-Cast node with no consumers: %s (%s)", node.name,
                                  node.op_type)
                self.model.graph.node.remove(node)

    folder = clean.parent
    model = graph
    io_metadata = {"input": [_copy(v) for v in model.graph.input], "output": [_copy(v) for v in model.graph.output]}
    sanitizer = GraphSanitizer(model, 13, trt_plugins=[], trt_plugins_precision=[],
                               max_ir_version=ac_convert.LATEST_IR_VERSION_SUPPORTED_BY_ORT, onnx_path=str(clean))
    sanitizer.sanitize()
    model = sanitizer.model
    if sanitizer.custom_ops:  # AutoCast would run its reference pass (all tensors at once) for them
        raise ToolError(f"'{clean.name}' has custom ops {sorted(sanitizer.custom_ops)}; invpt's FP16 conversion "
                        "handles standard ONNX ops only (an invpt-export graph has no others).")
    model = mo_utils.infer_types(model, True, strict_mode=True)
    value_info_map, initializer_map, node_to_init_map = ac_utils.setup_mappings(model)
    init_kept = _initializer_range_nodes(model, folder, ac_convert.DEFAULT_INIT_MAX)
    if init_kept:
        _logger.info("FP16 initializer-range rule (|w| > %g): %d more node(s) kept in FP32",
                     ac_convert.DEFAULT_INIT_MAX, len(init_kept))
    classifier = NodeClassifier(
        model, node_to_init_map, initializer_map,
        nodes_to_exclude=list(nodes_to_exclude) + exact_name_regexes(init_kept),
        op_types_to_exclude=list(op_types_to_exclude), nodes_to_include=[], op_types_to_include=[],
        data_max=np.inf, init_max=None, custom_rule=None, max_depth_of_reduction=None,
        custom_ops_low_precision_nodes=sanitizer.custom_ops_low_precision_nodes or [])
    converter = _DeferredConverter(
        model, value_info_map, initializer_map, node_to_init_map, keep_io_types=True, low_precision_type="fp16",
        init_conversion_max_bytes=None, custom_ops=sanitizer.custom_ops, use_standalone_type_inference=True,
        original_network_io_metadata=io_metadata, sanitize_model=False)
    low, high = classifier.run(None)
    with _checks_beside(folder):
        converted = converter.convert(high, low)
    _logger.info("AutoCast: converted %d/%d nodes to fp16", len(low), len(low) + len(high))
    return converted, converter


def _copy(message):
    out = type(message)()
    out.CopyFrom(message)
    return out


def _fp16_plan(source_graph, folder: Path, converter):
    """The plan of :func:`~invpt.export.onnx_export.write_streamed` for AutoCast's converted graph: each initializer's
    bytes read from the source's external-data file in ``folder``, converted (AutoCast's own conversion, one tensor
    at a time) where the converter changed its type, as they are otherwise."""
    import onnx

    from invpt.export.onnx_export import inline_plan

    sources = {_external_key(t): t for t in source_graph.graph.initializer if _external_key(t) is not None}
    inline = inline_plan(folder)
    base_convert = super(type(converter), converter)._convert_initializer_data

    def plan(t):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return t, None, None
        src = sources[_external_key(t)]
        if t.data_type == src.data_type:  # kept as it was: its bytes as they are
            return inline(t)
        meta = onnx.TensorProto()  # what AutoCast's conversion (numpy_helper.from_array) makes, less the data
        meta.CopyFrom(t)
        meta.ClearField("external_data")
        meta.ClearField("data_location")
        from_type = converter._precision_type_from_onnx_type(src.data_type)
        to_type = converter._precision_type_from_onnx_type(t.data_type)
        n = int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize

        def data() -> bytes:
            new = base_convert(_read_tensor(src, folder), from_type, to_type)
            return new.raw_data

        return meta, n, data

    return plan


@dataclass
class Fp16Output:
    """What :func:`convert_fp16_model` wrote: the file (sha256 hashed while writing, summary, external data), its
    graph without weight data (for the graph audit) and the data-range rule's record."""

    written: WrittenOnnx
    graph: object  # onnx.ModelProto of the written file, initializers without their data
    range_rule: Optional[RangeRule]

    @property
    def path(self) -> Path:
        return self.written.path


def convert_fp16_model(onnx_path: str | os.PathLike, out_path: str | os.PathLike, keep_fp32_nodes: Sequence[str],
                       keep_fp32_op_types: Sequence[str], *, data_max: float = DATA_MAX,
                       range_inputs: Optional[np.ndarray] = None, range_chunk_bytes: int = RANGE_CHUNK_BYTES,
                       seed: int = 0) -> Fp16Output:
    """Write an FP16 model with the given nodes and op types kept FP32; graph inputs/outputs stay FP32.

    Besides ``keep_fp32_nodes``/``keep_fp32_op_types``, nodes whose activations exceed ``data_max`` stay FP32
    (AutoCast's rule, applied with bounded memory by :func:`activation_absmax` on ``range_inputs`` [N, 3, H, W]
    or one seeded random input; ``data_max=inf`` turns the rule off), and so do nodes with an FP32 weight beyond
    FP16's range (AutoCast's ``init_max`` rule).

    AutoCast reads a private copy of ``onnx_path`` in ``out_path``'s folder (see :func:`_strip_value_info`), never the
    user's file, and converts its graph without its weights (:func:`_lean_autocast`); the output file is then written
    one weight at a time (:func:`~invpt.export.onnx_export.write_streamed`), so the stage holds no copy of the model.
    The copy's graph is read once and passed to every step. Its log follows -q/-v (see
    :func:`~invpt.calib.int8.modelopt_logging`). A failure inside AutoCast is a :class:`~invpt.errors.ToolError`.
    """
    import time

    try:
        import modelopt.onnx.autocast  # noqa: F401
    except ImportError as err:
        raise DependencyError("nvidia-modelopt is not installed; install the calib extra: pip install 'invpt[calib]'.") from err
    from invpt.export.onnx_export import EXTERNAL_DATA_THRESHOLD, write_streamed

    out_path = Path(out_path)
    keep = list(keep_fp32_nodes)
    with tempfile.TemporaryDirectory(prefix=".invpt-input.", dir=out_path.parent) as tmp:
        clean = Path(tmp) / "input.onnx"
        # Every weight external (whatever the size): AutoCast and the range pass then read the graph alone.
        graph = _strip_value_info(Path(onnx_path), clean, external_over=0)
        release_memory()
        summary = GraphSummary.from_proto(graph)
        rule = None
        if data_max is not None and np.isfinite(data_max):
            t0 = time.perf_counter()
            feeds, desc = range_feeds(clean, range_inputs, seed, summary=summary)
            try:
                absmax, sessions = activation_absmax(clean, feeds, range_chunk_bytes, graph=graph)
            except Exception as err:
                raise ToolError.from_exception("onnxruntime", "measuring activation ranges of a copy of the model "
                                               "for FP16", err) from err
            already = set(keep) | set(summary.ops(*keep_fp32_op_types))
            kept, over = nodes_over_range(clean, absmax, data_max, skip=sorted(already), graph=graph)
            rule = RangeRule(float(data_max), desc, kept, over, sessions, time.perf_counter() - t0)
            _logger.info("FP16 data-range rule (|x| > %g on %s): %d more node(s) kept in FP32 (%d session(s), %.1f s)",
                         data_max, desc, len(kept), sessions, rule.seconds)
            keep += kept
            del absmax, feeds
        release_memory()  # hand the range pass's (and the caller's reference pass's) freed memory back first
        source = _copy(graph)  # where each initializer's bytes are, before AutoCast renames or retypes it
        with modelopt_logging(cpu_only=True):
            try:
                converted, converter = _lean_autocast(clean, graph, exact_name_regexes(keep), keep_fp32_op_types)
            except ToolError:
                raise
            except Exception as err:  # any failure inside AutoCast (invpt checked the model before)
                raise ToolError.from_exception("ModelOpt AutoCast", "converting a copy of the model to FP16", err,
                                               "nvidia-modelopt") from err
            del graph
            written = write_streamed(converted, out_path, _fp16_plan(source, Path(tmp), converter),
                                     external_over=EXTERNAL_DATA_THRESHOLD, error_cls=ToolError)
        for init in converted.graph.initializer:  # the audit needs names and types, not the references into tmp
            init.ClearField("external_data")
            init.ClearField("data_location")
        release_memory()
    return Fp16Output(written, converted, rule)


def convert_fp16(onnx_path: str | os.PathLike, out_path: str | os.PathLike, keep_fp32_nodes: Sequence[str],
                 keep_fp32_op_types: Sequence[str], *, data_max: float = DATA_MAX,
                 range_inputs: Optional[np.ndarray] = None, range_chunk_bytes: int = RANGE_CHUNK_BYTES,
                 range_report: Optional[dict] = None, seed: int = 0) -> Path:
    """:func:`convert_fp16_model`, returning the written path. When ``range_report`` is a dict it receives
    :meth:`RangeRule.to_dict` (for the manifest)."""
    res = convert_fp16_model(onnx_path, out_path, keep_fp32_nodes, keep_fp32_op_types, data_max=data_max,
                             range_inputs=range_inputs, range_chunk_bytes=range_chunk_bytes, seed=seed)
    if range_report is not None:
        range_report.clear()
        range_report.update(res.range_rule.to_dict() if res.range_rule else {"data_max": None})
    return res.path
