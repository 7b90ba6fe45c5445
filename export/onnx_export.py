"""PyTorch -> ONNX for InvPT, with graph hygiene built in.

The torch.onnx dynamo exporter gives clean graphs (no shape arithmetic, matmul not Einsum, one
``Resize`` per interpolate call site, ``LayerNormalization`` at opset >= 17). After export, nodes are
renamed after the model module that produced them (``multi_task_decoder.invpt.invpt_stages.1.blocks.0.attn/MatMul``),
so precision policies, Netron and TensorRT's engine inspector all speak in model terms.
"""
from __future__ import annotations

import ast
import dataclasses
import logging
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import torch
from torch import nn

from invpt.artifacts import publish, staging_dir
from invpt.errors import ExportError, ToolError
from invpt.preflight import release_memory
from invpt.onnx_summary import GraphSummary, WrittenOnnx
from invpt.export.opsets import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, TRT10_MAX_OPSET  # noqa: F401 (re-exported)

_logger = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)  # protobuf's hard limit is 2 GiB for the whole file
WRAPPER_ATTR = "model"
ExternalData = Literal["auto", "always", "never"]


class OnnxExportWrapper(nn.Module):
    """Flat-tuple view of InvPT for export: ``image`` in, one raw map per task out, in task order.

    ``tasks`` selects heads; the model then skips the compute only other heads need.
    """

    def __init__(self, model: nn.Module, tasks: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.model = model
        self.tasks = tuple(model.resolve_tasks(tasks))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(image, tasks=self.tasks)
        return tuple(out[t] for t in self.tasks)


def check_opset(opset: int) -> None:
    """Reject opsets the exporter cannot produce reliably, with the reason and the fix."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"--opset {opset} is not supported: the torch.onnx dynamo exporter produces opsets {MIN_OPSET}-{MAX_OPSET} "
            f"reliably (it exports {MIN_OPSET} natively; converting down to 17 or lower can fail silently, and "
            f"LayerNormalization needs 17+). Use --opset {DEFAULT_OPSET} (TensorRT 10.3+ and 11.x parse it)."
        )
    if opset > TRT10_MAX_OPSET:
        _logger.warning("opset %d is newer than TensorRT 10.x parsers accept (<= %d); only TensorRT 11 will parse it",
                        opset, TRT10_MAX_OPSET)


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.state_dict().values())


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    batch: int = 1,
    dynamic_batch: bool = False,
    tasks: Optional[Sequence[str]] = None,
    external_data: ExternalData = "auto",
    metadata: Optional[dict[str, str]] = None,
) -> Path:
    """Export ``model`` to ``path`` (a new file; written atomically together with any ``.data`` file).

    See :func:`export_graph` (which also returns the written graph and its summary) for the arguments.
    """
    export_graph(model, path, opset=opset, batch=batch, dynamic_batch=dynamic_batch, tasks=tasks,
                 external_data=external_data, metadata=metadata)
    return Path(path)


def export_graph(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    batch: int = 1,
    dynamic_batch: bool = False,
    tasks: Optional[Sequence[str]] = None,
    external_data: ExternalData = "auto",
    metadata: Optional[dict[str, str]] = None,
):
    """Export ``model`` to ``path`` and return ``(proto, summary)``: the ``ModelProto`` as saved (its large weights
    are references into the ``.data`` file when they went there, so it is then the graph alone) and its
    :class:`~invpt.onnx_summary.GraphSummary`, so that the stage's next steps need not read the file again.

    Args:
        model: an InvPT in eval mode, built with ``fused_attn=False`` for plain MatMul/Softmax nodes.
        opset: ONNX opset (18-23).
        batch: static batch size (ignored with ``dynamic_batch``).
        dynamic_batch: make dimension 0 of every input/output symbolic (``batch``).
        tasks: subset of heads to export (default all).
        external_data: store weights in ``<file>.data``: always, never, or auto (when over 1.8 GB).
        metadata: string key/values stored in the ONNX ``metadata_props``.

    Raises:
        ExportError: the exporter failed, or the output path cannot be written.
    """
    check_opset(opset)
    path = Path(path)
    wrapper = OnnxExportWrapper(model, tasks).eval()
    h, w = model.cfg.image_size
    # The dynamo exporter specialises size-1 dims, so a dynamic batch needs an example batch of 2.
    example = torch.randn(2 if dynamic_batch else batch, 3, h, w)
    dynamic_shapes = {"image": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic_batch else None
    use_external = external_data == "always" or (external_data == "auto" and param_bytes(model) > EXTERNAL_DATA_THRESHOLD)

    with staging_dir(path, ExportError) as tmp_dir:
        tmp = tmp_dir / path.name
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                program = torch.onnx.export(
                    wrapper,
                    (example,),
                    dynamo=True,
                    opset_version=opset,
                    input_names=["image"],
                    output_names=list(wrapper.tasks),
                    dynamic_shapes=dynamic_shapes,
                    optimize=True,
                    verbose=False,
                )
            except Exception as err:  # the exporter crashed on a model and opset invpt had already checked
                raise ToolError.from_exception(
                    "torch.onnx", f"exporting at opset {opset} (if it is not the default, try --opset {DEFAULT_OPSET})",
                    err, distribution="torch") from err
        proto = program.model_proto
        # The exported program holds the exporter's IR, including the constants its optimizer folded (e.g. transposed
        # weights: ~1.6 GB for ViT-L); released before saving makes one more copy (the serialised bytes).
        del program
        release_exporter_state()
        release_memory()
        rename_nodes_by_module(proto)
        for k, v in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        proto.producer_name = "invpt"
        save_onnx(proto, tmp, use_external)  # in place: saved external tensors become references into the file
        if use_external:
            proto = compact_copy(proto)
        summary = GraphSummary.from_proto(proto)
        publish(tmp_dir, path, list(summary.external_data), error_cls=ExportError)
    return proto, summary


def release_exporter_state() -> int:
    """Make onnxscript forget the last graph its rewrite rules matched; returns the number of matchers reset.

    torch.onnx's optimizer runs onnxscript's rewrite rules, module-level objects whose matchers keep a reference to
    the last graph they matched (``_graph``, ``_match``...). That graph is the whole exported IR: its initializers
    wrap the model's own tensors and the constants the optimizer folded, so after an export the model's weights stayed
    alive although the model was freed (for a memory-mapped checkpoint its pages stayed resident too), the baseline
    of every later phase. The matchers set these attributes afresh on every match.
    """
    import gc

    try:
        from onnxscript.rewriter import _matcher
    except ImportError:  # another onnxscript layout: nothing known to reset
        return 0
    matcher_type = getattr(_matcher, "PatternMatcher", None)
    if matcher_type is None:
        return 0
    n = 0
    for obj in gc.get_objects():
        # The object's type, not isinstance(): ABCMeta's instance check reads obj.__class__, and the gc's objects
        # include the deprecated torch.distributed.reduce_op, whose every attribute access warns (FutureWarning).
        if issubclass(type(obj), matcher_type):
            for attr in ("_graph", "_current_node", "_match", "_tracer"):
                if getattr(obj, attr, None) is not None:
                    setattr(obj, attr, None)
            n += 1
    return n


def compact_copy(proto):
    """A new copy of ``proto`` holding only what it holds now; the original's memory is freed with it.

    Protobuf (upb) allocates a message's fields in one arena that lives as long as the message: clearing a field
    (``onnx.save_model`` with external data clears every ``raw_data`` it wrote out) does not free its bytes. A graph
    whose weights were just saved to an external-data file therefore still held their full size in memory (~1.6 GB
    for ViT-L); the copy holds the graph alone.
    """
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def save_onnx(proto, path: Path, external: bool) -> None:
    """Save a ModelProto; with ``external`` all weights go to ``<name>.data`` beside it."""
    import onnx

    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def external_data_files(path: str | os.PathLike) -> list[str]:
    """Names of the external-data files an ONNX file refers to (empty for a self-contained file)."""
    from invpt.onnx_summary import read_summary

    return list(read_summary(path).external_data)


def module_path_of(node) -> Optional[str]:
    """The model module (dotted path) an exported node came from, from the dynamo exporter's metadata."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            modules = [s for s in scopes[:-1] if s]
            if not modules:
                return ""
            scope = modules[-1]
            prefix = WRAPPER_ATTR + "."
            return scope[len(prefix):] if scope.startswith(prefix) else ("" if scope == WRAPPER_ATTR else scope)
    return None


def rename_nodes_by_module(proto) -> None:
    """Rename every node ``<module path>/<OpType>`` (plus ``_k`` for repeats) so names say where nodes come from."""
    seen: Counter[str] = Counter()
    for node in proto.graph.node:
        scope = module_path_of(node)
        if scope is None:
            continue
        base = f"{scope or 'model'}/{node.op_type}"
        node.name = base if seen[base] == 0 else f"{base}_{seen[base]}"
        seen[base] += 1


# ---- writing a model whose weights are streamed in, one tensor at a time ---------------------------------------------

TensorPlan = tuple  # (meta TensorProto without its raw data, number of data bytes or None, callable giving the bytes)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _field(number: int, payload_len: int) -> bytes:
    """Tag and length of a length-delimited protobuf field."""
    return _varint((number << 3) | 2) + _varint(payload_len)


_GRAPH, _INITIALIZER, _RAW_DATA = 7, 5, 9  # ModelProto.graph, GraphProto.initializer, TensorProto.raw_data


def inline_plan(base_dir: str | os.PathLike) -> Callable:
    """The plan of :func:`write_streamed` that puts each external-data tensor's bytes back into the file, as read from
    its data file (offset and length) under ``base_dir``; tensors already inline are written as they are."""
    import onnx

    base_dir = Path(base_dir)

    def plan(t):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return t, None, None
        info = {e.key: e.value for e in t.external_data}
        meta = onnx.TensorProto()
        meta.CopyFrom(t)
        meta.ClearField("external_data")
        meta.ClearField("data_location")
        offset, length = int(info.get("offset", 0)), int(info["length"])
        location = base_dir / info["location"]

        def data() -> bytes:
            with open(location, "rb") as f:
                f.seek(offset)
                return f.read(length)

        return meta, length, data

    return plan


def write_streamed(proto, path: str | os.PathLike, plan: Callable, *, external_over: Optional[int] = None,
                   error_cls: type = ExportError) -> WrittenOnnx:
    """Write ``proto`` (its graph without weight data: external references or placeholders) to ``path``, with every
    initializer's data produced one tensor at a time by ``plan(tensor) -> (meta, n, data)``: ``meta`` is the tensor to
    write without its raw data, ``n`` the number of data bytes and ``data()`` returns them (``n`` None: write ``meta``
    as it is). Returns what was written (sha256 hashed while writing, the graph summary, the external-data files).

    Memory is one tensor's bytes, never the model: the file is written as the model's other fields, then its graph
    field, whose initializers are serialised one at a time after the rest of the graph (protobuf accepts fields in any
    order; ONNX's loaders, ONNX Runtime and TensorRT parse it as any other file). The graph field's length is known
    beforehand from the plan's sizes. When the file would exceed ``external_over`` bytes, the data goes to
    ``<name>.data`` beside it instead and the tensors refer to it (protobuf cannot hold more than 2 GiB).
    """
    import hashlib

    import onnx

    path = Path(path)
    inits = []
    for init in proto.graph.initializer:
        t = onnx.TensorProto()
        t.CopyFrom(init)
        inits.append(t)
    shell = onnx.ModelProto()
    shell.CopyFrom(proto)
    shell.graph.ClearField("initializer")
    graph = shell.graph.SerializeToString()
    shell.ClearField("graph")
    head = shell.SerializeToString()
    del shell

    plans = [plan(t) for t in inits]
    inline_bytes = len(head) + len(graph) + sum(m.ByteSize() + (n or 0) for m, n, _ in plans)
    external_location = path.name + ".data" if external_over is not None and inline_bytes > external_over else None
    out_inits = []
    data_file = None
    if external_location is not None:
        data_file = open(path.parent / external_location, "wb")
    try:
        offset = 0
        sizes = []
        for meta, n, data in plans:
            if n is not None and data_file is not None:  # point the tensor at its place in the data file
                ext = onnx.TensorProto()
                ext.CopyFrom(meta)
                ext.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", external_location), ("offset", str(offset)), ("length", str(n))):
                    entry = ext.external_data.add()
                    entry.key, entry.value = k, v
                out_inits.append((ext, None))
                offset += n
                sizes.append(ext.ByteSize())
            else:
                out_inits.append((meta, n))
                sizes.append(meta.ByteSize() + (0 if n is None else len(_field(_RAW_DATA, n)) + n))
        graph_len = len(graph) + sum(len(_field(_INITIALIZER, s)) + s for s in sizes)
        digest = hashlib.sha256()
        with open(path, "wb") as f:
            def put(b: bytes) -> None:
                f.write(b)
                digest.update(b)

            put(head)
            put(_field(_GRAPH, graph_len))
            put(graph)
            for (meta, n), size, (_, n_data, data) in zip(out_inits, sizes, plans):
                put(_field(_INITIALIZER, size))
                blob = meta.SerializeToString()
                if n is None:
                    if n_data is not None:  # external output: the bytes go to the data file
                        chunk = data()
                        if len(chunk) != n_data:
                            raise error_cls(f"'{meta.name}' gave {len(chunk)} bytes, {n_data} expected, while "
                                            f"'{path.name}' was written; run again.")
                        data_file.write(chunk)
                        del chunk
                    if len(blob) != size:
                        raise error_cls(f"internal: tensor '{meta.name}' serialised to {len(blob)} bytes, {size} "
                                        "planned.")
                    put(blob)
                    continue
                chunk = data()
                if len(chunk) != n or len(blob) + len(_field(_RAW_DATA, n)) + n != size:
                    raise error_cls(f"The data of tensor '{meta.name}' changed size while '{path.name}' was written "
                                    f"({len(chunk)} bytes, {n} expected); run again.")
                put(blob)
                put(_field(_RAW_DATA, n))
                put(chunk)
                del chunk
            f.flush()
            os.fsync(f.fileno())
        if data_file is not None:
            data_file.flush()
            os.fsync(data_file.fileno())
    finally:
        if data_file is not None:
            data_file.close()
    # The summary of what was written: the graph with its tensors as written (no data).
    summary_proto = onnx.ModelProto()
    summary_proto.CopyFrom(proto)
    summary_proto.graph.ClearField("initializer")
    summary_proto.graph.initializer.extend(meta for meta, _ in out_inits)
    summary = GraphSummary.from_proto(summary_proto)
    size_fix = sum(n for meta, n in out_inits if n is not None)  # inline data is not in the metas
    summary = dataclasses.replace(summary, initializer_bytes=summary.initializer_bytes + size_fix)
    return WrittenOnnx(path, digest.hexdigest(), summary, summary.external_data)
