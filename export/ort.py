"""ONNX Runtime on CPU: the reference backend for every ONNX artifact invpt produces."""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import numpy as np

from invpt.errors import DependencyError, ExportError


def ort_session(path: str | os.PathLike, threads: Optional[int] = None, providers: Sequence[str] = ("CPUExecutionProvider",)):
    """Open an ONNX Runtime session (CPU by default); a broken file gives an ExportError naming it."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise DependencyError("onnxruntime is not installed; install the export extra: pip install 'invpt[export]'.") from err
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    except Exception as err:
        raise ExportError(
            f"ONNX Runtime cannot load '{path}' ({type(err).__name__}: {str(err).splitlines()[0][:300]}). The file is "
            "corrupt, incomplete (missing .data file?), or uses an op ONNX Runtime lacks; re-export it."
        ) from err


def run_session(session, feed: Mapping[str, np.ndarray], output_names: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """Run a session on ``feed`` and return ``name -> array`` for the requested (default: all) outputs."""
    names = list(output_names) if output_names else [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feed))))
