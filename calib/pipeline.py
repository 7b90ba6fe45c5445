"""The calib stage end to end: FP32 ONNX + manifest -> FP16 or INT8 ONNX + manifest, verified per task.

Outputs are produced in a staging folder and moved into place only after the graph checks and the
held-out parity check passed, so a failure leaves no file behind.
"""
from __future__ import annotations

import gc
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from invpt.artifacts import publish, staging_dir
from invpt.calib.data import CalibrationData, load_calibration_data
from invpt.calib.evaluate import PRECISION_TOLERANCES, evaluate, reference_outputs, run_onnx_batches, task_table
from invpt.calib.fp16 import convert_fp16
from invpt.calib.int8 import CALIB_METHODS, calibrates_per_node, quantize_int8
from invpt.calib.policy import select_nodes
from invpt.errors import InputError, ManifestError, VerificationError
from invpt.export.graph_checks import check_graph
from invpt.export.onnx_export import external_data_files
from invpt.export.parity import ParityReport
from invpt.manifest import Manifest, load_manifest_for, manifest_path_for, now_iso, sha256_file, tool_versions

_logger = logging.getLogger(__name__)

NEVER_QUANTIZED = ("LayerNormalization", "Softmax", "Resize")


@dataclass
class QuantizeResult:
    onnx_path: Path
    manifest_path: Path
    manifest: Manifest
    parity: Optional[ParityReport]
    task_metrics: dict
    sensitivity: Optional[dict] = None
    timings: dict = field(default_factory=dict)  # seconds per phase: data, reference, sensitivity, convert, parity


def default_out(onnx_path: Path, precision: str) -> Path:
    """``model.onnx`` -> ``model.fp16.onnx`` / ``model.int8.onnx``."""
    return onnx_path.with_name(f"{onnx_path.stem}.{precision}.onnx")


def graph_audit(path: Path) -> dict:
    """What the produced graph contains: Q/DQ pairs and what consumes them, Casts, op census."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    dq_into = Counter(c.op_type for n in proto.graph.node if n.op_type == "DequantizeLinear" for c in consumers.get(n.output[0], []))
    ops = Counter(n.op_type for n in proto.graph.node)
    inits = {i.name for i in proto.graph.initializer}
    weight_q = {n.output[0] for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits}
    return {
        "quantize_linear": ops["QuantizeLinear"],
        "dequantize_linear": ops["DequantizeLinear"],
        "dq_consumers": dict(sorted(dq_into.items())),
        "per_channel_weight_dq": sum(1 for n in proto.graph.node if n.op_type == "DequantizeLinear"
                                     and any(a.name == "axis" for a in n.attribute)
                                     and (n.input[0] in inits or n.input[0] in weight_q)),
        "casts": ops["Cast"],
        "nodes": len(proto.graph.node),
    }


def _load_reference_model(manifest: Manifest, ckpt: Optional[str]):
    """The FP32 PyTorch model for parity: --ckpt, else the manifest's parent checkpoint if it is still there."""
    from invpt import load_model

    path = ckpt or (manifest.parent or {}).get("path")
    if path and Path(path).is_file():
        if not ckpt and manifest.parent.get("sha256") and sha256_file(path) != manifest.parent["sha256"]:
            _logger.warning("checkpoint %s changed since export (sha256 differs); using the FP32 ONNX as reference", path)
            return None
        return load_model(path, config=manifest.config, fused_attn=False)
    _logger.info("checkpoint not available; the reference is the FP32 ONNX (verified against PyTorch at export)")
    return None


def run_quantize(
    onnx_path: str | os.PathLike,
    precision: str,
    out: Optional[str | os.PathLike] = None,
    *,
    policy: str = "default",
    keep_terms: Sequence[str] = (),
    calib_data: Optional[str | os.PathLike] = None,
    calib_samples: int = 32,
    holdout_samples: int = 4,
    calib_method: str = "entropy",
    seed: int = 0,
    cache_dir: Optional[str | os.PathLike] = None,
    dataset_hint: Optional[str] = None,
    split: str = "val",
    ckpt: Optional[str] = None,
    verify: bool = True,
    sensitivity: bool = False,
    budgets: Optional[Mapping[str, float]] = None,
    command: Optional[str] = None,
    allow_mismatch: bool = False,
    calibrate_per_node: Optional[bool] = None,
) -> QuantizeResult:
    """Produce a verified FP16 or INT8 ONNX plus manifest from an exported FP32 ONNX. See ``invpt-quantize --help``.

    A parity failure raises ``VerificationError`` and writes nothing, unless ``allow_mismatch``: then the file is
    written with ``verification.passed = false`` in its manifest (for benchmarks and for inspecting a bad model), and
    the caller decides what to do with ``result.parity.passed``. ``calibrate_per_node`` forces ModelOpt's
    node-by-node (True) or whole-graph (False) calibration; None picks by model size.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise InputError(f"ONNX file '{onnx_path}' does not exist. Export one first: invpt-export --ckpt CKPT.")
    manifest = load_manifest_for(onnx_path)
    if manifest.precision != "fp32" or manifest.kind != "onnx":
        raise ManifestError(
            f"'{onnx_path}' is a {manifest.precision} {manifest.kind}; invpt-quantize starts from the FP32 ONNX written "
            "by invpt-export."
        )
    if precision not in PRECISION_TOLERANCES:
        raise InputError(f"--precision must be fp16 or int8, got '{precision}'.")
    if precision == "int8" and calib_method not in CALIB_METHODS:
        raise InputError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, got '{calib_method}'.")
    if precision == "int8" and not calib_data:
        raise InputError(
            "INT8 needs --calib-data (a PASCAL-Context/NYUD-v2 root, an image folder or a video); invpt never "
            "calibrates on random data."
        )
    out = Path(out) if out else default_out(onnx_path, precision)
    cfg = manifest.model_config
    tasks = manifest.tasks
    specs = [s for s in cfg.task_specs if s.name in tasks]

    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    data: Optional[CalibrationData] = None
    if calib_data:
        data = load_calibration_data(calib_data, manifest.preprocessing, calib_samples if precision == "int8" else 1,
                                     holdout_samples, seed, cache_dir, dataset_hint, split)
        holdout = data.holdout
        holdout_desc = f"{len(holdout)} held-out image(s) from {calib_data}, disjoint from the calibration samples"
    else:
        holdout = np.random.default_rng(seed).standard_normal((max(holdout_samples, 1), 3, *cfg.image_size), dtype=np.float32)
        holdout_desc = f"{len(holdout)} seeded random input(s) (no --calib-data given)"

    selection = select_nodes(onnx_path, precision, policy, keep_terms, tasks, cfg.backbone.depth)
    per_node = calibrates_per_node(onnx_path, calibrate_per_node)  # ModelOpt only; percentile ignores it
    lap("data_s")
    sens_report = None
    with staging_dir(out, InputError) as staging:
        reference_model = _load_reference_model(manifest, ckpt) if verify or sensitivity else None
        ref, ref_name = (reference_outputs(holdout, tasks, reference_model, onnx_path) if (verify or sensitivity)
                         else ({}, ""))
        del reference_model  # ~1.7 GB for ViT-L; quantization needs the memory
        gc.collect()
        lap("reference_s")
        if sensitivity:
            if precision != "int8":
                raise InputError("--sensitivity applies to --precision int8.")
            from invpt.calib.sensitivity import run_sensitivity

            sens_report = run_sensitivity(onnx_path, staging, data, ref, specs, selection, calib_method, cfg, budgets,
                                          per_node=per_node)
            extra = sens_report.get("search", {}).get("keep_blocks", [])
            if extra:
                selection = select_nodes(onnx_path, precision, policy, list(keep_terms) + list(extra), tasks,
                                         cfg.backbone.depth)
            lap("sensitivity_s")
        tmp_out = staging / out.name
        if precision == "fp16":
            convert_fp16(onnx_path, tmp_out, selection.kept_nodes, selection.policy.keep_op_types)
        else:
            quantize_int8(onnx_path, tmp_out, data.calib, calib_method, selection.kept_nodes, per_node=per_node)
        check_graph(tmp_out)
        audit = graph_audit(tmp_out)
        if precision == "int8":
            bad = {op: n for op, n in audit["dq_consumers"].items() if op in NEVER_QUANTIZED}
            if bad:
                raise VerificationError(f"INT8 graph has Q/DQ feeding {bad}; the policy forbids quantizing {NEVER_QUANTIZED}.")
        lap("calibrate_s" if precision == "int8" else "convert_s")
        parity, task_metrics = None, {}
        if verify:
            test = run_onnx_batches(tmp_out, holdout, tasks)
            parity, task_metrics = evaluate(specs, ref, test, precision, ref_name, f"onnxruntime-cpu-{precision}")
            log = _logger.info if parity.passed else _logger.error
            log("%s parity on %s:\n%s\n%s", precision.upper(), holdout_desc, parity.markdown(), task_table(task_metrics))
            lap("parity_s")
            if not parity.passed and not allow_mismatch:
                bad = {k: v.failures for k, v in parity.tasks.items() if not v.passed}
                raise VerificationError(
                    f"The {precision.upper()} model is outside the stated tolerance for {sorted(bad)} ({bad}); "
                    f"'{out}' was not written. Keep more of the model in high precision (--keep TERM, e.g. "
                    "--keep head.normals), try another --calib-method, or run --sensitivity with --budget."
                )
        data_files = external_data_files(tmp_out)
        calibration = None
        if precision == "int8":
            calibration = {**data.provenance, "method": calib_method,
                           "tool": "onnxruntime quantize_static" if calib_method == "percentile" else "nvidia-modelopt"}
            if calib_method != "percentile":
                calibration["per_node"] = per_node
        man = manifest.replace(
            artifact=out.name,
            precision=precision,
            sha256=sha256_file(tmp_out),
            size_bytes=tmp_out.stat().st_size + sum((staging / d).stat().st_size for d in data_files),
            external_data=tuple(data_files),
            parent={"kind": "onnx", "path": str(onnx_path), "sha256": manifest.sha256 or sha256_file(onnx_path)},
            precision_policy={**selection.to_dict(), "graph": audit},
            calibration=calibration,
            verification=None if parity is None else {
                **parity.to_dict(), "task_agreement": task_metrics, "inputs": holdout_desc,
                "holdout_ids": data.holdout_ids if data else []},
            versions=tool_versions("onnx", "onnxruntime", "nvidia-modelopt"),
            command=command or " ".join(sys.argv),
            created=now_iso(),
        )
        man.save(manifest_path_for(tmp_out))
        publish(staging, out, data_files + [f.name for f in staging.glob("*.sensitivity.*")])
    return QuantizeResult(out, manifest_path_for(out), man, parity, task_metrics, sens_report, timings)
