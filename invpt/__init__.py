"""invpt: InvPT from a PyTorch checkpoint to verified ONNX / TensorRT inference engines.

Stages, lowest first (a stage never imports a higher one)::

    invpt (model, config, data)  ->  invpt.export  ->  invpt.calib  ->  invpt.engines  ->  invpt.runtime
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from invpt.config import BackboneConfig, ConfigLike, DecoderConfig, InvPTConfig, load_config, preset_names
from invpt.errors import InvptError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from invpt.model import InvPT

logging.getLogger("invpt").addHandler(logging.NullHandler())


def build_model(config: ConfigLike, fused_attn: bool = True) -> "InvPT":
    """Return an untrained InvPT built from a preset name, YAML path, dict or :class:`InvPTConfig`.

    Works under ``with torch.device('meta'):`` to inspect full-size models without allocating them.
    """
    from invpt.model import InvPT

    return InvPT(load_config(config), fused_attn=fused_attn)


def load_model(ckpt_path, config: ConfigLike | None = None, device="cpu", fused_attn: bool = True) -> "InvPT":
    """Load a checkpoint (official, bare or invpt format) into a model in eval mode; see :mod:`invpt.checkpoint`."""
    from invpt.checkpoint import load_model as _load

    return _load(ckpt_path, config=config, device=device, fused_attn=fused_attn)


def __getattr__(name: str):
    if name == "InvPT":
        from invpt.model import InvPT

        return InvPT
    raise AttributeError(name)


__all__ = [
    "BackboneConfig", "ConfigLike", "DecoderConfig", "InvPT", "InvPTConfig", "InvptError", "build_model",
    "load_config", "load_model", "preset_names", "__version__",
]
