"""Export stage: InvPT checkpoint -> verified ONNX (``invpt-export``).

Public API: :func:`run_export` (the whole stage), :func:`export_onnx` (graph only),
:func:`verify_onnx` and :func:`compare_outputs` (parity), :func:`check_graph`.
Names are imported on first use (PEP 562), so importing the package (and ``invpt-export --help``) stays fast.
"""
from invpt.lazy import lazy_face

_EXPORTS = {
    "check_graph": "invpt.export.graph_checks",
    "expected_resize_sizes": "invpt.export.graph_checks",
    "resize_sites": "invpt.export.graph_checks",
    "DEFAULT_OPSET": "invpt.export.onnx_export",
    "OnnxExportWrapper": "invpt.export.onnx_export",
    "export_onnx": "invpt.export.onnx_export",
    "FP32_TOLERANCE": "invpt.export.parity",
    "ParityReport": "invpt.export.parity",
    "Tolerance": "invpt.export.parity",
    "compare_outputs": "invpt.export.parity",
    "ExportResult": "invpt.export.pipeline",
    "run_export": "invpt.export.pipeline",
    "verify_onnx": "invpt.export.pipeline",
}
__getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
