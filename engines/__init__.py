"""Engine stage: ``invpt-trt-build``, a strongly typed TensorRT engine (TensorRT 10.3-11.x or TensorRT for RTX)
from an invpt ONNX file, checked on CPU against the ONNX manifest's precision policy before it is built, written
atomically with its manifest ``<plan>.json``. Names are imported on first use (PEP 562); TensorRT itself only
when a build runs.
"""
from invpt.lazy import lazy_face

_EXPORTS = {
    "Backend": "invpt.engines.backend",
    "load_backend": "invpt.engines.backend",
    "BuildOptions": "invpt.engines.build",
    "BuildResult": "invpt.engines.build",
    "run_build": "invpt.engines.build",
    "engine_build_info": "invpt.engines.build",
    "check_precision": "invpt.engines.precision",
    "parse_onnx": "invpt.engines.network",
    "summarize_network": "invpt.engines.network",
}
__getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
