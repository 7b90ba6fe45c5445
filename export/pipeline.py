"""The export stage end to end: checkpoint -> ONNX -> checks -> parity verification -> manifest.

Everything is produced in a staging folder next to the output and moved into place only when every
step succeeded (external data first, then the manifest, the ONNX file last), so a failed export leaves
no file behind.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from invpt.artifacts import check_output, publish, staging_dir
from invpt.config import ConfigLike, load_config
from invpt.errors import CheckpointError, ExportError, InputError, VerificationError
from invpt.manifest import (
    Manifest,
    Preprocessing,
    io_for_config,
    manifest_path_for,
    now_iso,
    parent_record,
    sha256_file,
    tool_versions,
)
from invpt.data.transforms import GEOMETRY_MODES
from invpt.paths import require_file
from invpt.preflight import check_memory, estimate_export, release_memory
from invpt.export.graph_checks import check_graph, check_resize_conformance
from invpt.export.onnx_export import (
    DEFAULT_OPSET,
    EXTERNAL_DATA_THRESHOLD,
    check_opset,
    compact_copy,
    ExternalData,
    export_graph,
    inline_plan,
    param_bytes,
    save_onnx,
    write_streamed,
)
from invpt.onnx_summary import GraphSummary, WrittenOnnx
from invpt.compare import FP32_TOLERANCE, ParityReport, Tolerance, collect_outputs, compare_outputs
from invpt.runners import OnnxRuntimeRunner, PyTorchRunner
from invpt.timing import PhaseTimer

_logger = logging.getLogger(__name__)


@dataclass
class ExportResult:
    onnx_path: Path
    manifest_path: Path
    manifest: Manifest
    parity: Optional[ParityReport]
    timings: dict = field(default_factory=dict)  # seconds per phase (also in the manifest's timings)
    timer: Optional[PhaseTimer] = None  # the stage's phase timer: seconds and memory per phase (to_dict())


def verification_batches(batch: int, dynamic_batch: bool) -> list[int]:
    """Batch sizes to verify: 1 and 3 for a dynamic-batch model, else the static batch."""
    return [1, 3] if dynamic_batch else [batch]


def verification_feeds(image_size: Sequence[int], batches: Sequence[int], seed: int = 0,
                       images: Optional[np.ndarray] = None) -> list[np.ndarray]:
    """The verification inputs: seeded standard-normal tensors (the normalised-image range) of each batch size in
    ``batches``, plus ``images`` (already preprocessed [N, 3, H, W]) one at a time when given."""
    h, w = image_size
    rng = np.random.default_rng(seed)
    feeds = [rng.standard_normal((b, 3, h, w), dtype=np.float32) for b in batches]
    if images is not None and len(images):
        feeds += [images[i:i + 1] for i in range(len(images))]
    return feeds


@contextmanager
def fused_attention(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block, the model's attention modules that can (the timm ViT blocks) use PyTorch's fused
    scaled-dot-product attention; their setting is put back on exit.

    The model is exported with explicit attention (MatMul/Softmax nodes); its PyTorch reference outputs are the same
    function computed faster (bench/README.md; the two differ by float rounding, ~1e-6 relative).
    """
    saved = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    try:
        for m, _ in saved:
            m.fused_attn = True
        yield
    finally:
        for m, value in saved:
            m.fused_attn = value


def torch_reference(model: torch.nn.Module, feeds: Sequence[np.ndarray], tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """PyTorch outputs for ``feeds``, task -> concatenated array (the model can be freed afterwards); attention runs
    fused (:func:`fused_attention`)."""
    with fused_attention(model):
        return collect_outputs(PyTorchRunner(model, tasks, name="pytorch-fp32"), feeds)


def ort_outputs(onnx_path: str | os.PathLike, feeds: Sequence[np.ndarray],
                tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """ONNX Runtime (CPU) outputs for ``feeds`` (a static-batch model is fed in its batch); the session is released
    before returning."""
    return collect_outputs(OnnxRuntimeRunner(onnx_path, tasks=tasks, error_cls=ExportError), feeds)


def verify_onnx(
    model: torch.nn.Module,
    onnx_path: str | os.PathLike,
    batches: Sequence[int],
    tasks: Sequence[str],
    tol: Tolerance = FP32_TOLERANCE,
    seed: int = 0,
    images: Optional[np.ndarray] = None,
) -> ParityReport:
    """Run the same inputs through PyTorch and ONNX Runtime (CPU) and compare every task.

    Inputs are seeded standard-normal tensors (the normalised-image range) of each batch size in
    ``batches``, plus ``images`` (already preprocessed [N, 3, H, W]) when given. PyTorch runs first; the ONNX Runtime
    session opens only afterwards (:func:`run_export` frees the model in between: one ViT-L in memory, not two).
    """
    feeds = verification_feeds(model.cfg.image_size, batches, seed, images)
    ref = torch_reference(model, feeds, tasks)
    specs = [s for s in model.cfg.task_specs if s.name in tasks]
    return compare_outputs(ref, ort_outputs(onnx_path, feeds, tasks), specs, tol)


def _simplify(path: Path, summary: GraphSummary):
    """Run onnxslim in place when it makes the graph smaller. Returns ``(record, proto, summary)``: node counts (None
    when skipped), and the saved graph and its summary when it was applied (else None, ``summary``)."""
    import onnx

    try:
        import onnxslim
    except ImportError:
        _logger.info("onnxslim not installed: graph simplification skipped")
        return None, None, summary
    ext = bool(summary.external_data)
    proto = onnx.load(str(path))
    before = len(proto.graph.node)
    try:
        slim = onnxslim.slim(proto)
    except Exception as err:  # a simplifier bug must not fail the export; the unsimplified graph is valid
        _logger.warning("onnxslim failed (%s); keeping the unsimplified graph", err)
        return None, None, summary
    del proto
    after = len(slim.graph.node)
    if after >= before:
        return {"applied": False, "nodes_before": before, "nodes_after": after}, None, summary
    for data in summary.external_data:
        (path.parent / data).unlink()
    save_onnx(slim, path, ext)  # in place: the saved weights become references into the data file
    if ext:
        slim = compact_copy(slim)
    return {"applied": True, "nodes_before": before, "nodes_after": after}, slim, GraphSummary.from_proto(slim)


WORK_EXTERNAL_BYTES = 256 * 2**20  # above this, the staged ONNX keeps its weights external until the end


def _inline_weights(path: Path, proto) -> WrittenOnnx:
    """Put the weights of a staged ONNX back into the file (one self-contained file); its data file is removed.

    ``proto`` is the staged file's graph as saved (weights as references into the data file), so the file is not
    parsed again. Streamed (:func:`~invpt.export.onnx_export.write_streamed`): each tensor's bytes are read once from
    the data file and written, and the file is hashed as it is written. Loading the model with its weights and saving
    it would hold the weights twice (the message and its serialised bytes: +3.2 GB for ViT-L at the end of the export).
    """
    data = sorted({e.value for i in proto.graph.initializer for e in i.external_data if e.key == "location"})
    tmp = path.with_name(path.name + ".inline")
    written = write_streamed(proto, tmp, inline_plan(path.parent))
    os.replace(tmp, path)
    for name in data:
        (path.parent / name).unlink()
    return dataclasses.replace(written, path=path)


@dataclass(frozen=True)
class ExportOptions:
    """Everything ``invpt-export`` can be told about the export itself (the checkpoint and --out aside): its argument
    groups parse into this, and :func:`export_model` / :func:`run_export` take it. Defaults are the CLI's."""

    opset: int = DEFAULT_OPSET
    batch: int = 1
    dynamic_batch: bool = False
    tasks: Optional[tuple[str, ...]] = None  # None: every task of the model
    verify: bool = True
    simplify: bool = False
    external_data: ExternalData = "auto"
    preprocess_mode: str = "pad"
    tolerance: Tolerance = FP32_TOLERANCE
    verify_images: Optional[np.ndarray] = field(default=None, compare=False)  # extra preprocessed [N,3,H,W] inputs
    command: Optional[str] = None

    def validate(self) -> None:
        """Refuse bad option values (exit 2) before any file is read."""
        check_opset(self.opset)
        if self.batch < 1:
            raise ExportError(f"--batch must be >= 1, got {self.batch}.")
        if self.tasks is not None and not [t for t in self.tasks if str(t).strip()]:
            raise InputError("--tasks was given but names no task. Name tasks separated by commas, e.g. --tasks "
                             "semseg,normals, or leave --tasks out to export every task.")
        if self.external_data not in ("auto", "always", "never"):
            raise InputError(f"--external-data must be auto, always or never, got '{self.external_data}'.")
        if self.preprocess_mode not in GEOMETRY_MODES:
            raise InputError(f"--preprocess must be one of {', '.join(GEOMETRY_MODES)}, got '{self.preprocess_mode}'.")


def run_export(ckpt: str | os.PathLike, out: str | os.PathLike, opts: Optional[ExportOptions] = None, *,
               config: Optional[ConfigLike] = None, timer: Optional[PhaseTimer] = None, **kwargs) -> ExportResult:
    """Export a checkpoint to a verified ONNX file plus its manifest. See ``invpt-export --help``.

    ``opts`` holds the export options; keyword arguments (``ExportOptions`` field names, ``tasks`` as any sequence)
    are accepted instead, for scripts. Everything that can be checked without the model is checked before the
    checkpoint is read (seconds, not minutes). ``timer`` (default a new one) times the phases; a benchmark passes
    ``PhaseTimer(reset_peak=True)`` for the exact peak memory of every phase.

    Raises:
        CheckpointError, ConfigError: bad checkpoint or config.
        ExportError: export or graph checks failed.
        VerificationError: ONNX Runtime disagrees with PyTorch beyond the tolerance (nothing is written).
    """
    from invpt import load_model

    if opts is None:
        if kwargs.get("tasks") is not None:
            kwargs["tasks"] = tuple(kwargs["tasks"])
        opts = ExportOptions(**kwargs)
    elif kwargs:
        raise TypeError(f"run_export: pass options either as ExportOptions or as keywords, not both ({sorted(kwargs)})")
    timer = timer or PhaseTimer()
    with timer.phase("check"):
        ckpt_path = require_file(ckpt, "Checkpoint", "Pass the checkpoint file (.pth/.pth.tar) with --ckpt.",
                                 CheckpointError)
        config_file = Path(config) if isinstance(config, (str, os.PathLike)) and Path(config).is_file() else None
        out = check_output(out, [ckpt_path, config_file], InputError)
        opts.validate()
        if config is not None:
            load_config(config)  # a bad preset name or YAML fails here, before the checkpoint is read
        ckpt_sha = sha256_file(ckpt_path)  # before loading: what the manifest records is what was loaded
    with timer.phase("load_checkpoint"):
        # Held only in this one-element list, which export_model empties: it then holds the only reference and can
        # free the model before ONNX Runtime opens (no local name here keeps it alive).
        holder = [load_model(ckpt_path, config=config, fused_attn=False)]  # memory-mapped: seconds, even for ViT-L
    parent = parent_record("checkpoint", ckpt_path, out.parent, ckpt_sha)
    return export_model(holder, out, opts, parent=parent, timer=timer, source=str(ckpt))


def export_model(model, out: str | os.PathLike, opts: Optional[ExportOptions] = None, *,
                 parent: Optional[dict] = None, timer: Optional[PhaseTimer] = None,
                 source: str = "an in-memory model") -> ExportResult:
    """Export an InvPT model held in memory (e.g. during training) to a verified ONNX plus manifest at ``out``.

    ``model`` may be wrapped in a one-element list, which this function empties: it then holds the only reference
    and frees the model before the ONNX Runtime session opens (one ViT-L in memory, not two). ``parent`` is the
    manifest's parent record (``None``: made from a model in memory, no file to point to).
    """
    opts = opts or ExportOptions()
    timer = timer or PhaseTimer()
    if isinstance(model, list):
        model = model.pop()
    if parent is None:
        out = check_output(out, [], InputError)
        opts.validate()
    out = Path(out)
    cfg = model.cfg
    # Before the export itself: a machine that clearly cannot hold it is told so now, not killed minutes in.
    check_memory(estimate_export(param_bytes(model), verify=opts.verify, simplify=opts.simplify), what=f"'{source}'")
    tasks = tuple(model.resolve_tasks(opts.tasks))
    with staging_dir(out, ExportError) as staging:
        onnx_tmp = staging / out.name
        meta = {"invpt.config": json.dumps(cfg.to_dict()), "invpt.tasks": ",".join(tasks)}
        _logger.info("exporting %s (%s, %dx%d, tasks %s) at opset %d", cfg.name or cfg.dataset, source,
                     *cfg.image_size, ",".join(tasks), opts.opset)
        weights = param_bytes(model)
        final_external = opts.external_data == "always" or (opts.external_data == "auto"
                                                            and weights > EXTERNAL_DATA_THRESHOLD)
        # A large model is processed with its weights in an external-data file even when the artifact will be one
        # file: saving then writes the graph and the weights without serialising a second copy of them, and the
        # graph checks (onnx.checker's full check, shape inference) read the graph alone instead of the 1.6 GB
        # file (+5 GB at their peak for ViT-L). The weights are put back into the file at the end (_inline_weights).
        work_external = final_external or (opts.external_data == "auto" and weights > WORK_EXTERNAL_BYTES)
        with timer.phase("torch_onnx_export"):
            # The graph as saved (weights as references into the data file when processed external) and its summary:
            # the steps below use them instead of reading the file again.
            proto, summary = export_graph(model, onnx_tmp, opset=opts.opset, batch=opts.batch,
                                          dynamic_batch=opts.dynamic_batch, tasks=tasks,
                                          external_data="always" if work_external else "never", metadata=meta)
        inline = work_external and not final_external
        with timer.phase("graph_checks"):  # the graph alone: seconds, before minutes of verification
            check_graph(onnx_tmp, summary)
            sites = check_resize_conformance(onnx_tmp, cfg, tasks, proto=proto)
        if not inline:
            del proto  # it may hold the weights (small models are processed as one file); the file has them
            proto = None
        if opts.verify:
            # The PyTorch side of verification runs now, while the model is loaded anyway; the model is then freed
            # before the ONNX Runtime session (a ViT-L held next to its session cost ~3.4 GB).
            with timer.phase("verification_pytorch"):
                feeds = verification_feeds(cfg.image_size, verification_batches(opts.batch, opts.dynamic_batch), 0,
                                           opts.verify_images)
                ref = torch_reference(model, feeds, tasks)
                specs = [s for s in cfg.task_specs if s.name in tasks]
        del model
        release_memory()
        simplified = None
        if opts.simplify:
            with timer.phase("onnxslim"):
                simplified, slim, summary = _simplify(onnx_tmp, summary)
            if slim is not None:  # a new graph: checked again
                with timer.phase("graph_checks"):
                    check_graph(onnx_tmp, summary)
                    sites = check_resize_conformance(onnx_tmp, cfg, tasks, proto=slim)
                proto = slim if inline else None
                del slim
        parity = None
        if opts.verify:
            with timer.phase("verification_onnxruntime"):
                parity = compare_outputs(ref, ort_outputs(onnx_tmp, feeds, tasks), specs, opts.tolerance)
                del ref, feeds
                release_memory()
            log = _logger.info if parity.passed else _logger.error
            log("verification (ONNX Runtime CPU vs PyTorch):\n%s", parity.markdown())
            if not parity.passed:
                bad = {k: v.failures for k, v in parity.tasks.items() if not v.passed}
                raise VerificationError(
                    f"ONNX Runtime disagrees with PyTorch for {sorted(bad)} ({bad}); '{out}' was not written. An FP32 "
                    "export should match to float rounding, so this is an exporter or runtime problem, not a property "
                    "of your model: re-run with -v to see the per-task table and report it with your torch, onnx, "
                    "onnxscript and onnxruntime versions (pip list). To inspect the graph anyway, re-run with "
                    "--no-verify (its manifest then records that it was not verified)."
                )
        with timer.phase("write"):
            if inline:  # one file again, hashed while it is written
                written = _inline_weights(onnx_tmp, proto)
                del proto
            else:
                written = WrittenOnnx(onnx_tmp, sha256_file(onnx_tmp), summary, summary.external_data)
            manifest = _export_manifest(written, staging, out, cfg, tasks, opts, parent, simplified, len(sites),
                                        parity, timer)
            manifest.save(manifest_path_for(onnx_tmp))
            publish(staging, out, list(manifest.external_data), error_cls=ExportError)
    return ExportResult(out, manifest_path_for(out), manifest, parity, dict(timer.seconds), timer)


def _export_manifest(written: WrittenOnnx, staging: Path, out: Path, cfg, tasks: tuple[str, ...],
                     opts: ExportOptions, parent: Optional[dict], simplified: Optional[dict], resize_nodes: int, parity,
                     timer: PhaseTimer) -> Manifest:
    """The FP32 ONNX's manifest, from what was written (``written``: its sha256 and graph summary, not read again)."""
    data_files = list(written.external_data)
    size = written.path.stat().st_size + sum((staging / d).stat().st_size for d in data_files)
    inputs, outputs = io_for_config(cfg, "batch" if opts.dynamic_batch else opts.batch, tasks)
    return Manifest(
        artifact=out.name,
        kind="onnx",
        precision="fp32",
        config=cfg.to_dict(),
        inputs=inputs,
        outputs=outputs,
        preprocessing=Preprocessing(size=tuple(cfg.image_size), mode=opts.preprocess_mode),
        sha256=written.sha256,
        size_bytes=size,
        external_data=tuple(data_files),
        parent=parent,
        export={
            "exporter": "torch.onnx (dynamo)",
            "opset": opts.opset,
            "batch": "dynamic" if opts.dynamic_batch else opts.batch,
            "tasks": list(tasks),
            "simplified": simplified,
            "op_census": written.summary.op_census,
            "resize_nodes": resize_nodes,
        },
        verification=parity.to_dict() if parity else None,
        versions=tool_versions("onnx", "onnxruntime", "onnxscript", "onnxslim"),
        command=opts.command or " ".join(sys.argv),
        created=now_iso(),
        timings=timer.to_dict(),
    )
