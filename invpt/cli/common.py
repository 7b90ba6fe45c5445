"""Pieces every invpt console script shares: logging setup, argument groups, and the error-to-exit-code rule.

Library code only logs to ``logging.getLogger('invpt.*')``; only a CLI's ``main`` calls
:func:`configure_logging`. A user error (:class:`~invpt.errors.InvptError`) becomes one logged paragraph
and a non-zero exit; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from invpt.errors import InputError, InvptError

LOG_FORMAT = "[invpt] %(levelname)s %(message)s"


def configure_logging(verbosity: int = 0, log_file: Optional[str] = None) -> None:
    """Send the ``invpt`` logger (and its children) to stderr; -v for debug, -q for warnings only."""
    level = logging.INFO - 10 * verbosity
    logger = logging.getLogger("invpt")
    logger.setLevel(max(level, logging.DEBUG))
    for h in list(logger.handlers):
        if not isinstance(h, logging.NullHandler):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    if log_file:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s " + LOG_FORMAT))
        logger.addHandler(fh)
    logger.propagate = False


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    """Add -v/-q/--log-file to a parser (the 'Logging' group)."""
    g = parser.add_argument_group("Logging")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more detail (-v: debug)")
    g.add_argument("-q", "--quiet", action="count", default=0, help="less detail (-q: warnings and errors only)")
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


def run_main(fn: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> int:
    """Parse ``argv``, set up logging, run ``fn(args)``; map InvptError to its exit code with one message."""
    args = parser.parse_args(argv)
    configure_logging(args.verbose - args.quiet, args.log_file)
    log = logging.getLogger("invpt")
    try:
        return int(fn(args) or 0)
    except InvptError as err:
        log.error("%s", err)
        return err.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    A failure (or Ctrl-C) removes the temporary file, so no half-written output is ever left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


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
