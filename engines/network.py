"""Parsing an ONNX file into a strongly typed TensorRT network, and describing what that network computes.

Runs on CPU with either backend (no engine is built or loaded here). Every layer the ONNX parser creates carries
the ONNX node it came from in its metadata (``[ONNX Layer: <node name>]``), and invpt-export names nodes after
model modules, so a layer maps back to a model term such as ``backbone.block.3`` or ``head.normals``.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from invpt.errors import ExportError
from invpt.engines.backend import Backend

_logger = logging.getLogger(__name__)

_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]*)\]")
# Layers that only move or view data: walked through when looking for the DequantizeLinear that feeds a MatMul/Conv.
_PASS_THROUGH = ("SHUFFLE", "IDENTITY", "SQUEEZE", "UNSQUEEZE")
GEMM_TYPES = ("CONVOLUTION", "DECONVOLUTION", "MATRIX_MULTIPLY")
DTYPE_NAMES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16", "INT8": "int8", "FP8": "fp8", "INT32": "int32",
               "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "INT4": "int4", "FP4": "fp4"}


@dataclass
class ParsedNetwork:
    """A parsed network plus the objects that must outlive it (builder, parser, logger)."""

    backend: Backend
    builder: Any
    network: Any
    parser: Any
    logger: Any
    onnx_path: Path
    parse_s: float = 0.0


def model_terms(node: str, tasks: Sequence[str], depth: int) -> list[str]:
    """The model terms (``invpt-quantize --list-terms``) a node name belongs to, most specific first."""
    from invpt.calib.policy import term_patterns

    hits = [t for t, rx in term_patterns(tasks, depth).items() if re.search(rx, node)]
    return sorted(hits, key=lambda t: ("attention_scores" in t, t))


def _parse_error_hint(code: str, op: str) -> str:
    if code in ("UNSUPPORTED_NODE", "INVALID_NODE", "UNSUPPORTED_NODE_ATTR", "UNSUPPORTED_NODE_INPUT",
                "UNSUPPORTED_NODE_DATATYPE", "UNSUPPORTED_NODE_DYNAMIC"):
        return (f"this backend has no importer for op '{op}' as used here: export the model with invpt-export "
                "(standard opset 17-21 ops only), or build with a backend whose ONNX operator support lists it "
                "(see the TensorRT ONNX operator matrix)")
    if code in ("MODEL_DESERIALIZE_FAILED", "INVALID_GRAPH", "INVALID_VALUE"):
        return "the file is not a valid ONNX model: check it with `python -m onnx.checker` or re-export it"
    return "check the node in Netron; re-export with invpt-export if the file was edited by hand"


def parse_onnx(backend: Backend, onnx_path: Path, tasks: Sequence[str] = (), depth: int = 0) -> ParsedNetwork:
    """Parse ``onnx_path`` into a strongly typed network; errors name the node, its op, its model term and a hint."""
    import time

    trt = backend.trt
    logger = backend.logger()
    builder = trt.Builder(logger)
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # TensorRT 10.0+; a no-op in 11.x and RTX
    network = builder.create_network(flag)
    parser = trt.OnnxParser(network, logger)
    t0 = time.perf_counter()
    ok = parser.parse_from_file(str(onnx_path))  # reads external data next to the file
    parse_s = time.perf_counter() - t0
    if not ok or parser.num_errors:
        problems = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            code = str(e.code()).split(".")[-1]
            node_name, op = e.node_name() or "", e.node_operator() or ""
            where = f"node '{node_name}'" if node_name else f"node #{e.node()}"
            terms = model_terms(node_name, tasks, depth) if node_name and tasks else []
            term = f", model term {terms[0]}" if terms else (
                f", module {node_name.rsplit('/', 1)[0]}" if "/" in node_name else "")
            problems.append(f"{where} (op {op or '?'}{term}): {e.desc()} [{code}]; hint: {_parse_error_hint(code, op)}")
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ExportError(f"{backend.describe()} cannot parse '{onnx_path}': {shown or 'unknown parser failure'}.")
    _logger.info("parsed %s: %d layers in %.1fs", onnx_path.name, network.num_layers, parse_s)
    return ParsedNetwork(backend, builder, network, parser, logger, onnx_path, parse_s)


def dtype_name(dtype: Any) -> str:
    return DTYPE_NAMES.get(str(dtype).split(".")[-1], str(dtype).split(".")[-1].lower())


def layer_type_name(layer: Any) -> str:
    return str(layer.type).split(".")[-1]


def onnx_node_of(layer: Any) -> Optional[str]:
    """The ONNX node a layer came from: its metadata (TensorRT 10.x+), else, where the module has no layer
    metadata, the layer name (the ONNX parser names layers after their node)."""
    if not hasattr(layer, "metadata"):
        return layer.name
    m = _ONNX_LAYER.search(layer.metadata or "")
    return m.group(1) if m else None


def _dims(shape: Any, batch: int) -> list[int]:
    return [batch if int(d) < 0 else int(d) for d in shape]


def _volume(dims: Sequence[int]) -> int:
    v = 1
    for d in dims:
        v *= d
    return v


@dataclass
class LayerInfo:
    index: int
    name: str
    type: str
    dtype: str  # the dtype it computes in: its first output's dtype; "int8" for a MatMul/Conv fed by Q/DQ
    onnx_node: Optional[str]
    flops: int = 0  # MatMul/Conv only, multiply-add = 2
    dq_inputs: int = 0  # MatMul/Conv inputs that come from a DequantizeLinear


@dataclass
class NetworkSummary:
    layers: list[LayerInfo]
    inputs: list[dict]
    outputs: list[dict]
    by_type: dict = field(default_factory=dict)
    by_dtype: dict = field(default_factory=dict)
    by_type_dtype: dict = field(default_factory=dict)
    gemm_flops_by_dtype: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        total = sum(self.gemm_flops_by_dtype.values()) or 1
        return {
            "layers": len(self.layers),
            "by_type": self.by_type,
            "by_dtype": self.by_dtype,
            "by_type_dtype": self.by_type_dtype,
            "matmul_conv_gflops_by_dtype": {k: round(v / 1e9, 4) for k, v in self.gemm_flops_by_dtype.items()},
            "matmul_conv_flop_share": {k: round(v / total, 4) for k, v in self.gemm_flops_by_dtype.items()},
            "inputs": self.inputs,
            "outputs": self.outputs,
        }


def _gemm_flops(trt: Any, layer: Any, kind: str, batch: int) -> int:
    out = _dims(layer.get_output(0).shape, batch)
    try:
        if kind == "MATRIX_MULTIPLY":
            layer.__class__ = trt.IMatrixMultiplyLayer
            a = _dims(layer.get_input(0).shape, batch)
            op0 = str(layer.op0).split(".")[-1]
            k = a[-2] if op0 == "TRANSPOSE" and len(a) >= 2 else a[-1]
            return 2 * _volume(out) * k
        cls = trt.IConvolutionLayer if kind == "CONVOLUTION" else trt.IDeconvolutionLayer
        layer.__class__ = cls
        kernel = _volume(list(layer.kernel_size_nd))
        groups = max(int(layer.num_groups), 1)
        if kind == "CONVOLUTION":
            cin = _dims(layer.get_input(0).shape, batch)[1]
            return 2 * _volume(out) * (cin // groups) * kernel
        x = _dims(layer.get_input(0).shape, batch)
        return 2 * _volume(x) * (int(layer.num_output_maps) // groups) * kernel
    except Exception as err:  # an unexpected layer shape must not stop the summary; it is counted as 0
        _logger.debug("no FLOP count for %s (%s)", layer.name, err)
        return 0


def summarize_network(parsed: ParsedNetwork, batch: int = 1) -> NetworkSummary:
    """Layers by type, by the dtype they compute in, MatMul/Conv FLOPs per dtype, and the network's I/O."""
    trt, net = parsed.backend.trt, parsed.network
    producer: dict[str, Any] = {}
    for i in range(net.num_layers):
        layer = net.get_layer(i)
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = layer

    def from_dequantize(tensor: Any) -> bool:
        seen = 0
        while tensor is not None and seen < 8:
            src = producer.get(tensor.name)
            if src is None:
                return False
            kind = layer_type_name(src)
            if kind == "DEQUANTIZE":
                return True
            if kind not in _PASS_THROUGH:
                return False
            tensor, seen = src.get_input(0), seen + 1
        return False

    layers: list[LayerInfo] = []
    for i in range(net.num_layers):
        layer = net.get_layer(i)
        kind = layer_type_name(layer)
        dtype = dtype_name(layer.get_output(0).dtype) if layer.num_outputs else "none"
        info = LayerInfo(i, layer.name, kind, dtype, onnx_node_of(layer))
        if kind in GEMM_TYPES:
            ins = [layer.get_input(k) for k in range(layer.num_inputs)]
            info.dq_inputs = sum(1 for t in ins if t is not None and from_dequantize(t))
            if info.dq_inputs:
                info.dtype = "int8"
            info.flops = _gemm_flops(trt, layer, kind, batch)
        layers.append(info)

    def io(t: Any) -> dict:
        return {"name": t.name, "dtype": dtype_name(t.dtype), "shape": [int(d) for d in t.shape]}

    s = NetworkSummary(layers, [io(net.get_input(i)) for i in range(net.num_inputs)],
                       [io(net.get_output(i)) for i in range(net.num_outputs)])
    s.by_type = dict(sorted(Counter(l.type for l in layers).items()))
    s.by_dtype = dict(sorted(Counter(l.dtype for l in layers).items()))
    by_td: dict[str, dict[str, int]] = {}
    for l in layers:
        by_td.setdefault(l.type, {}).setdefault(l.dtype, 0)
        by_td[l.type][l.dtype] += 1
    s.by_type_dtype = dict(sorted(by_td.items()))
    flops: Counter = Counter()
    for l in layers:
        if l.type in GEMM_TYPES:
            flops[l.dtype] += l.flops
    s.gemm_flops_by_dtype = dict(sorted(flops.items()))
    return s
