"""Pieces every invpt console script shares: logging setup, argument groups, and the error-to-exit-code rule.

Library code only logs to ``logging.getLogger('invpt.*')``; only a CLI's ``main`` calls
:func:`configure_logging`, which also sets the level of the third-party libraries invpt drives (-q/-v).
A user error (:class:`~invpt.errors.InvptError`) becomes one logged paragraph and a non-zero exit; a
:class:`~invpt.errors.ToolError` (a library failed: exit 4) keeps its traceback for -v and --log-file;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from invpt.errors import InputError, InvptError, ToolError

LOG_FORMAT = "[invpt] %(levelname)s %(message)s"
LIBRARY_LOG_FORMAT = "[%(name)s] %(levelname)s %(message)s"

# Python loggers of the libraries invpt-export / invpt-quantize / invpt-trt-* drive (onnxruntime's transformer
# optimizer logs as 'float16', 'fusion_utils', 'onnx_model'). They follow -q/-v through library_log_level. PyTorch's
# loggers (torch.onnx, torch.export, torch._dynamo) have handlers of their own: see TORCH_LOGS in configure_logging.
LIBRARY_LOGGERS = (
    "modelopt", "onnxruntime", "float16", "fusion_utils", "onnx_model", "onnx", "onnx_ir", "onnxscript",
    "onnxslim", "onnx_graphsurgeon", "polygraphy", "onnxconverter_common", "timm", "tensorrt", "matplotlib", "PIL",
)
TORCH_LOGS = ("onnx", "export", "dynamo")  # torch._logging.set_logs names: torch.onnx, torch.export, torch._dynamo
_INVPT_HANDLER = "_invpt_handler"  # attribute marking the handlers configure_logging installed


def library_log_level(verbosity: int) -> int:
    """Level for third-party libraries: their warnings by default, errors only with -q, info with -v, debug with -vv.

    One step quieter than invpt's own log (which shows its info by default), like pip or Ultralytics do.
    """
    if verbosity < 0:
        return logging.ERROR
    if verbosity == 0:
        return logging.WARNING
    return logging.INFO if verbosity == 1 else logging.DEBUG


def _replace_handlers(logger: logging.Logger, handlers: Sequence[logging.Handler], remove_all: bool) -> None:
    for h in list(logger.handlers):
        if getattr(h, _INVPT_HANDLER, False) or (remove_all and not isinstance(h, logging.NullHandler)):
            logger.removeHandler(h)
            if isinstance(h, logging.FileHandler):
                h.close()
    for h in handlers:
        logger.addHandler(h)


def _mark(handler: logging.Handler) -> logging.Handler:
    setattr(handler, _INVPT_HANDLER, True)
    return handler


def onnxruntime_severity(level: int) -> int:
    """ONNX Runtime's native (C++) log severity for a library level: 3 error, 2 warning, 1 info.

    One step quieter than the Python rule below debug: its INFO traces every graph transform of every session
    (over 1000 lines for one tiny-model calibration), so it starts at -vv, and its VERBOSE (0) is never switched on.
    """
    return 1 if level <= logging.DEBUG else 2 if level <= logging.WARNING else 3


def _set_native_library_levels(level: int) -> None:
    """Libraries that print through their own loggers rather than ``logging``, when installed."""
    from importlib.util import find_spec

    def installed(name: str) -> bool:
        try:
            return find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    if installed("onnxruntime"):  # the C++ log, printed straight to stderr
        import onnxruntime

        onnxruntime.set_default_logger_severity(onnxruntime_severity(level))
    if installed("onnx_graphsurgeon"):  # its G_LOGGER severities are the logging levels
        from onnx_graphsurgeon.logger import G_LOGGER as gs_logger

        gs_logger.severity = level
        gs_logger.colors = False  # else its first message is a warning that the 'colored' module is missing
    if installed("polygraphy"):
        from polygraphy.logger import G_LOGGER as poly_logger

        poly_logger.module_severity = level
    # PyTorch installs its own handlers on its loggers and resets them on import, so its levels are set through its
    # API (once it is imported: every invpt CLI imports it before parsing arguments), unless the user set TORCH_LOGS.
    torch = sys.modules.get("torch")
    set_logs = getattr(getattr(torch, "_logging", None), "set_logs", None)
    if set_logs is not None and not os.environ.get("TORCH_LOGS"):
        set_logs(**{name: level for name in TORCH_LOGS})


def configure_logging(verbosity: int = 0, log_file: Optional[str] = None) -> None:
    """Send the ``invpt`` logger (and its children) to stderr: -v for debug, -q for warnings only, -qq errors only.

    Third-party libraries (:data:`LIBRARY_LOGGERS`) go to the same stderr and ``log_file`` at
    :func:`library_log_level`; so do, through their own outputs, the native loggers of onnxruntime, onnx-graphsurgeon
    and Polygraphy and PyTorch's :data:`TORCH_LOGS` (unless ``$TORCH_LOGS`` is set). The level of the ``modelopt``
    logger is also what :mod:`invpt.calib` passes to ModelOpt, whose own console handler it replaces.
    """
    level = logging.INFO - 10 * verbosity
    formatter = logging.Formatter(LOG_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    handlers[0].setFormatter(formatter)
    lib_handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    lib_handlers[0].setFormatter(logging.Formatter(LIBRARY_LOG_FORMAT))
    if log_file:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s " + LOG_FORMAT))
        handlers.append(fh)
        lib_fh = logging.FileHandler(log_file)
        lib_fh.setFormatter(logging.Formatter("%(asctime)s " + LIBRARY_LOG_FORMAT))
        lib_handlers.append(lib_fh)
    logger = logging.getLogger("invpt")
    logger.setLevel(max(level, logging.DEBUG))
    _replace_handlers(logger, [_mark(h) for h in handlers], remove_all=True)
    logger.propagate = False
    lib_level = library_log_level(verbosity)
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        lib.setLevel(lib_level)
        _replace_handlers(lib, [_mark(h) for h in lib_handlers], remove_all=False)
        lib.propagate = False
    _set_native_library_levels(lib_level)


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    """Add -v/-q/--log-file to a parser (the 'Logging' group)."""
    g = parser.add_argument_group("Logging")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="more detail (-v: debug, and the info of the libraries invpt calls; -vv: their debug too)")
    g.add_argument("-q", "--quiet", action="count", default=0,
                   help="less detail (-q: warnings and errors only, libraries errors only; -qq: errors only)")
    g.add_argument("--log-file", default=None, help="also write the log to this file")


def add_model_args(parser: argparse.ArgumentParser, ckpt_required: bool = True) -> None:
    """Add --ckpt/--config (the 'Model' group)."""
    g = parser.add_argument_group("Model")
    g.add_argument(
        "--ckpt",
        required=ckpt_required,
        help="checkpoint: official InvPT release ({'model': {'module.'+key}}), a bare state_dict, or invpt's own",
    )
    g.add_argument(
        "--config",
        default=None,
        help="preset name (pascal_vitl, nyud_vitl, tiny_pascal, tiny_nyud) or YAML path; "
        "default: read from the checkpoint or inferred from its shapes",
    )


def _log_traceback(err: BaseException, to_stderr: bool, note: str) -> None:
    """Write ``err``'s chained traceback to the ``--log-file`` handlers, and to stderr too if ``to_stderr``."""
    log = logging.getLogger("invpt")
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (note,), (type(err), err, err.__traceback__))
    for h in log.handlers:
        if isinstance(h, logging.FileHandler) or (to_stderr and isinstance(h, logging.StreamHandler)):
            h.handle(record)


def add_provider_arg(parser: argparse.ArgumentParser) -> None:
    """Add --provider: the ONNX Runtime execution provider the runtime commands run ONNX files with."""
    parser.add_argument("--provider", default="cpu",
                        help="ONNX Runtime execution provider for ONNX files: cpu (default), cuda or tensorrt (when "
                        "the installed onnxruntime has it; else exit 2 naming the ones it has)")


def run_main(fn: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> int:
    """Parse ``argv``, set up logging, run ``fn(args)``; map InvptError to its exit code with one message.

    A :class:`~invpt.errors.ToolError` (a library failed; exit 4) also logs its chained traceback with -v, and always
    to ``--log-file``. Any other exception is a bug: its traceback goes to ``--log-file`` and it propagates.
    """
    args = parser.parse_args(argv)
    verbosity = args.verbose - args.quiet
    configure_logging(verbosity, args.log_file)
    log = logging.getLogger("invpt")
    try:
        return int(fn(args) or 0)
    except ToolError as err:
        log.error("%s", err)
        _log_traceback(err, verbosity >= 1, f"traceback of the {err.library or 'library'} failure:")
        return err.exit_code
    except InvptError as err:
        log.error("%s", err)
        return err.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as err:
        _log_traceback(err, False, "unexpected error (a bug in invpt; please report it with this traceback):")
        raise


def parse_task_list(text: Optional[str], flag: str = "--tasks") -> Optional[list[str]]:
    """``"semseg, depth"`` -> ``["semseg", "depth"]``; None (flag not given) -> None (all tasks).

    A flag given with nothing in it (``--tasks ""`` or ``--tasks ,``) is an error, never "all tasks".
    """
    if text is None:
        return None
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise InputError(f"{flag} was given but names no task ({text!r}). Name tasks separated by commas, e.g. "
                         f"{flag} semseg,normals, or leave {flag} out to use every task.")
    return tasks


def human_size(n: float) -> str:
    """Bytes as a short human string (1.2 GB)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


class Stopwatch:
    """Wall-clock timer for stage summary lines (``export ok 12.3s -> ...``)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
