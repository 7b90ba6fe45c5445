"""Checking the paths a user hands us, once, with messages that say what is actually wrong.

Every stage validates its inputs with these helpers before any expensive work (loading a checkpoint,
exporting, calibrating), so a typo costs a second, not the minutes a ViT-L load takes.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Type

from invpt.errors import InputError, InvptError


def describe_path_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a regular file, or None when it can."""
    try:
        st = path.stat()
    except FileNotFoundError:
        parent = path.parent
        if str(parent) not in ("", ".") and not parent.exists():
            return f"does not exist (nor does its folder '{parent}')"
        return "does not exist"
    except PermissionError:
        return "cannot be accessed (permission denied on the path)"
    except OSError as err:
        return f"cannot be accessed ({err.strerror or err})"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else (
            "a socket" if stat.S_ISSOCK(st.st_mode) else "a device or special file")
        return f"is {kind}, not a regular file"
    if not os.access(path, os.R_OK):
        return "is not readable (permission denied)"
    return None


def require_file(path: str | os.PathLike, what: str, fix: str, error_cls: Type[InvptError] = InputError) -> Path:
    """Return ``path`` if it is a readable regular file; else raise ``error_cls`` with one paragraph.

    ``what`` names the file's role ("Checkpoint", "ONNX file"), ``fix`` says what to pass instead.
    """
    p = Path(path)
    problem = describe_path_problem(p)
    if problem:
        raise error_cls(f"{what} '{p}' {problem}. {fix}")
    return p


def require_dir(path: str | os.PathLike, what: str, fix: str, error_cls: Type[InvptError] = InputError) -> Path:
    """Return ``path`` if it is an existing directory; else raise ``error_cls`` with one paragraph."""
    p = Path(path)
    if p.is_dir():
        return p
    problem = "does not exist" if not p.exists() else "is not a directory"
    raise error_cls(f"{what} '{p}' {problem}. {fix}")
