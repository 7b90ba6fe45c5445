"""Export stage: InvPT checkpoint -> verified ONNX (``invpt-export``).

Public API: :func:`run_export` (the whole stage), :func:`export_onnx` (graph only),
:func:`verify_onnx` and :func:`compare_outputs` (parity), :func:`check_graph`.
"""
from invpt.export.graph_checks import check_graph, expected_resize_sizes, resize_sites
from invpt.export.onnx_export import DEFAULT_OPSET, OnnxExportWrapper, export_onnx
from invpt.export.parity import FP32_TOLERANCE, ParityReport, Tolerance, compare_outputs
from invpt.export.pipeline import ExportResult, run_export, verify_onnx

__all__ = [
    "DEFAULT_OPSET", "ExportResult", "FP32_TOLERANCE", "OnnxExportWrapper", "ParityReport", "Tolerance",
    "check_graph", "compare_outputs", "expected_resize_sizes", "export_onnx", "resize_sites", "run_export",
    "verify_onnx",
]
