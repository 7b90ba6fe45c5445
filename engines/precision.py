"""The precision check that runs before every build, on CPU, with either backend.

An engine that says FP16 and runs FP32 is the failure this stage exists to prevent (TensorRT 11 and TensorRT-RTX
take precision from the ONNX alone: a graph whose casts were stripped builds happily, in FP32). So before building,
the parsed network is compared with what the ONNX's manifest promises:

* ``fp16``: the share of MatMul/Convolution work (FLOPs) computed in FP16 reaches the policy's figure (the share
  of the MatMul/Conv nodes the policy does not keep), and every compute layer the policy keeps (LayerNorm, Softmax,
  attention scores) computes in FP32;
* ``int8``: the ONNX has every Q/DQ pair its manifest records, every Q/DQ node appears in the network, and every
  MatMul/Conv the policy quantizes consumes dequantized inputs; LayerNorm, Softmax and Resize are not quantized;
* ``fp32``: no MatMul/Conv computes in a reduced precision;
* always: the network's I/O names, dtypes and shapes equal the manifest's.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from invpt.errors import VerificationError
from invpt.engines.network import GEMM_TYPES, NetworkSummary
from invpt.manifest import Manifest

_logger = logging.getLogger(__name__)

FP16_SHARE_SLACK = 0.005  # absolute: rounding in the FLOP count, never a policy exception
KEPT_COMPUTE_TYPES = ("NORMALIZATION", "SOFTMAX", "MATRIX_MULTIPLY", "CONVOLUTION", "DECONVOLUTION", "REDUCE",
                      "ELEMENTWISE", "UNARY", "ACTIVATION")
NEVER_INT8_TYPES = ("NORMALIZATION", "SOFTMAX", "RESIZE")
_MANIFEST_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "int8", "int32": "int32",
                    "int64": "int64", "uint8": "uint8", "bool": "bool"}


def _kept_nodes(manifest: Manifest, onnx_path: Path, precision: str) -> tuple[set[str], str]:
    """The nodes the ONNX's policy keeps in high precision, and the policy's name."""
    pol = manifest.precision_policy
    if pol is not None and "kept_nodes" in pol:  # recorded (an empty list included)
        return set(pol.kept_nodes), pol.name or "?"
    from invpt.calib.policy import select_nodes

    cfg = manifest.model_config
    sel = select_nodes(onnx_path, precision, "default", (), manifest.tasks, cfg.backbone.depth)
    _logger.warning("manifest of %s records no precision policy; checking against the default %s policy",
                    onnx_path.name, precision)
    return set(sel.kept_nodes), "default (assumed)"


def _io_problems(summary: NetworkSummary, manifest: Manifest) -> list[str]:
    problems = []
    for side, net_io, man_io in (("input", summary.inputs, manifest.inputs), ("output", summary.outputs, manifest.outputs)):
        want = {t.name: (_MANIFEST_DTYPES.get(t.dtype, t.dtype), [d if isinstance(d, int) else -1 for d in t.shape])
                for t in man_io}
        got = {t["name"]: (t["dtype"], t["shape"]) for t in net_io}
        if set(want) != set(got):
            problems.append(f"network {side}s {sorted(got)} differ from the manifest's {sorted(want)}")
            continue
        for name, w in want.items():
            if got[name] != w:
                problems.append(f"{side} '{name}' is {got[name][0]} {got[name][1]} in the network but {w[0]} {w[1]} "
                                "in the manifest")
    return problems


def _onnx_qdq(onnx_path: Path) -> tuple[set[str], set[str], dict[str, int], dict[str, int], list[str]]:
    """Q and DQ node names, DQ-consumer counts by op type, DQ-fed input counts of each Conv/MatMul/Gemm node, and
    the Conv/MatMul/Gemm nodes with a Q/DQ pair on only one of their two operands (the other pair is missing)."""
    import onnx

    from invpt.calib.policy import QUANTIZABLE_OPS

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    dq_out = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
    consumers: dict[str, int] = {}
    fed: dict[str, int] = {}
    half: list[str] = []
    for n in g.node:
        k = sum(1 for i in n.input if i in dq_out)
        if n.op_type in QUANTIZABLE_OPS and sum(1 for i in n.input[:2] if i in dq_out) == 1:
            half.append(n.name)
        if k:
            consumers[n.op_type] = consumers.get(n.op_type, 0) + k
            if n.op_type in QUANTIZABLE_OPS:
                fed[n.name] = k
    return ({n.name for n in g.node if n.op_type == "QuantizeLinear"},
            {n.name for n in g.node if n.op_type == "DequantizeLinear"}, consumers, fed, sorted(half))


def _examples(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_precision(summary: NetworkSummary, manifest: Manifest, onnx_path: Path, precision: str) -> dict[str, Any]:
    """Compare the parsed network with the manifest; raise VerificationError on any violation, else the report."""
    problems = _io_problems(summary, manifest)
    gemm = [l for l in summary.layers if l.type in GEMM_TYPES]
    total = sum(l.flops for l in gemm) or 1
    report: dict[str, Any] = {"precision": precision}
    hint = ""
    if precision == "fp16":
        kept, policy = _kept_nodes(manifest, onnx_path, precision)
        expected = sum(l.flops for l in gemm if l.onnx_node is not None and l.onnx_node not in kept)
        actual = sum(l.flops for l in gemm if l.dtype == "fp16")
        report.update(policy=policy, policy_fp16_share=round(expected / total, 4), fp16_share=round(actual / total, 4))
        if actual / total < expected / total - FP16_SHARE_SLACK:
            fp32 = [l.onnx_node for l in gemm if l.onnx_node is not None and l.onnx_node not in kept and l.dtype != "fp16"]
            problems.append(
                f"only {100 * actual / total:.1f} % of MatMul/Conv work computes in FP16, the policy '{policy}' puts "
                f"{100 * expected / total:.1f} % there (in FP32 instead: {_examples(fp32)})")
            hint = ("The ONNX does not carry its FP16 casts (edited or stripped?): regenerate it with "
                    "invpt-quantize --precision fp16, or build from the FP32 ONNX with --fp16.")
        upcast = [f"{l.onnx_node} ({l.type} in {l.dtype})" for l in summary.layers
                  if l.onnx_node in kept and l.type in KEPT_COMPUTE_TYPES and l.dtype in ("fp16", "bf16", "int8")]
        if upcast:
            problems.append(f"layers the policy keeps in FP32 compute in reduced precision: {_examples(sorted(set(upcast)))}")
            hint = hint or "Regenerate the FP16 ONNX with invpt-quantize --precision fp16 (its policy keeps them FP32)."
    elif precision == "int8":
        kept, policy = _kept_nodes(manifest, onnx_path, precision)
        q_nodes, dq_nodes, consumers, fed, half = _onnx_qdq(onnx_path)
        audit = manifest.precision_policy.graph if manifest.precision_policy else {}
        report.update(policy=policy, onnx_quantize_linear=len(q_nodes), onnx_dequantize_linear=len(dq_nodes),
                      onnx_quantized_nodes=len(fed))
        for what, have, key in (("QuantizeLinear", len(q_nodes), "quantize_linear"),
                                ("DequantizeLinear", len(dq_nodes), "dequantize_linear")):
            if key in audit and audit[key] != have:
                problems.append(f"the ONNX has {have} {what} nodes but its manifest records {audit[key]} "
                                "(a Q/DQ pair is missing)")
        for op, want in sorted((audit.get("dq_consumers") or {}).items()):
            if consumers.get(op, 0) != want:
                problems.append(f"{consumers.get(op, 0)} {op} input(s) of the ONNX consume a DequantizeLinear but its "
                                f"manifest records {want} (a Q/DQ pair is missing)")
        if half:
            problems.append(f"{len(half)} MatMul/Conv node(s) consume a Q/DQ pair on one operand only (a Q/DQ pair is "
                            f"missing on the other): {_examples(half)}")
        unexpected = sorted(n for n in fed if n in kept)
        if unexpected:
            problems.append(f"node(s) the policy '{policy}' keeps in high precision are quantized: {_examples(unexpected)}")
        net_q = {l.onnx_node for l in summary.layers if l.type == "QUANTIZE"}
        net_dq = {l.onnx_node for l in summary.layers if l.type == "DEQUANTIZE"}
        lost = sorted((q_nodes - net_q) | (dq_nodes - net_dq))
        if lost:
            problems.append(f"{len(lost)} Q/DQ node(s) of the ONNX are not in the network: {_examples(lost)}")
        layer_dq = {}
        for l in gemm:
            if l.onnx_node:
                layer_dq[l.onnx_node] = max(layer_dq.get(l.onnx_node, 0), l.dq_inputs)
        unquantized = sorted(n for n, k in fed.items() if layer_dq.get(n, 0) < k)
        if unquantized:
            problems.append(f"{len(unquantized)} quantized MatMul/Conv node(s) of the ONNX do not consume their Q/DQ "
                            f"inputs in the network: {_examples(unquantized)}")
        bad = sorted({f"{l.onnx_node} ({l.type})" for l in summary.layers
                      if l.type in NEVER_INT8_TYPES and l.dtype in ("int8", "fp8")})
        if bad:
            problems.append(f"layers the policy never quantizes compute in INT8: {_examples(bad)}")
        actual = sum(l.flops for l in gemm if l.dtype == "int8")
        report.update(quantized_gemm_layers=sum(1 for l in gemm if l.dtype == "int8"),
                      int8_share=round(actual / total, 4))
        if problems:
            hint = "Regenerate the INT8 ONNX with invpt-quantize --precision int8 (do not edit its Q/DQ nodes)."
    else:
        reduced = [l.onnx_node or l.name for l in gemm if l.dtype not in ("fp32",)]
        if reduced:
            problems.append(f"the manifest says FP32 but {len(reduced)} MatMul/Conv layer(s) compute in reduced "
                            f"precision: {_examples(reduced)}")
            hint = "Build it with --fp16/--int8 from the FP32 ONNX, or fix the manifest's precision."
    report["summary"] = summary.to_dict()
    report["violations"] = problems
    report["passed"] = not problems
    if problems:
        raise VerificationError(
            f"Precision check failed for '{onnx_path}' (asked for {precision.upper()}): " + "; ".join(problems)
            + f". Nothing was built. {hint}".rstrip())
    return report
