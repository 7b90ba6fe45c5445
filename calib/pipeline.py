"""The calib stage end to end: FP32 ONNX + manifest -> FP16 or INT8 ONNX + manifest, verified per task.

Outputs are produced in a staging folder and moved into place only after the graph checks and the
held-out parity check passed, so a failure leaves no file behind.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import sys
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
from invpt.calib.fp16 import convert_fp16_model
from invpt.calib.int8 import CALIB_METHODS, ENGINE_MODELOPT_PER_NODE, quantize_int8
from invpt.calib.policy import select_nodes
from invpt.compare import ComparisonResult
from invpt.errors import CheckpointError, ExportError, InputError, ManifestError, VerificationError
from invpt.export.graph_checks import check_graph
from invpt.export.onnx_export import external_data_files
from invpt.manifest import Manifest, manifest_path_for, now_iso, parent_record, sha256_file, tool_versions
from invpt.paths import require_file
from invpt.runners import OnnxRuntimeRunner, PyTorchRunner, Runner
from invpt.preflight import check_quantize_memory
from invpt.onnx_summary import GraphSummary, WrittenOnnx, read_summary
from invpt.timing import PhaseTimer

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


def graph_audit(path) -> dict:
    """What the produced graph contains: Q/DQ pairs and what consumes them, Casts, op census. ``path`` is the file,
    or its graph (``onnx.ModelProto``) when the stage holds it (not read again)."""
    import onnx

    proto = path if isinstance(path, onnx.ModelProto) else onnx.load(str(path), load_external_data=False)
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
    verified = manifest.verified
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
    verified = manifest.verified
    return OnnxRuntimeRunner(fp32_onnx, tasks=tasks, error_cls=ExportError,
                             name=REFERENCE_ONNX_VERIFIED if verified else REFERENCE_ONNX_UNVERIFIED)


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything ``invpt-quantize`` can be told, in one place: its argument groups parse into this, and
    :func:`quantize` takes it. Defaults are the CLI's. Paths stay as given (relative to the working directory)."""

    precision: str
    out: Optional[Path] = None
    # Policy
    policy: str = "default"
    keep_terms: tuple[str, ...] = ()
    # Calibration data
    calib_data: Optional[Path] = None
    calib_samples: int = 32
    holdout_samples: int = 4
    calib_method: str = "entropy"
    calibrate_per_node: Optional[bool] = None  # None: invpt measures the ranges; True/False: ModelOpt calibrates itself
    dataset: Optional[str] = None  # force a reader: pascal_context, nyud_v2, folder, video, image
    split: str = "val"
    video_step: int = 1
    seed: int = 0
    cache_dir: Optional[Path] = None
    # Verification
    ckpt: Optional[Path] = None
    verify: bool = True
    allow_mismatch: bool = False
    sensitivity: bool = False
    budgets: Optional[tuple[tuple[str, float], ...]] = None
    command: Optional[str] = None

    @classmethod
    def make(cls, precision: str, out=None, *, keep_terms: Sequence[str] = (), budgets: Optional[Mapping] = None,
             dataset_hint: Optional[str] = None, **kw) -> "QuantizeOptions":
        """Build from plain Python values (paths as str or Path, a budget dict, a list of terms)."""
        for key in ("calib_data", "cache_dir", "ckpt"):
            if kw.get(key) is not None:
                kw[key] = Path(kw[key])
        if dataset_hint is not None and kw.get("dataset") is None:
            kw["dataset"] = dataset_hint
        return cls(precision=precision, out=Path(out) if out is not None else None, keep_terms=tuple(keep_terms),
                   budgets=tuple(sorted(budgets.items())) if budgets else None, **kw)

    def validate(self) -> None:
        """Refuse bad option values (exit 2) before any file is read."""
        if self.precision not in REDUCED_PRECISIONS:
            raise InputError(f"--precision must be fp16 or int8, got '{self.precision}'.")
        if self.precision == "int8" and self.calib_method not in CALIB_METHODS:
            raise InputError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, got '{self.calib_method}'.")
        if self.precision == "int8" and not self.calib_data:
            raise InputError(
                "INT8 needs --calib-data (a PASCAL-Context/NYUD-v2 root, an image folder or a video); invpt never "
                "calibrates on random data."
            )
        if self.calib_samples < 1:
            raise InputError(f"--calib-samples must be >= 1, got {self.calib_samples}.")
        if self.holdout_samples < 0:
            raise InputError(f"--holdout-samples must be >= 0, got {self.holdout_samples}.")
        if (self.verify or self.sensitivity) and self.holdout_samples < 1:
            raise InputError(
                f"--holdout-samples {self.holdout_samples}: the parity check needs at least 1 held-out sample. Give "
                "--holdout-samples 1 or more, or --no-verify to skip verification (the manifest then records it)."
            )
        if self.seed < 0:
            raise InputError(f"--seed must be >= 0, got {self.seed}.")
        if self.video_step < 1:
            raise InputError(f"--video-step must be >= 1, got {self.video_step}.")
        if self.sensitivity and self.precision != "int8":
            raise InputError("--sensitivity applies to --precision int8.")
        for task, budget in self.budgets or ():
            if not (math.isfinite(budget) and budget > 0):
                raise InputError(
                    f"--budget {task}={budget}: a budget is the relative L2 error a task may lose to INT8, a finite "
                    "number > 0 (e.g. semseg=0.03); for no loss at all use --precision fp16 or --keep that task's head."
                )
        if self.calib_data is not None and not Path(self.calib_data).exists():
            raise InputError(
                f"Calibration data '{self.calib_data}' does not exist. Pass a PASCAL-Context or NYUD-v2 root (official "
                "layout), a folder of images, or a video file."
            )


@dataclass(frozen=True)
class _Inputs:
    """What the checks before any work established."""

    onnx_path: Path
    manifest: Manifest
    manifest_file: Path
    out: Path
    ref_ckpt: Optional[Path]


@dataclass(frozen=True)
class _HeldOut:
    data: Optional[CalibrationData]
    images: np.ndarray
    description: str


def check_inputs(onnx_path: str | os.PathLike, opts: QuantizeOptions) -> _Inputs:
    """Step 1, before any model, data or calibration work: options, the input ONNX against its manifest, the output."""
    onnx_path = Path(onnx_path)
    manifest = load_input_manifest(onnx_path)
    manifest_file = manifest_path_for(onnx_path)
    out = opts.out or default_out(onnx_path, opts.precision)
    calib_file = opts.calib_data if opts.calib_data is not None and Path(opts.calib_data).is_file() else None
    check_output(out, [onnx_path, opts.ckpt, manifest.parent_path(manifest_file), calib_file], InputError)
    opts.validate()
    # Before any heavy work: stop at once (exit 2, with the figure and the option that fits) if this machine clearly
    # cannot hold the stage's estimated peak, instead of being killed minutes in.
    check_quantize_memory(onnx_path, opts.precision, verify=opts.verify or opts.sensitivity,
                          per_node=opts.calibrate_per_node,
                          calib_samples=opts.calib_samples, method=opts.calib_method, model_bytes=manifest.size_bytes)
    unknown = sorted({t for t, _ in opts.budgets or ()} - set(manifest.tasks))
    if unknown:
        raise InputError(f"--budget names task(s) {', '.join(unknown)} that '{onnx_path}' does not predict; its tasks "
                         f"are {', '.join(manifest.tasks)}.")
    ckpt = str(opts.ckpt) if opts.ckpt is not None else None
    ref_ckpt = resolve_reference_checkpoint(manifest, manifest_file, ckpt) if (opts.verify or opts.sensitivity) else None
    return _Inputs(onnx_path, manifest, manifest_file, out, ref_ckpt)


def load_held_out(manifest: Manifest, opts: QuantizeOptions) -> _HeldOut:
    """Step 2: calibration and held-out images (real ones from --calib-data; seeded noise for FP16 without it)."""
    if opts.calib_data:
        data = load_calibration_data(opts.calib_data, manifest.preprocessing,
                                     opts.calib_samples if opts.precision == "int8" else 1, opts.holdout_samples,
                                     opts.seed, opts.cache_dir, opts.dataset, opts.split,
                                     calibrating=opts.precision == "int8", video_step=opts.video_step)
        return _HeldOut(data, data.holdout, f"{len(data.holdout)} held-out image(s) from {opts.calib_data}, disjoint "
                        "from the calibration samples")
    shape = (max(opts.holdout_samples, 1), 3, *manifest.model_config.image_size)
    images = np.random.default_rng(opts.seed).standard_normal(shape, dtype=np.float32)
    return _HeldOut(None, images, f"{len(images)} seeded random input(s) (no --calib-data given)")


def input_summary(onnx_path: Path) -> GraphSummary:
    """The input's :class:`~invpt.onnx_summary.GraphSummary` (its graph parsed once); a file that does not parse is
    an :class:`~invpt.errors.InputError` (see :func:`unreadable_onnx`)."""
    from google.protobuf.message import DecodeError

    try:
        return read_summary(onnx_path)
    except DecodeError as err:
        raise unreadable_onnx(onnx_path, err) from err


def private_input(inputs: _Inputs, staging: Path, summary: Optional[GraphSummary] = None) -> Path:
    """Step 3: the one private copy of the input the whole stage reads, checked to be the file the manifest describes
    (libraries rewrite their input in place, and the user's file may change while we run). ``summary``: the input's
    graph summary when the caller has read it (its external-data files are then copied without another parse)."""
    return private_copy(inputs.onnx_path, staging / ".input", expect_sha256=inputs.manifest.sha256, summary=summary)


def reference_outputs(inputs: _Inputs, src: Path, images: np.ndarray) -> tuple[dict, str]:
    """Step 4: FP32 reference outputs on the held-out images; the reference is released before quantizing."""
    reference = _reference_runner(inputs.manifest, inputs.manifest_file, inputs.ref_ckpt, src, inputs.manifest.tasks)
    with reference:  # PyTorch one sample at a time; ONNX in its static batch (1 if dynamic)
        ref = reference.run_batches(images)
    name = reference.name
    del reference  # the model: ~1.7 GB for ViT-L; quantization needs the memory
    gc.collect()
    return ref, name


def convert(src: Path, tmp_out: Path, opts: QuantizeOptions, selection, data: Optional[CalibrationData],
            per_node: Optional[bool]) -> tuple[dict, Optional[WrittenOnnx]]:
    """Step 5: FP16 conversion or INT8 quantization of the private copy; returns the audit of the produced graph
    (for FP16 with the nodes the data-range rule kept in FP32 under ``data_range_rule``) and, where the stage wrote the
    file itself (FP16), what it wrote (sha256 and graph summary: the file is not read again for them)."""
    rng: dict = {}
    written = None
    if opts.precision == "fp16":
        fp16 = convert_fp16_model(src, tmp_out, selection.kept_nodes, selection.policy.keep_op_types,
                                  range_inputs=data.calib if data is not None else None, seed=opts.seed)
        rng = fp16.range_rule.to_dict() if fp16.range_rule else {"data_max": None}
        written = fp16.written
    else:
        calib_report: dict = {}
        quantize_int8(src, tmp_out, data.calib, opts.calib_method, selection.kept_nodes, per_node=per_node,
                      input_is_private=True, report=calib_report)
    check_graph(tmp_out, written.summary if written else None)  # the produced file, by path: the one full check
    audit = graph_audit(fp16.graph if written else tmp_out)
    if rng:
        audit["data_range_rule"] = rng
    if opts.precision == "int8":
        audit["int8_calibration"] = calib_report  # engine (see calibration_engine), what was measured, phase seconds
        bad = {op: n for op, n in audit["dq_consumers"].items() if op in NEVER_QUANTIZED}
        if bad:  # a tool failure, not a precision trade-off: keeping more in FP32 would not fix it
            raise ExportError(
                f"The INT8 graph the quantizer produced has Q/DQ feeding {bad}, which the policy forbids "
                f"({', '.join(NEVER_QUANTIZED)} are never quantized); '{tmp_out.name}' was not written. This is a "
                "quantizer or invpt bug: report it with your nvidia-modelopt, onnx and onnxruntime versions (pip list)."
            )
    return audit, written


def verify(tmp_out: Path, opts: QuantizeOptions, specs, ref: dict, ref_name: str, held: _HeldOut,
           out: Path) -> tuple[ComparisonResult, dict]:
    """Step 6: the produced model on the held-out images against the FP32 reference, per task."""
    tasks = [s.name for s in specs]
    with OnnxRuntimeRunner(tmp_out, tasks=tasks, error_cls=ExportError, precision=opts.precision) as test_runner:
        test = test_runner.run_batches(held.images)
    parity, task_metrics = evaluate(specs, ref, test, opts.precision, ref_name, test_runner.name)
    log = _logger.info if parity.passed else _logger.error
    log("%s parity on %s:\n%s", opts.precision.upper(), held.description, parity.markdown())  # with task agreement
    if not parity.passed and not opts.allow_mismatch:
        bad = {k: v.failures for k, v in parity.tasks.items() if not v.passed}
        raise VerificationError(
            f"The {opts.precision.upper()} model is outside the stated tolerance for {sorted(bad)} ({bad}); "
            f"'{out}' was not written. Keep more of the model in high precision (--keep TERM, e.g. "
            "--keep head.normals), try another --calib-method, or run --sensitivity with --budget."
        )
    return parity, task_metrics


def quantize(onnx_path: str | os.PathLike, opts: QuantizeOptions) -> QuantizeResult:
    """Produce a verified FP16 or INT8 ONNX plus manifest from an exported FP32 ONNX. See ``invpt-quantize --help``.

    A parity failure raises ``VerificationError`` and writes nothing, unless ``opts.allow_mismatch``: then the file is
    written with ``verification.passed = false`` in its manifest (for benchmarks and for inspecting a bad model), and
    the caller decides what to do with ``result.parity.passed``.
    """
    timer = PhaseTimer()
    with timer.phase("check"):
        inputs = check_inputs(onnx_path, opts)
    manifest, out = inputs.manifest, inputs.out
    cfg, tasks = manifest.model_config, manifest.tasks
    specs = [s for s in cfg.task_specs if s.name in tasks]
    with timer.phase("data"):
        held = load_held_out(manifest, opts)
    sens_report = None
    with staging_dir(out, InputError) as staging:
        with timer.phase("data"):
            # The input's graph read once (names and types, no weights kept): the private copy's external-data files
            # and the policy's node selections (here and after a sensitivity sweep) come from it. The copy itself is
            # checked against the manifest's sha256, so the summary describes the bytes the stage works on.
            graph = input_summary(inputs.onnx_path)
            src = private_input(inputs, staging, graph)
            selection = select_nodes(src, opts.precision, opts.policy, opts.keep_terms, tasks, cfg.backbone.depth,
                                     summary=graph)
            per_node = opts.calibrate_per_node  # None: invpt's ranges; True/False: ModelOpt calibrates itself
        ref, ref_name = {}, ""
        if opts.verify or opts.sensitivity:
            with timer.phase("reference"):
                ref, ref_name = reference_outputs(inputs, src, held.images)
        if opts.sensitivity:
            from invpt.calib.sensitivity import run_sensitivity

            with timer.phase("sensitivity"):
                sens_report = run_sensitivity(src, staging, held.data, ref, specs, selection, opts.calib_method, cfg,
                                              dict(opts.budgets) if opts.budgets else None, per_node=per_node,
                                              input_is_private=True)
                extra = sens_report.get("search", {}).get("keep_blocks", [])
                if extra:
                    selection = select_nodes(src, opts.precision, opts.policy, list(opts.keep_terms) + list(extra),
                                             tasks, cfg.backbone.depth, summary=graph)
        tmp_out = staging / out.name
        with timer.phase("calibrate" if opts.precision == "int8" else "convert"):
            audit, written = convert(src, tmp_out, opts, selection, held.data, per_node)
        parity, task_metrics = None, {}
        if opts.verify:
            with timer.phase("parity"):
                parity, task_metrics = verify(tmp_out, opts, specs, ref, ref_name, held, out)
        man = _output_manifest(inputs, opts, tmp_out, staging, selection, audit, held, per_node, parity, task_metrics,
                               timer, written)
        man.save(manifest_path_for(tmp_out))
        publish(staging, out, list(man.external_data) + [f.name for f in staging.glob("*.sensitivity.*")],
                error_cls=InputError)
    return QuantizeResult(out, manifest_path_for(out), man, parity, task_metrics, sens_report, dict(timer.seconds))


def _output_manifest(inputs: _Inputs, opts: QuantizeOptions, tmp_out: Path, staging: Path, selection, audit: dict,
                     held: _HeldOut, per_node: bool, parity, task_metrics: dict, timer: PhaseTimer,
                     written: Optional[WrittenOnnx] = None) -> Manifest:
    """Step 7: the produced model's manifest, derived from its input's (``written``: what the stage recorded while
    writing the file, else the file is read for its hash and external-data files)."""
    data_files = list(written.external_data) if written else external_data_files(tmp_out)
    calibration = None
    if opts.precision == "int8":
        data = held.data
        calibration = {**data.provenance, "sample_ids": list(data.calib_ids), "method": opts.calib_method,
                       "tool": "onnxruntime quantize_static" if opts.calib_method == "percentile" else "nvidia-modelopt"}
        if opts.calib_method != "percentile":
            engine = audit.get("int8_calibration", {}).get("engine")
            calibration["per_node"] = engine == ENGINE_MODELOPT_PER_NODE
            calibration["engine"] = engine
    return inputs.manifest.replace(
        artifact=inputs.out.name,
        precision=opts.precision,
        sha256=written.sha256 if written else sha256_file(tmp_out),
        size_bytes=tmp_out.stat().st_size + sum((staging / d).stat().st_size for d in data_files),
        external_data=tuple(data_files),
        parent=parent_record("onnx", inputs.onnx_path, inputs.out.parent, inputs.manifest.sha256),  # verified at start
        precision_policy={**selection.to_dict(), "graph": audit},
        calibration=calibration,
        verification=None if parity is None else {
            **parity.to_dict(), "task_agreement": task_metrics, "inputs": held.description,
            "holdout_ids": held.data.holdout_ids if held.data else []},
        versions=tool_versions("onnx", "onnxruntime", "nvidia-modelopt"),
        command=opts.command or " ".join(sys.argv),
        created=now_iso(),
        timings=timer.to_dict(),
    )


def run_quantize(onnx_path: str | os.PathLike, precision: str, out: Optional[str | os.PathLike] = None,
                 **kwargs) -> QuantizeResult:
    """:func:`quantize` with the options as keyword arguments (``QuantizeOptions`` field names; ``keep_terms`` may be
    a list, ``budgets`` a dict, paths str or Path; ``dataset_hint`` is accepted for ``dataset``)."""
    return quantize(onnx_path, QuantizeOptions.make(precision, out, **kwargs))
