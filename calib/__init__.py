"""Calib stage: FP16 (ModelOpt AutoCast) and INT8 explicit Q/DQ ONNX calibrated on dataset samples
(``invpt-quantize``), with per-task parity on held-out samples and a per-block sensitivity report.
Names are imported on first use (PEP 562).
"""
from invpt.lazy import lazy_face

_EXPORTS = {
    "CalibrationData": "invpt.calib.data",
    "load_calibration_data": "invpt.calib.data",
    "PRECISION_TOLERANCES": "invpt.calib.evaluate",
    "QuantizeResult": "invpt.calib.pipeline",
    "run_quantize": "invpt.calib.pipeline",
    "FP16_POLICIES": "invpt.calib.policy",
    "INT8_POLICIES": "invpt.calib.policy",
    "Policy": "invpt.calib.policy",
    "select_nodes": "invpt.calib.policy",
}
__getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
