"""Structural checks of an exported InvPT graph: checker, shape inference, op rules, Resize conformance."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

from invpt.config import InvPTConfig
from invpt.errors import ExportError
from invpt.onnx_summary import GraphSummary, read_summary

_logger = logging.getLogger(__name__)

FORBIDDEN_OPS = ("Einsum",)  # older TensorRT parsers reject it; newer ones restrict it


@dataclass(frozen=True)
class ResizeSite:
    """One interpolate call site of the model as it appears in the graph."""

    node: str
    module: str
    mode: str
    coordinate_transformation_mode: str
    output_hw: Optional[tuple[int, int]]


def check_graph(path: str | os.PathLike, summary: Optional[GraphSummary] = None) -> None:
    """``onnx.checker`` (full, with strict shape inference) on a file, then the op rules; any failure becomes an
    ExportError.

    The checker reads the file by path (external weights stay on disk: only their files' presence is checked).
    ``summary`` is the file's :class:`~invpt.onnx_summary.GraphSummary` when the caller has it (it just wrote the
    file); otherwise the graph is read once more for the op rules.
    """
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:
        raise ExportError(f"'{path}' fails onnx.checker (full check): {str(err).splitlines()[0][:400]}") from err
    if summary is None:
        summary = read_summary(path)
    bad = sorted({op for _, op in summary.nodes if op in FORBIDDEN_OPS})
    if bad:
        raise ExportError(f"'{path}' contains {bad}; the model must export attention as MatMul (no Einsum).")


def expected_resize_sizes(cfg: InvPTConfig, tasks: Optional[tuple[str, ...]] = None) -> list[tuple[int, int]]:
    """Output (H, W) of every bilinear resize of the deployed graph, derived from the spec.

    One decoder-input resize (to H/32), then per task: three attention-output x2 (one per stage),
    two message-passing x2 (stages 1, 2), two UpEmbed x2 (stages 1, 2); and per *output* task three
    aggregation resizes to H/4 and the final upsample to (H, W).
    """
    tasks = tasks or cfg.tasks
    g0, g1, g2 = cfg.stage_grids
    q = [(g[0] // 2, g[1] // 2) for g in (g0, g1, g2)]
    sizes = [g0]
    for _ in cfg.tasks:
        sizes += [g0, g1, g2]  # attention output back to stage resolution
        sizes += [q[1], q[2]]  # message passing onto the next stage's query grid
        sizes += [g1, g2]  # UpEmbed
    for _ in tasks:
        sizes += [cfg.feature_size] * 3 + [tuple(cfg.image_size)]
    return sorted(tuple(s) for s in sizes)


def resize_sites(model) -> list[ResizeSite]:
    """Every Resize node with its attributes and inferred output spatial size. ``model`` is an ONNX file or an
    in-memory ``ModelProto`` (e.g. the graph a stage has just written: then nothing is read again)."""
    import onnx
    from onnx import helper, shape_inference

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    inferred = shape_inference.infer_shapes(proto)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    sites = []
    for n in proto.graph.node:
        if n.op_type != "Resize":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        shp = shapes.get(n.output[0])
        hw = tuple(shp[-2:]) if shp and len(shp) == 4 and None not in shp[-2:] else None
        sites.append(
            ResizeSite(
                node=n.name,
                module=n.name.rsplit("/", 1)[0],
                mode=attrs.get("mode", b"nearest").decode(),
                coordinate_transformation_mode=attrs.get("coordinate_transformation_mode", b"half_pixel").decode(),
                output_hw=hw,
            )
        )
    return sites


ALIGN_CORNERS_FALSE_MODES = ("half_pixel", "pytorch_half_pixel")  # what F.interpolate(align_corners=False) becomes


def check_resize_conformance(path: str | os.PathLike, cfg: InvPTConfig, tasks: Optional[tuple[str, ...]] = None,
                             *, proto=None) -> list[ResizeSite]:
    """Every bilinear upsampling of the model must be one ``Resize`` with mode ``linear``, a half-pixel coordinate
    mode (PyTorch's ``align_corners=False``; ``align_corners`` or ``asymmetric`` shift every output pixel) and the
    output size the spec derives (:func:`expected_resize_sizes`). Returns the sites; raises ExportError naming the
    offending nodes otherwise. ``proto``: the file's graph when the caller holds it (not read again)."""
    sites = resize_sites(proto if proto is not None else path)
    want = expected_resize_sizes(cfg, tasks)
    got = sorted(s.output_hw for s in sites if s.output_hw)
    problems = []
    wrong_mode = [f"{s.node} (mode {s.mode})" for s in sites if s.mode != "linear"]
    wrong_coord = [f"{s.node} ({s.coordinate_transformation_mode})" for s in sites
                   if s.coordinate_transformation_mode not in ALIGN_CORNERS_FALSE_MODES]
    if wrong_mode:
        problems.append(f"{len(wrong_mode)} Resize node(s) not linear: {', '.join(wrong_mode[:4])}")
    if wrong_coord:
        problems.append(f"{len(wrong_coord)} Resize node(s) with a coordinate mode other than "
                        f"{'/'.join(ALIGN_CORNERS_FALSE_MODES)}: {', '.join(wrong_coord[:4])}")
    if got != want or len(sites) != len(want):
        problems.append(f"{len(sites)} Resize nodes with sizes {got[:6]}..., expected {len(want)} with sizes "
                        f"{want[:6]}...")
    if problems:
        raise ExportError(
            f"Resize conformance failed for '{os.path.basename(path)}': {'; '.join(problems)}. This is an exporter "
            "regression: report it with your torch and onnxscript versions."
        )
    return sites
