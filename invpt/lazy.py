"""Lazy package faces (PEP 562) and optional-dependency imports that name the extra to install.

A package ``__init__`` lists its public names and the submodule that defines each; nothing is imported
until a name is used, so ``invpt-export --help`` does not pay for torch, onnx or ModelOpt.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable, Mapping

from invpt.errors import DependencyError

# Which extra of ``pip install 'invpt[EXTRA]'`` provides a top-level module.
EXTRA_OF = {
    "onnx": "export",
    "onnxruntime": "export",
    "onnxscript": "export",
    "onnxslim": "export",
    "modelopt": "calib",
    "onnx_graphsurgeon": "calib",
    "polygraphy": "calib",
    "matplotlib": "calib",
    "tensorrt_rtx": "rtx",
}


def lazy_face(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for a package whose public ``name`` lives in ``exports[name]`` (a submodule)."""

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__


def require(module: str, extra: str | None = None, purpose: str = "") -> ModuleType:
    """Import an optional dependency, or raise DependencyError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = extra or EXTRA_OF.get(module.split(".")[0], "all")
        why = f" ({purpose})" if purpose else ""
        raise DependencyError(
            f"'{module}' is not installed{why}; install the '{extra}' extra: pip install 'invpt[{extra}]' "
            f"(import failed: {err})."
        ) from err
