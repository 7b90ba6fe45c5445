"""Runtime stage: runners from artifacts (ONNX Runtime, TensorRT), ``invpt-parity``, ``invpt-bench`` and
``invpt-deploy`` (the whole chain in one command). Names are imported on first use (PEP 562); torch, ONNX Runtime
and TensorRT only when a runner is built.
"""
from invpt.lazy import lazy_face

_EXPORTS = {
    "Artifact": "invpt.runtime.load",
    "load_artifact": "invpt.runtime.load",
    "load_artifacts": "invpt.runtime.load",
    "load_runner": "invpt.runtime.load",
    "check_against_model": "invpt.runtime.load",
    "reference_runner": "invpt.runtime.load",
    "TensorRTRunner": "invpt.runtime.tensorrt_runner",
    "tensorrt_unavailable_reason": "invpt.runtime.tensorrt_runner",
    "trtexec_command": "invpt.runtime.tensorrt_runner",
    "run_parity": "invpt.runtime.parity",
    "ParityReport": "invpt.runtime.parity",
    "run_bench": "invpt.runtime.bench",
    "BenchReport": "invpt.runtime.bench",
    "run_deploy": "invpt.runtime.deploy",
    "DeployResult": "invpt.runtime.deploy",
}
__getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
