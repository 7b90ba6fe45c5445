"""invpt.atomic: the one single-file writer (mode, no partial files, stale temp files of killed writers)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from invpt.atomic import atomic_path, clean_stale_temps, write_atomic
from invpt.errors import InputError


def test_write_atomic_uses_the_umask_mode_and_replaces_whole(tmp_path):
    old = os.umask(0o027)
    try:
        p = write_atomic(tmp_path / "a.bin", lambda f: f.write(b"new"))
    finally:
        os.umask(old)
    assert p.read_bytes() == b"new" and (p.stat().st_mode & 0o777) == 0o640
    assert [x.name for x in tmp_path.iterdir()] == ["a.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("writer crashed")

    with pytest.raises(RuntimeError):
        write_atomic(p, boom)
    assert p.read_bytes() == b"old" and [x.name for x in tmp_path.iterdir()] == ["a.bin"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert p.read_bytes() == b"old" and [x.name for x in tmp_path.iterdir()] == ["a.bin"]


def test_os_errors_are_one_paragraph_naming_the_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        write_atomic(blocker / "out.png", lambda f: f.write(b"x"), "PNG")
    with pytest.raises(InputError, match="is a directory"):
        write_atomic(tmp_path, lambda f: f.write(b"x"), "PNG")


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    dead = tmp_path / f".m.json.{dead_pid}.0badc0de.tmp"
    live = tmp_path / f".m.json.{os.getpid()}.0badc0de.tmp"
    other = tmp_path / "m.json"
    for f in (dead, live, other):
        f.write_bytes(b"x")
    assert clean_stale_temps(tmp_path, ".m.json.*.tmp") == [dead]
    assert live.exists() and other.exists() and not dead.exists()
