"""Calib stage: FP16 (ModelOpt AutoCast) and INT8 explicit Q/DQ ONNX calibrated on dataset samples
(``invpt-quantize``), with per-task parity on held-out samples and a per-block sensitivity report.
"""
from invpt.calib.data import CalibrationData, load_calibration_data
from invpt.calib.evaluate import PRECISION_TOLERANCES
from invpt.calib.pipeline import QuantizeResult, run_quantize
from invpt.calib.policy import FP16_POLICIES, INT8_POLICIES, Policy, select_nodes

__all__ = ["CalibrationData", "FP16_POLICIES", "INT8_POLICIES", "PRECISION_TOLERANCES", "Policy", "QuantizeResult",
           "load_calibration_data", "run_quantize", "select_nodes"]
