"""FP16 mixed precision with NVIDIA ModelOpt AutoCast (TensorRT 11 takes precision from the ONNX)."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

from invpt.calib.int8 import modelopt_logging
from invpt.calib.policy import exact_name_regexes
from invpt.errors import DependencyError, ToolError

_logger = logging.getLogger(__name__)


def _strip_value_info(src: Path, dst: Path) -> None:
    """Copy a model without intermediate shape annotations (``src`` is only read; ``dst`` is a new file).

    AutoCast copies stale ``value_info`` shapes onto the Casts it inserts around the message-passing
    Resize, which ONNX Runtime then rejects; without them shapes are inferred afresh and correctly.

    This copy is also AutoCast's private input (in the stage's staging folder): like
    :func:`~invpt.artifacts.private_copy`, it keeps the library away from the user's file, and since it has to be
    written anyway no second copy is made.
    """
    import onnx

    proto = onnx.load(str(src))
    del proto.graph.value_info[:]
    onnx.save_model(proto, str(dst), save_as_external_data=proto.ByteSize() > 1_800_000_000,
                    location=dst.name + ".data")


def convert_fp16(onnx_path: str | os.PathLike, out_path: str | os.PathLike, keep_fp32_nodes: Sequence[str],
                 keep_fp32_op_types: Sequence[str]) -> Path:
    """Write an FP16 model with the given nodes and op types kept FP32; graph inputs/outputs stay FP32.

    AutoCast reads a private copy of ``onnx_path`` in ``out_path``'s folder (see :func:`_strip_value_info`), never the
    user's file; its log follows -q/-v (see :func:`~invpt.calib.int8.modelopt_logging`). A failure inside AutoCast is
    a :class:`~invpt.errors.ToolError`.
    """
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as err:
        raise DependencyError("nvidia-modelopt is not installed; install the calib extra: pip install 'invpt[calib]'.") from err
    import onnx

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix=".invpt-input.", dir=out_path.parent) as tmp:
        clean = Path(tmp) / "input.onnx"
        _strip_value_info(Path(onnx_path), clean)
        with modelopt_logging(cpu_only=True):
            try:
                proto = convert_to_mixed_precision(
                    str(clean),
                    low_precision_type="fp16",
                    nodes_to_exclude=exact_name_regexes(keep_fp32_nodes),
                    op_types_to_exclude=list(keep_fp32_op_types),
                    keep_io_types=True,
                    providers=["cpu"],
                )
            except Exception as err:  # any failure inside AutoCast (invpt checked the model before)
                raise ToolError.from_exception("ModelOpt AutoCast", "converting a copy of the model to FP16", err,
                                               "nvidia-modelopt") from err
        big = proto.ByteSize() > 1_800_000_000
        onnx.save_model(proto, str(out_path), save_as_external_data=big, location=out_path.name + ".data")
    return out_path
