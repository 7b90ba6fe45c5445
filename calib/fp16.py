"""FP16 mixed precision with NVIDIA ModelOpt AutoCast (TensorRT 11 takes precision from the ONNX)."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

from invpt.errors import DependencyError, ExportError
from invpt.calib.policy import exact_name_regexes

_logger = logging.getLogger(__name__)


def _strip_value_info(src: Path, dst: Path) -> None:
    """Copy a model without intermediate shape annotations.

    AutoCast copies stale ``value_info`` shapes onto the Casts it inserts around the message-passing
    Resize, which ONNX Runtime then rejects; without them shapes are inferred afresh and correctly.
    """
    import onnx

    proto = onnx.load(str(src))
    del proto.graph.value_info[:]
    onnx.save_model(proto, str(dst), save_as_external_data=proto.ByteSize() > 1_800_000_000,
                    location=dst.name + ".data")


def convert_fp16(onnx_path: str | os.PathLike, out_path: str | os.PathLike, keep_fp32_nodes: Sequence[str],
                 keep_fp32_op_types: Sequence[str]) -> Path:
    """Write an FP16 model with the given nodes and op types kept FP32; graph inputs/outputs stay FP32."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as err:
        raise DependencyError("nvidia-modelopt is not installed; install the calib extra: pip install 'invpt[calib]'.") from err
    import onnx

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        clean = Path(tmp) / "input.onnx"
        _strip_value_info(Path(onnx_path), clean)
        try:
            proto = convert_to_mixed_precision(
                str(clean),
                low_precision_type="fp16",
                nodes_to_exclude=exact_name_regexes(keep_fp32_nodes),
                op_types_to_exclude=list(keep_fp32_op_types),
                keep_io_types=True,
                providers=["cpu"],
            )
        except Exception as err:
            raise ExportError(f"ModelOpt AutoCast failed on '{onnx_path}': {str(err).splitlines()[0][:300]}") from err
        big = proto.ByteSize() > 1_800_000_000
        onnx.save_model(proto, str(out_path), save_as_external_data=big, location=out_path.name + ".data")
    return out_path
