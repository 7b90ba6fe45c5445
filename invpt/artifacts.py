"""Writing artifacts so that a failure never leaves a half-written file behind.

Every stage builds its outputs in a staging folder next to the destination and publishes them with
:func:`publish` only after all checks passed: external data and side files first, then the manifest,
the artifact itself last (so a reader that sees the artifact also sees everything it refers to).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Type

from invpt.errors import InvptError
from invpt.manifest import manifest_path_for


@contextmanager
def staging_dir(out: Path, error_cls: Type[InvptError]) -> Iterator[Path]:
    """A fresh folder beside ``out``, removed (with whatever is left in it) when the block ends."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging.", dir=out.parent))
    except OSError as err:
        raise error_cls(
            f"Cannot write to '{out.parent}' ({err.strerror or err}). Choose a writable --out location."
        ) from err
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out: Path, side_files: Iterable[str] = ()) -> None:
    """Move ``side_files`` (names inside ``staging``), then the manifest, then the artifact to ``out``'s folder."""
    for name in side_files:
        os.replace(staging / name, out.parent / name)
    manifest = manifest_path_for(staging / out.name)
    if manifest.exists():
        os.replace(manifest, manifest_path_for(out))
    os.replace(staging / out.name, out)
