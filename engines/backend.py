"""Which TensorRT Python module builds the engine, and what it can do.

Two modules share one API shape: enterprise TensorRT (``tensorrt``: 10.3 on JetPack 6, 10.13-10.16 on JetPack
7.0-7.2, 11.x on JetPack 7.2.2+ and x86) and TensorRT for RTX (``tensorrt_rtx`` 1.x, pip-installable, builds
without a GPU; its engines run on RTX-class GPUs only). Capabilities are detected on the imported module
(``hasattr``), never by parsing version strings; facts that no attribute reveals (TensorRT-RTX ignores timing
caches, has no hardware-compatibility levels and no lean runtime for version-compatible plans) are tied to the
backend kind.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from invpt.errors import DependencyError, InputError

_logger = logging.getLogger(__name__)
_TRT_LOGGER: Optional[tuple[str, Any]] = None

MODULES = {"tensorrt": "tensorrt", "rtx": "tensorrt_rtx"}
TITLES = {"tensorrt": "TensorRT", "rtx": "TensorRT-RTX"}
INSTALL_HINT = (
    'Install one of the two packages that provide it: TensorRT for RTX with `pip install "invpt[rtx]"` (the '
    "tensorrt-rtx-cu13 wheel; installs on any x86 Linux or Windows machine, builds without a GPU, engines run on "
    "RTX GPUs, compute capability 7.5-12.x), or enterprise TensorRT for datacenter GPUs (H100/H200, A100, L4...) "
    "and Jetson: `pip install tensorrt` from NVIDIA's package index on x86, or the python3-libnvinfer package "
    "that JetPack installs on Jetson."
)


@dataclass
class Backend:
    """An imported TensorRT module and what it supports."""

    key: str  # "tensorrt" | "rtx"
    trt: Any  # the module
    import_errors: dict[str, str] = field(default_factory=dict)

    @property
    def module_name(self) -> str:
        return MODULES[self.key]

    @property
    def title(self) -> str:
        return TITLES[self.key]

    @property
    def version(self) -> str:
        return str(getattr(self.trt, "__version__", "unknown"))

    @property
    def is_rtx(self) -> bool:
        return self.key == "rtx"

    def logger(self) -> Any:
        """The one TensorRT logger of this process, routed to ``logging`` (TensorRT keeps the first it sees).

        Errors are also kept (the last 20) so that a failed build can say why; see :meth:`logged_errors`.
        """
        global _TRT_LOGGER
        if _TRT_LOGGER is None or _TRT_LOGGER[0] != self.module_name:
            _TRT_LOGGER = (self.module_name, _make_logger(self.trt))
        return _TRT_LOGGER[1]

    def logged_errors(self) -> list[str]:
        return list(getattr(self.logger(), "errors", []))

    def describe(self) -> str:
        return f"{self.title} {self.version} (module {self.module_name})"

    # ---- capabilities (attributes of the imported module) ----------------------------------------------
    def has(self, owner: str, name: str) -> bool:
        """``has('IBuilderConfig', 'progress_monitor')``: whether the module's class has that attribute."""
        return hasattr(getattr(self.trt, owner, None), name)

    @property
    def has_compute_capability_targets(self) -> bool:
        return self.has("IBuilderConfig", "set_compute_capability") and hasattr(self.trt, "ComputeCapability")

    @property
    def has_hardware_compat(self) -> bool:
        # TensorRT-RTX exposes the attribute but ignores it ("unsupported in TensorRT-RTX"): it targets compute
        # capabilities instead.
        return (not self.is_rtx and self.has("IBuilderConfig", "hardware_compatibility_level")
                and hasattr(self.trt, "HardwareCompatibilityLevel"))

    @property
    def has_version_compatible(self) -> bool:
        # TensorRT-RTX has the flag but ships no lean runtime, so such builds fail ("libnvinfer_lean.so.1").
        return not self.is_rtx and hasattr(getattr(self.trt, "BuilderFlag", None), "VERSION_COMPATIBLE")

    @property
    def has_timing_cache(self) -> bool:
        # TensorRT-RTX keeps the calls for compatibility but they are no-ops (deprecated since TensorRT-RTX 1.2).
        return not self.is_rtx and self.has("IBuilderConfig", "create_timing_cache")

    @property
    def has_refit(self) -> bool:
        return hasattr(getattr(self.trt, "BuilderFlag", None), "REFIT")

    @property
    def has_progress_monitor(self) -> bool:
        return self.has("IBuilderConfig", "progress_monitor") and hasattr(self.trt, "IProgressMonitor")

    @property
    def has_dla(self) -> bool:
        return self.has("IBuilderConfig", "DLA_core") and hasattr(getattr(self.trt, "DeviceType", None), "DLA")

    @property
    def weak_typing_flags(self) -> bool:
        """TensorRT 10.x still has BuilderFlag.FP16/INT8 (weak typing); TensorRT 11 and TensorRT-RTX do not."""
        return hasattr(getattr(self.trt, "BuilderFlag", None), "FP16")


def _make_logger(trt: Any) -> Any:
    import collections

    sev = trt.ILogger.Severity
    levels = {sev.INTERNAL_ERROR: logging.ERROR, sev.ERROR: logging.WARNING, sev.WARNING: logging.DEBUG,
              sev.INFO: logging.DEBUG, sev.VERBOSE: logging.DEBUG - 1}
    trt_log = logging.getLogger("invpt.engines.tensorrt")

    class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: collections.deque = collections.deque(maxlen=20)

        def log(self, severity, msg):  # noqa: ANN001
            if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                self.errors.append(str(msg).strip())
            trt_log.log(levels.get(severity, logging.DEBUG), "TensorRT: %s", str(msg).strip())

    return _Logger()


def _try_import(name: str) -> tuple[Optional[Any], str]:
    try:
        return importlib.import_module(name), ""
    except ImportError as err:  # includes sys.modules[name] = None
        return None, f"{type(err).__name__}: {err}"
    except Exception as err:  # a broken install (missing shared library) must not crash the CLI
        return None, f"{type(err).__name__}: {err}"


def load_backend(choice: str = "auto") -> Backend:
    """Import the backend: ``auto`` takes enterprise ``tensorrt`` when it imports, else ``tensorrt_rtx``.

    Raises DependencyError (exit 2) when no requested module imports; the message says which packages provide one.
    """
    if choice not in ("auto", "tensorrt", "rtx"):
        raise InputError(f"--backend must be auto, tensorrt or rtx; got '{choice}'.")
    keys = ("tensorrt", "rtx") if choice == "auto" else (choice,)
    errors: dict[str, str] = {}
    for key in keys:
        mod, err = _try_import(MODULES[key])
        if mod is not None:
            backend = Backend(key, mod, errors)
            _logger.info("backend: %s", backend.describe())
            return backend
        errors[MODULES[key]] = err
        _logger.debug("cannot import %s: %s", MODULES[key], err)
    tried = "; ".join(f"{k}: {v}" for k, v in errors.items())
    raise DependencyError(f"No TensorRT Python module could be imported ({tried}). {INSTALL_HINT}")
