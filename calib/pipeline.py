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

from invpt.artifacts import check_output, private_copy, publish, staging_dir, verified_manifest
from invpt.calib.data import CalibrationData, load_calibration_data
from invpt.calib.evaluate import (
    REDUCED_PRECISIONS,
    REFERENCE_ONNX_UNVERIFIED,
    REFERENCE_ONNX_VERIFIED,
    REFERENCE_PYTORCH,
    evaluate,
)
from invpt.calib.fp16 import convert_fp16
from invpt.calib.int8 import CALIB_METHODS, calibrates_per_node, quantize_int8
from invpt.calib.policy import select_nodes
from invpt.compare import ComparisonResult
from invpt.errors import CheckpointError, ExportError, InputError, ManifestError, VerificationError
from invpt.export.graph_checks import check_graph
from invpt.export.onnx_export import external_data_files
from invpt.manifest import Manifest, manifest_path_for, now_iso, parent_record, sha256_file, tool_versions
from invpt.paths import require_file
from invpt.runners import OnnxRuntimeRunner, PyTorchRunner, Runner

_logger = logging.getLogger(__name__)

NEVER_QUANTIZED = ("LayerNormalization", "Softmax", "Resize")


@dataclass
class QuantizeResult:
    onnx_path: Path
    manifest_path: Path
    manifest: Manifest
    parity: Optional[ComparisonResult]
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


def unreadable_onnx(path: Path, err: Exception) -> InputError:
    """The error for an ONNX file that does not parse (truncated, or not ONNX at all)."""
    return InputError(
        f"'{path}' is not a readable ONNX model ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else 'no detail'}); "
        "it is truncated or not an ONNX file. Re-export it with invpt-export (a complete copy has the sha256 its "
        "manifest records)."
    )


def load_input_manifest(onnx_path: str | os.PathLike) -> Manifest:
    """The manifest of the FP32 ONNX given to invpt-quantize, after checking that it still describes the file."""
    onnx_path = Path(onnx_path)
    manifest = verified_manifest(onnx_path, what="ONNX file")
    if manifest.precision != "fp32" or manifest.kind != "onnx":
        raise ManifestError(
            f"'{onnx_path}' is a {manifest.precision} {manifest.kind}; invpt-quantize starts from the FP32 ONNX written "
            "by invpt-export."
        )
    return manifest


def resolve_reference_checkpoint(manifest: Manifest, manifest_file: Path, ckpt: Optional[str]) -> Optional[Path]:
    """The checkpoint to compute the FP32 reference from, or None to use the FP32 ONNX.

    An explicit ``--ckpt`` must be a readable file with the sha256 the manifest records for its parent (else exit 2:
    parity against other weights would be meaningless). Without it, the recorded parent (resolved against the
    manifest's folder) is used when it is still there and unchanged.
    """
    recorded = (manifest.parent or {}) if (manifest.parent or {}).get("kind") == "checkpoint" else {}
    if ckpt:
        path = require_file(ckpt, "Checkpoint", "Pass the checkpoint the ONNX was exported from with --ckpt, or leave "
                            "--ckpt out to use the one recorded in the manifest.", CheckpointError)
        want = recorded.get("sha256")
        if want:
            got = sha256_file(path)
            if got != want:
                raise CheckpointError(
                    f"--ckpt '{path}' is not the checkpoint '{manifest.artifact}' was exported "
                    f"from: sha256 {got}, the manifest '{manifest_file}' records {want}. Pass the checkpoint it was "
                    "exported from, or leave --ckpt out (the FP32 ONNX is then the reference)."
                )
        return path
    path = manifest.parent_path(manifest_file) if recorded else None
    if path is None or not path.is_file():
        return None
    if recorded.get("sha256") and sha256_file(path) != recorded["sha256"]:
        _logger.warning("checkpoint %s changed since export (sha256 differs); using the FP32 ONNX as reference", path)
        return None
    return path


def _load_reference_model(manifest: Manifest, manifest_file: Path, ckpt: Optional[Path]):
    """The FP32 PyTorch model for parity from ``ckpt`` (see :func:`resolve_reference_checkpoint`), else None."""
    from invpt import load_model

    if ckpt is not None:
        return load_model(ckpt, config=manifest.config, fused_attn=False)
    verified = (manifest.verification or {}).get("passed") is True
    _logger.info("checkpoint not available; the reference is the FP32 ONNX (%s)",
                 "verified against PyTorch at export" if verified else
                 "NOT verified against PyTorch at export: it was exported with --no-verify")
    return None


def _reference_runner(manifest: Manifest, manifest_file: Path, ckpt: Optional[Path], fp32_onnx: Path,
                      tasks: Sequence[str]) -> Runner:
    """The FP32 reference: PyTorch from ``ckpt`` when available, else the FP32 ONNX (``fp32_onnx``, the private copy)
    in ONNX Runtime, labelled by whether it was verified against PyTorch at export."""
    model = _load_reference_model(manifest, manifest_file, ckpt)
    if model is not None:
        return PyTorchRunner(model, tasks, name=REFERENCE_PYTORCH)
    verified = (manifest.verification or {}).get("passed") is True
    return OnnxRuntimeRunner(fp32_onnx, tasks=tasks, error_cls=ExportError,
                             name=REFERENCE_ONNX_VERIFIED if verified else REFERENCE_ONNX_UNVERIFIED)


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
    # Inputs and options first, before any model, data or calibration work.
    manifest = load_input_manifest(onnx_path)
    manifest_file = manifest_path_for(onnx_path)
    out = Path(out) if out else default_out(onnx_path, precision)
    calib_file = Path(calib_data) if calib_data is not None and Path(calib_data).is_file() else None
    check_output(out, [onnx_path, ckpt, manifest.parent_path(manifest_file), calib_file], InputError)
    if precision not in REDUCED_PRECISIONS:
        raise InputError(f"--precision must be fp16 or int8, got '{precision}'.")
    if precision == "int8" and calib_method not in CALIB_METHODS:
        raise InputError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, got '{calib_method}'.")
    if precision == "int8" and not calib_data:
        raise InputError(
            "INT8 needs --calib-data (a PASCAL-Context/NYUD-v2 root, an image folder or a video); invpt never "
            "calibrates on random data."
        )
    if calib_samples < 1:
        raise InputError(f"--calib-samples must be >= 1, got {calib_samples}.")
    if holdout_samples < 0:
        raise InputError(f"--holdout-samples must be >= 0, got {holdout_samples}.")
    if (verify or sensitivity) and holdout_samples < 1:
        raise InputError(
            f"--holdout-samples {holdout_samples}: the parity check needs at least 1 held-out sample. Give "
            "--holdout-samples 1 or more, or --no-verify to skip verification (the manifest then records it)."
        )
    if seed < 0:
        raise InputError(f"--seed must be >= 0, got {seed}.")
    if sensitivity and precision != "int8":
        raise InputError("--sensitivity applies to --precision int8.")
    if calib_data is not None and not Path(calib_data).exists():
        raise InputError(
            f"Calibration data '{calib_data}' does not exist. Pass a PASCAL-Context or NYUD-v2 root (official layout), "
            "a folder of images, or a video file."
        )
    ref_ckpt = resolve_reference_checkpoint(manifest, manifest_file, ckpt) if (verify or sensitivity) else None
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
                                     holdout_samples, seed, cache_dir, dataset_hint, split,
                                     calibrating=precision == "int8")
        holdout = data.holdout
        holdout_desc = f"{len(holdout)} held-out image(s) from {calib_data}, disjoint from the calibration samples"
    else:
        holdout = np.random.default_rng(seed).standard_normal((max(holdout_samples, 1), 3, *cfg.image_size), dtype=np.float32)
        holdout_desc = f"{len(holdout)} seeded random input(s) (no --calib-data given)"

    lap("data_s")
    sens_report = None
    with staging_dir(out, InputError) as staging:
        # The whole stage reads one private copy of the input, checked to be the file the manifest describes: libraries
        # rewrite their input in place, and the user's file may change while we run.
        src = private_copy(onnx_path, staging / ".input")
        if sha256_file(src) != manifest.sha256:
            raise InputError(f"'{onnx_path}' changed while invpt-quantize was starting (its sha256 no longer matches "
                             f"'{manifest_file}'); nothing was written. Run again once it is no longer being written.")
        selection = select_nodes(src, precision, policy, keep_terms, tasks, cfg.backbone.depth)  # parsed by the copy
        per_node = calibrates_per_node(src, calibrate_per_node)  # ModelOpt only; percentile ignores it
        ref, ref_name = {}, ""
        if verify or sensitivity:
            reference = _reference_runner(manifest, manifest_file, ref_ckpt, src, tasks)
            with reference:  # PyTorch one sample at a time; ONNX in its static batch (1 if dynamic)
                ref = reference.run_batches(holdout)
            ref_name = reference.name
            del reference  # the model: ~1.7 GB for ViT-L; quantization needs the memory
            gc.collect()
        lap("reference_s")
        if sensitivity:
            from invpt.calib.sensitivity import run_sensitivity

            sens_report = run_sensitivity(src, staging, data, ref, specs, selection, calib_method, cfg, budgets,
                                          per_node=per_node, input_is_private=True)
            extra = sens_report.get("search", {}).get("keep_blocks", [])
            if extra:
                selection = select_nodes(src, precision, policy, list(keep_terms) + list(extra), tasks,
                                         cfg.backbone.depth)
            lap("sensitivity_s")
        tmp_out = staging / out.name
        if precision == "fp16":
            convert_fp16(src, tmp_out, selection.kept_nodes, selection.policy.keep_op_types)
        else:
            quantize_int8(src, tmp_out, data.calib, calib_method, selection.kept_nodes, per_node=per_node,
                          input_is_private=True)
        check_graph(tmp_out)
        audit = graph_audit(tmp_out)
        if precision == "int8":
            bad = {op: n for op, n in audit["dq_consumers"].items() if op in NEVER_QUANTIZED}
            if bad:  # a tool failure, not a precision trade-off: keeping more in FP32 would not fix it
                raise ExportError(
                    f"The INT8 graph the quantizer produced has Q/DQ feeding {bad}, which the policy forbids "
                    f"({', '.join(NEVER_QUANTIZED)} are never quantized); '{out}' was not written. This is a quantizer "
                    "or invpt bug: report it with your nvidia-modelopt, onnx and onnxruntime versions (pip list)."
                )
        lap("calibrate_s" if precision == "int8" else "convert_s")
        parity, task_metrics = None, {}
        if verify:
            with OnnxRuntimeRunner(tmp_out, tasks=tasks, error_cls=ExportError, precision=precision) as test_runner:
                test = test_runner.run_batches(holdout)
            parity, task_metrics = evaluate(specs, ref, test, precision, ref_name, test_runner.name)
            log = _logger.info if parity.passed else _logger.error
            log("%s parity on %s:\n%s", precision.upper(), holdout_desc, parity.markdown())  # includes task agreement
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
            calibration = {**data.provenance, "sample_ids": list(data.calib_ids), "method": calib_method,
                           "tool": "onnxruntime quantize_static" if calib_method == "percentile" else "nvidia-modelopt"}
            if calib_method != "percentile":
                calibration["per_node"] = per_node
        man = manifest.replace(
            artifact=out.name,
            precision=precision,
            sha256=sha256_file(tmp_out),
            size_bytes=tmp_out.stat().st_size + sum((staging / d).stat().st_size for d in data_files),
            external_data=tuple(data_files),
            parent=parent_record("onnx", onnx_path, out.parent, manifest.sha256),  # verified at start
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
        publish(staging, out, data_files + [f.name for f in staging.glob("*.sensitivity.*")], error_cls=InputError)
    return QuantizeResult(out, manifest_path_for(out), man, parity, task_metrics, sens_report, timings)
