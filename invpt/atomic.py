"""Writing one file atomically: the one helper every invpt writer uses (checkpoints, PNGs, NPY, manifests, caches,
timing caches). Whole artifacts with side files are staged and published by :mod:`invpt.artifacts` instead.

The file is written to a hidden temporary file beside the target (same file system, so the final ``os.replace`` is
atomic) and renamed over it only when the write finished: a reader sees the old file or the complete new one, never
a partial one, and a failure (or Ctrl-C) removes the temporary file. The temporary file is created with the mode any
new file gets (``0o666 & ~umask``; ``tempfile.mkstemp`` would force 0600). Its name carries the writer's pid, so a
later run can tell the leftover of a killed writer (:func:`clean_stale_temps`).
"""
from __future__ import annotations

import os
import re
import secrets
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator, Optional, Type

from invpt.errors import InputError, InvptError
from invpt.paths import nearest_existing

STALE_TEMP_AGE_S = 3600.0
_PID_IN_NAME = re.compile(r"\.(\d+)(?:\.[^.]+)?\.tmp(?:\.[A-Za-z0-9]+)?$")  # .<pid>[.<random>].tmp[.ext]


def check_output_file(path: str | os.PathLike, what: str, fix: str, error_cls: Type[InvptError] = InputError) -> Path:
    """Check, before any work, that a file can be written at ``path``; raise ``error_cls`` with one paragraph if not.

    Refused: an existing directory or special file (FIFO, socket, device) at ``path``; a folder path that runs
    through a file; a folder that is not writable.
    """
    p = Path(path)
    if os.path.lexists(p):
        try:
            mode = p.stat().st_mode
        except OSError as err:
            raise error_cls(f"{what} '{p}' cannot be accessed ({err.strerror or err}). {fix}") from None
        if stat.S_ISDIR(mode):
            raise error_cls(f"{what} '{p}' is a directory; a file path is needed. {fix}")
        if not stat.S_ISREG(mode):
            kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a special file"
            raise error_cls(f"{what} '{p}' is {kind}, not a regular file. {fix}")
    base = nearest_existing(p.parent)
    if not base.is_dir():
        raise error_cls(f"{what} '{p}' cannot be created: '{base}' is a file, not a folder. {fix}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise error_cls(f"{what} '{p}' cannot be written: folder '{base}' is not writable (permission denied). {fix}")
    return p


def open_temp_beside(path: Path, base: Optional[str] = None, suffix: str = ".tmp") -> tuple[int, Path]:
    """Create ``.<base>.<pid>.<8 hex><suffix>`` in ``path``'s folder (``base`` defaults to the file name), opened for
    writing with the umask's mode; returns the descriptor and the path."""
    base = base or path.name
    for _ in range(100):
        tmp = path.parent / f".{base}.{os.getpid()}.{secrets.token_hex(4)}{suffix}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside '{path}'")


def fsync_path(path: Path) -> None:
    """Flush a file or a folder (the rename inside it) to disk; best effort (some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = False, base: Optional[str] = None,
                suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path`` (an empty file, for libraries that write by path); rename it onto
    ``path`` when the block succeeds, remove it when it fails. ``durable`` fsyncs the file and its folder."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = open_temp_beside(p, base, suffix)
    os.close(fd)
    done = False
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, p)
        done = True
        if durable:
            fsync_path(p.parent)
    finally:
        if not done:
            tmp.unlink(missing_ok=True)


def write_atomic(
    path: str | os.PathLike,
    write: Callable[[IO[bytes]], None],
    what: str = "Output",
    error_cls: Type[InvptError] = InputError,
    *,
    durable: bool = False,
    base: Optional[str] = None,
    suffix: str = ".tmp",
) -> Path:
    """Write a file atomically with ``write(f)`` (a binary file object); see the module docstring.

    An OS error (read-only folder, disk full, path through a file) becomes ``error_cls`` with one paragraph naming
    ``what`` and the path; anything else propagates after the temporary file is removed.
    """
    p = Path(path)
    fix = "Choose a writable location with enough free space."
    check_output_file(p, what, fix, error_cls)
    try:
        with atomic_path(p, durable=durable, base=base, suffix=suffix) as tmp:
            with open(tmp, "wb") as f:
                write(f)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
    except OSError as err:
        raise error_cls(f"Could not write {what.lower()} '{p}' ({err.strerror or err}). {fix}") from err
    return p


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def clean_stale_temps(folder: Path, pattern: str, max_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Remove temporary files matching ``pattern`` in ``folder`` left by killed writers: files whose writer pid (from
    the name) is no longer alive, or older than ``max_age_s``. A live writer's file is kept."""
    removed = []
    now = time.time()
    for p in folder.glob(pattern):
        try:
            st = p.lstat()
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        m = _PID_IN_NAME.search(p.name)
        if now - st.st_mtime > max_age_s or (m is not None and not _pid_alive(int(m.group(1)))):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed
