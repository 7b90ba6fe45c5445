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


# ---- outputs ------------------------------------------------------------------------------------------------------
def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name one file: same inode (symlinks, hard links) or, if either is missing, the
    same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        pass
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return os.path.abspath(a) == os.path.abspath(b)


def is_within(child: str | os.PathLike, parent: str | os.PathLike) -> bool:
    """True when ``child`` is ``parent`` or lies below it (symlinks resolved)."""
    try:
        Path(child).resolve().relative_to(Path(parent).resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` itself or its nearest ancestor that exists (a dangling symlink counts as existing)."""
    p = Path(path).absolute()
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path: str | os.PathLike, what: str, fix: str, error_cls: Type[InvptError] = InputError) -> Path:
    """Check, before any work, that a folder can be written (or created) at ``path``; raise ``error_cls`` with one
    paragraph if not: ``path`` is a file, a folder on its way is a file, or the nearest existing folder is not
    writable. Returns ``Path(path)``."""
    p = Path(path)
    if os.path.lexists(p) and not p.is_dir():
        raise error_cls(f"{what} '{p}' {describe_path_problem(p) or 'exists and is not a folder'}; a folder is needed. "
                        f"{fix}")
    base = nearest_existing(p)
    if not base.is_dir():
        raise error_cls(f"{what} '{p}' cannot be created: '{base}' is a file, not a folder. {fix}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise error_cls(f"{what} '{p}' cannot be written: folder '{base}' is not writable (permission denied). {fix}")
    return p
