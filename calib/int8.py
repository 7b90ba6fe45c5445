"""INT8 explicit quantization (Q/DQ) calibrated on real samples.

``entropy`` and ``max`` use NVIDIA ModelOpt's ONNX PTQ (the tool TensorRT 11 documents); ``percentile``
uses onnxruntime's ``quantize_static`` (ModelOpt has no percentile INT8 calibrator). Both quantize
Conv/MatMul/Gemm with per-channel weight scales and leave the excluded nodes in FP32.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from invpt.calib.policy import QUANTIZABLE_OPS, exact_name_regexes
from invpt.errors import DependencyError, ExportError, InputError

_logger = logging.getLogger(__name__)

CALIB_METHODS = ("entropy", "max", "percentile")
PER_NODE_CALIBRATION_BYTES = 256 * 2**20
MAX_CALIBRATION_BATCH = 16


def calibration_batch(onnx_path: str | os.PathLike, num_samples: int, input_name: str = "image") -> tuple[int, bool]:
    """(samples per calibration step, whether the model's batch is dynamic).

    A static-batch model is fed in its own batch. A dynamic-batch model is fed the largest divisor of
    ``num_samples`` up to ``MAX_CALIBRATION_BATCH``, so that every step has the same shape. Batching matters
    for node-by-node calibration, which builds one ONNX Runtime session per node per step: a ViT-L step took about
    21 minutes at batch 1 and 34 at batch 8 on 2 cores, so 8 samples in one step instead of 8 saves over 2 hours.
    """
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    inp = next((i for i in proto.graph.input if i.name == input_name), None)
    if inp is None:
        raise InputError(f"'{onnx_path}' has no input named '{input_name}'; was it written by invpt-export?")
    dim = inp.type.tensor_type.shape.dim[0]
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return dim.dim_value, False
    return max(b for b in range(1, min(num_samples, MAX_CALIBRATION_BATCH) + 1) if num_samples % b == 0), True


def calibrates_per_node(onnx_path: str | os.PathLike, per_node: bool | None = None) -> bool:
    """Whether ModelOpt calibrates ``onnx_path`` node by node: ``per_node`` if given, else for models over 256 MB.

    Whole-graph calibration keeps every intermediate tensor of every sample until it builds the histograms
    (ViT-L: 229 s and ~21 GiB for 2 samples; 8 samples exceeded 24 GB); node-by-node calibration bounds memory
    but builds one ONNX Runtime session per node per step (about 1 s a node on 2 CPU cores: 21-34 min a step for
    ViT-L). Where RAM allows, whole-graph calibration of a few samples is much faster.
    """
    if per_node is not None:
        return bool(per_node)
    return Path(onnx_path).stat().st_size > PER_NODE_CALIBRATION_BYTES


def quantize_int8(onnx_path: str | os.PathLike, out_path: str | os.PathLike, calib: np.ndarray, method: str,
                  exclude_nodes: Sequence[str], input_name: str = "image", per_node: bool | None = None) -> Path:
    """Write a Q/DQ INT8 model of ``onnx_path`` calibrated on ``calib`` [N, 3, H, W].

    ``per_node`` picks ModelOpt's node-by-node calibration (see ``calibrates_per_node``; None = by model size).
    The onnxruntime ``percentile`` path has no such mode and ignores it.
    """
    if method not in CALIB_METHODS:
        raise InputError(f"Unknown calibration method '{method}'; use one of {', '.join(CALIB_METHODS)}.")
    if calib is None or len(calib) == 0:
        raise InputError("INT8 needs calibration samples; invpt never calibrates on random data (pass --calib-data).")
    out_path = Path(out_path)
    batch, dynamic = calibration_batch(onnx_path, len(calib), input_name)
    if len(calib) % batch:
        raise InputError(f"'{onnx_path}' has a static batch of {batch}; give a multiple of {batch} calibration "
                         f"samples (got {len(calib)}).")
    if method == "percentile":
        _quantize_ort(Path(onnx_path), out_path, calib, exclude_nodes, input_name, batch)
    else:
        _quantize_modelopt(Path(onnx_path), out_path, calib, method, exclude_nodes, input_name, batch, dynamic,
                           calibrates_per_node(onnx_path, per_node))
    return out_path


def _quantize_modelopt(src: Path, out: Path, calib: np.ndarray, method: str, exclude: Sequence[str], input_name: str,
                       batch: int, dynamic: bool, per_node: bool) -> None:
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as err:
        raise DependencyError("nvidia-modelopt is not installed; install the calib extra: pip install 'invpt[calib]'.") from err
    level = "DEBUG" if logging.getLogger("invpt").isEnabledFor(logging.DEBUG) else "WARNING"
    steps = len(calib) // batch
    _logger.info("INT8 %s calibration: %d sample(s) in %d step(s) of batch %d%s", method, len(calib), steps, batch,
                 ", node by node (bounded memory)" if per_node else ", whole graph")
    if per_node and not dynamic and steps > 1:
        _logger.warning(
            "'%s' has a static batch of %d, so node-by-node calibration walks the whole graph %d times (about 20 "
            "minutes each for ViT-L on 2 CPU cores). Export with --dynamic-batch to calibrate in batches of up to %d.",
            src, batch, steps, MAX_CALIBRATION_BATCH)
    shapes = f"{input_name}:" + "x".join(str(d) for d in (batch, *calib.shape[1:])) if dynamic else None
    try:
        quantize(
            str(src),
            quantize_mode="int8",
            calibration_data={input_name: calib},
            calibration_method=method,
            calibration_shapes=shapes,
            calibration_eps=["cpu"],
            op_types_to_quantize=list(QUANTIZABLE_OPS),
            nodes_to_exclude=exact_name_regexes(exclude),
            high_precision_dtype="fp32",
            output_path=str(out),
            log_level=level,
            use_external_data_format=src.stat().st_size > 1_800_000_000,
            calibrate_per_node=per_node,  # see calibrates_per_node
            # Weights stored as INT8 initializers + DequantizeLinear (TensorRT's offline-quantized weight form)
            # instead of FP32 weights + QuantizeLinear/DequantizeLinear: same numbers, ~4x smaller weights on disk.
            dq_only=True,
        )
    except Exception as err:
        raise ExportError(f"ModelOpt INT8 quantization of '{src}' failed: {str(err).splitlines()[0][:300]}") from err
    if not out.exists():
        raise ExportError(f"ModelOpt reported success but wrote no '{out}'.")


class _ArrayReader:
    """onnxruntime CalibrationDataReader over an array, ``batch`` samples per call."""

    def __init__(self, name: str, data: np.ndarray, batch: int = 1) -> None:
        self._it = iter([{name: data[i:i + batch]} for i in range(0, len(data), batch)])

    def get_next(self):
        return next(self._it, None)


def _quantize_ort(src: Path, out: Path, calib: np.ndarray, exclude: Sequence[str], input_name: str, batch: int) -> None:
    """Percentile calibration with onnxruntime, in a fresh process.

    ModelOpt patches onnxruntime's calibrators process-wide when it runs, after which ``quantize_static``
    fails ("Histogram has not been collected"); a spawned process keeps the two tools apart.
    """
    import multiprocessing
    import tempfile

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        data = Path(tmp) / "calib.npy"
        np.save(data, calib)
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            error = pool.apply(_ort_worker, (str(src), str(out), str(data), list(exclude), input_name, batch))
    if error:
        raise ExportError(f"onnxruntime percentile quantization of '{src}' failed: {error}")
    detach_float_consumers(out, FLOAT_ONLY_OPS)


def _ort_worker(src: str, out: str, data: str, exclude: list, input_name: str, batch: int) -> str:
    """Runs in the spawned process; returns an error line or ''."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    try:
        quantize_static(
            src, out, _ArrayReader(input_name, np.load(data), batch),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZABLE_OPS), per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
            calibrate_method=CalibrationMethod.Percentile,
            use_external_data_format=Path(src).stat().st_size > 1_800_000_000,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    except Exception as err:
        return str(err).splitlines()[0][:300] if str(err) else type(err).__name__
    return ""


FLOAT_ONLY_OPS = ("LayerNormalization", "Softmax", "Resize")


def detach_float_consumers(path: Path, op_types: Sequence[str]) -> int:
    """Make ``op_types`` nodes read the float tensor instead of a DequantizeLinear output; drop orphaned Q/DQ.

    onnxruntime shares one Q/DQ pair among all consumers of a tensor, so a Resize that reads the same
    tensor as a quantized Conv would otherwise see INT8-rounded values. Returns the number of rewired inputs.
    """
    import onnx

    proto = onnx.load(str(path))
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    rewired = 0
    for node in g.node:
        if node.op_type not in op_types:
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]
                rewired += 1
    if rewired:
        changed = True
        while changed:  # remove Q/DQ nodes whose outputs nobody reads any more
            used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
            dead = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in used]
            changed = bool(dead)
            for n in dead:
                g.node.remove(n)
        onnx.save_model(proto, str(path), save_as_external_data=proto.ByteSize() > 1_800_000_000,
                        location=path.name + ".data")
        _logger.info("rewired %d Resize/LayerNorm/Softmax input(s) to float tensors", rewired)
    return rewired
