"""Writing and reading artifacts so that nothing the user owns is lost and nothing stale is used.

One mechanism, used by every stage (export, calib, engines):

* :func:`check_output` refuses, before any work, an output path that would overwrite an input (the file itself,
  its manifest or its external data, through any path or hard link), a directory or special file, or a ``.json``
  name (manifests own that name).
* :func:`staging_dir` gives a fresh hidden folder beside the output (``.NAME.staging.XXXX``) that holds an
  ``flock`` for the life of the run. At start it removes the stale staging folders of earlier killed runs of the
  same output (those whose lock nobody holds), never one of a live concurrent run. While it is open, the library
  temp dir (``tempfile.tempdir`` and ``$TMPDIR``) points inside it, so temp files of ModelOpt or onnxruntime go
  with it.
* :func:`publish` moves the staged files into place under an exclusive ``flock`` on ``.NAME.lock`` beside the
  output: side files (external data) first, then the manifest, the artifact last. If a rename fails, the files
  already replaced are restored (or removed if there was none), so the pair on disk stays the old one.
* :func:`verified_manifest` reads an input artifact's manifest and checks the artifact's sha256 (and its external
  data's total size) against it under the shared lock, so a reader never sees a half-published pair and no stage
  uses a file edited after its manifest was written.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Type

from invpt.atomic import fsync_path
from invpt.errors import InputError, InvptError, ManifestError
from invpt.manifest import Manifest, manifest_path_for, sha256_file
from invpt.onnx_summary import GraphSummary, external_data_locations
from invpt.paths import check_output_dir, describe_path_problem, require_file, same_file

_logger = logging.getLogger(__name__)

STAGING_INFIX = ".staging."
STAGING_LOCK = ".lock"
# A staging folder with no lock file is either being created this very moment or was left by a run killed in the
# microseconds between creating it and locking it (or by an invpt version without staging locks): removed once
# it is this old.
UNLOCKED_STAGING_GRACE_S = 3600.0


# ---- locks ------------------------------------------------------------------------------------------------
def lock_path_for(out: str | os.PathLike) -> Path:
    """The hidden lock file that serialises publishing and reading ``out``: ``dir/.NAME.lock`` (never removed)."""
    out = Path(out)
    return out.parent / f".{out.name}.lock"


@contextmanager
def artifact_lock(out: str | os.PathLike, shared: bool = False) -> Iterator[bool]:
    """Hold ``flock`` on :func:`lock_path_for` (exclusive to publish, shared to read); yields whether it is held.

    A reader never creates the lock file (reading leaves the input's folder as it was): where none exists, no invpt
    run has published there, and it reads unlocked. A writer creates it; one that cannot (read-only folder) cannot
    publish either, and the rename that follows reports why.
    """
    path = lock_path_for(out)
    fd: Optional[int] = None
    try:
        fd = os.open(path, (os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT) | os.O_CLOEXEC, 0o666)
    except OSError:
        fd = None
    if fd is None:
        if not shared:
            _logger.debug("cannot create lock file %s; publishing without it", path)
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # closing releases the lock


# ---- output checks ----------------------------------------------------------------------------------------
def _protected_files(inp: Path) -> list[tuple[Path, str]]:
    """An input and the files that belong to it: its manifest and the external-data files the manifest lists
    (or, without a readable manifest, the ``NAME.data`` convention of invpt-export)."""
    files = [(inp, "the input"), (manifest_path_for(inp), "the input's manifest")]
    data_names = [inp.name + ".data"]
    try:
        man = Manifest.load(manifest_path_for(inp))
        data_names += list(man.external_data)
    except (InvptError, OSError):
        pass
    files += [(inp.parent / n, "the input's external-data file") for n in dict.fromkeys(data_names)]
    return files


def check_output(
    out: str | os.PathLike,
    inputs: Iterable[Optional[str | os.PathLike]] = (),
    error_cls: Type[InvptError] = InputError,
) -> Path:
    """Refuse an output path that would destroy an input or cannot be published; returns ``Path(out)``.

    Call it before any work (before loading a model). Refused, each with one paragraph naming the path and the fix:
    a name ending in ``.json`` (manifests own it); an existing directory or special file (FIFO, socket, device);
    an output whose manifest path is a directory or special file; an output, its manifest or its ``NAME.data``
    that is (by resolved path, or by inode: symlinks and hard links included) one of ``inputs``, an input's
    manifest, or an external-data file an input's manifest lists; a folder that cannot be created or written.
    ``inputs`` may contain None (skipped).
    """
    out = Path(out)
    fix = "Choose another --out path"
    if out.name.lower().endswith(".json"):
        raise error_cls(
            f"Output '{out}' ends in .json, the name every invpt manifest has (model.onnx gets model.json); an "
            f"artifact there would collide with a manifest. {fix} (for example '{out.with_suffix('.onnx')}')."
        )
    if out.name in ("", ".", ".."):
        raise error_cls(f"Output '{out}' names a folder, not a file. {fix} (a file name such as 'model.onnx').")
    man = manifest_path_for(out)
    for path, role in ((out, "Output"), (man, "The output's manifest path")):
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):  # nothing there (or a dangling symlink: the rename replaces it)
            continue
        except OSError as err:
            raise error_cls(f"{role} '{path}' cannot be accessed ({err.strerror or err}). {fix}.") from err
        if stat.S_ISDIR(st.st_mode):
            raise error_cls(f"{role} '{path}' is an existing directory; invpt writes a file there and never replaces "
                            f"a directory. {fix} (a file name inside it, e.g. '{path / 'model.onnx'}').")
        if not stat.S_ISREG(st.st_mode):
            problem = describe_path_problem(path) or "is not a regular file"
            raise error_cls(f"{role} '{path}' {problem}; invpt only replaces regular files. {fix}.")
    mine = [(out, ""), (man, "its manifest"), (out.parent / (out.name + ".data"), "its external data")]
    for inp in inputs:
        if inp is None:
            continue
        for theirs, role in _protected_files(Path(inp)):
            for ours, our_role in mine:
                if same_file(ours, theirs):
                    what = (f"Output '{out}' is {role} '{theirs}' (the same file)" if not our_role else
                            f"Output '{out}' would write {our_role} '{ours}', which is {role} '{theirs}'")
                    raise error_cls(
                        f"{what}; writing it would destroy an input, and invpt never writes into its inputs. "
                        "Choose another --out path (e.g. a new name in the same folder)."
                    )
    # An existing file there is replaced only when it is invpt's own earlier artifact at this very path: an invpt
    # manifest beside it names it. Anything else (a checkpoint, a user's file, another artifact's manifest) is kept.
    named, recorded_sha = _manifest_record(man) if man.is_file() else (None, None)
    if named is not None and named != out.name and out.is_file() and recorded_sha == sha256_file(out):
        named = out.name  # a renamed artifact: its manifest (renamed with it) describes exactly this file
    if man.is_file() and named != out.name:
        whose = (f"the manifest of '{out.parent / named}'" if named else "not an invpt manifest")
        raise error_cls(
            f"The output's manifest path '{man}' already exists and is {whose}; writing '{out}' would replace it "
            f"(invpt never replaces a file it did not make for this output). {fix}, or move '{man}' away."
        )
    if out.is_file() and named != out.name:
        raise error_cls(
            f"Output '{out}' already exists and is not an invpt artifact made at this path (no invpt manifest "
            f"'{man}' names it); invpt replaces only its own earlier outputs. {fix}, or move '{out}' away."
        )
    # The folder: the nearest existing ancestor must be a writable directory.
    check_output_dir(out.parent if str(out.parent) else Path("."), f"The folder of '{out}'",
                     "Choose a writable --out location.", error_cls)
    return out


def _manifest_record(man: Path) -> tuple[Optional[str], Optional[str]]:
    """(artifact file name, sha256) an invpt manifest at ``man`` records, or (None, None) if ``man`` is not one
    (unreadable, not JSON, another schema)."""
    import json

    from invpt.manifest import SCHEMA

    try:
        data = json.loads(man.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("artifact"), str):
        return None, None
    sha = data.get("sha256")
    return Path(data["artifact"]).name, sha if isinstance(sha, str) else None


# ---- staging ------------------------------------------------------------------------------------------------
def _staging_prefix(out: Path) -> str:
    return f".{out.name}{STAGING_INFIX}"


def clean_stale_staging(out: str | os.PathLike) -> list[Path]:
    """Remove the staging folders of earlier runs of ``out`` that were killed; returns what was removed.

    A folder whose lock can be taken belongs to no live run. One whose lock is held (a concurrent run) is kept.
    One without a lock file is removed only after :data:`UNLOCKED_STAGING_GRACE_S`.
    """
    out = Path(out)
    prefix = _staging_prefix(out)
    removed = []
    try:
        names = [n for n in os.listdir(out.parent if str(out.parent) else ".") if n.startswith(prefix)]
    except OSError:
        return removed
    for name in names:
        folder = out.parent / name
        if folder.is_symlink() or not folder.is_dir():
            continue
        try:
            fd = os.open(folder / STAGING_LOCK, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            try:
                age = time.time() - folder.stat().st_mtime
            except OSError:
                continue
            if age > UNLOCKED_STAGING_GRACE_S:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
            continue
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    _logger.debug("staging folder %s belongs to a running invpt process; kept", folder)
                    continue
                raise
            shutil.rmtree(folder, ignore_errors=True)  # while holding its lock: no one else can claim it
            removed.append(folder)
        finally:
            os.close(fd)
    for folder in removed:
        _logger.info("removed stale staging folder of an interrupted run: %s", folder)
    return removed


@contextmanager
def _redirect_tempdir(tmp: Path) -> Iterator[None]:
    old_tempdir, old_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(tmp)
    os.environ["TMPDIR"] = str(tmp)
    try:
        yield
    finally:
        tempfile.tempdir = old_tempdir
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env


@contextmanager
def staging_dir(out: Path, error_cls: Type[InvptError], *, redirect_tmp: bool = True) -> Iterator[Path]:
    """A fresh, locked folder beside ``out`` (``.NAME.staging.XXXX``), removed with its contents when the block ends.

    Stale staging folders of earlier killed runs of ``out`` are removed first (:func:`clean_stale_staging`). With
    ``redirect_tmp``, ``tempfile.tempdir`` and ``$TMPDIR`` point at ``<staging>/tmp`` inside the block (restored
    afterwards), so library temp files are removed with the folder even when the run is killed.
    """
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(out)
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(out), dir=out.parent))
    except OSError as err:
        raise error_cls(
            f"Cannot write to '{out.parent}' ({err.strerror or err}). Choose a writable --out location."
        ) from err
    fd: Optional[int] = None
    try:
        # Lock under a temporary name, then rename: the lock file never exists unlocked (see clean_stale_staging).
        new_lock = staging / (STAGING_LOCK + ".new")
        fd = os.open(new_lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.replace(new_lock, staging / STAGING_LOCK)
        if redirect_tmp:
            tmp = staging / "tmp"
            tmp.mkdir()
            with _redirect_tempdir(tmp):
                yield staging
        else:
            yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if fd is not None:
            os.close(fd)


# ---- publishing ---------------------------------------------------------------------------------------------
def _backup(dst: Path, backup_dir: Path) -> Optional[Path]:
    """Keep the current ``dst`` (if any) under ``backup_dir`` so a failed publish can put it back."""
    if not dst.is_file():
        return None
    backup_dir.mkdir(exist_ok=True)
    backup = backup_dir / dst.name
    try:
        os.link(dst, backup)  # no copy: a second name for the same data
    except OSError:
        shutil.copy2(dst, backup)
    return backup


def publish(
    staging: Path,
    out: Path,
    side_files: Iterable[str] = (),
    *,
    error_cls: Type[InvptError] = InputError,
) -> None:
    """Move ``side_files`` (names inside ``staging``), then the manifest, then the artifact to ``out``'s folder.

    Everything happens under the exclusive lock on ``.NAME.lock`` (readers using :func:`verified_manifest` take it
    shared), so two runs publishing to one path never interleave and a reader never sees one run's manifest with
    the other's artifact. If a rename fails, every file already replaced is restored (or removed if it is new),
    and the error propagates. Files are fsynced before the renames and the folder after them.
    """
    staging, out = Path(staging), Path(out)
    moves = [(staging / name, out.parent / name) for name in side_files]
    staged_manifest = manifest_path_for(staging / out.name)
    if staged_manifest.exists():
        moves.append((staged_manifest, manifest_path_for(out)))
    moves.append((staging / out.name, out))
    for src, _ in moves:
        fsync_path(src)
    backup_dir = staging / ".replaced"
    with artifact_lock(out):
        for path in (out, manifest_path_for(out)):
            if path.exists() and not path.is_file():
                problem = describe_path_problem(path) or "is not a regular file"
                raise error_cls(f"Cannot publish '{out}': '{path}' {problem} (it appeared while this run was working). "
                                "Move it away or choose another --out path, then re-run.")
        done: list[tuple[Path, Optional[Path]]] = []
        try:
            for i, (src, dst) in enumerate(moves):
                last = i == len(moves) - 1
                backup = None if last else _backup(dst, backup_dir)
                try:
                    os.replace(src, dst)
                except BaseException:
                    if backup is not None:
                        backup.unlink(missing_ok=True)
                    raise
                done.append((dst, backup))
        except BaseException:
            for dst, backup in reversed(done):
                try:
                    if backup is not None:
                        os.replace(backup, dst)
                    else:
                        dst.unlink(missing_ok=True)
                except OSError as err:  # pragma: no cover - the disk failed under us
                    _logger.error("could not restore '%s' after a failed publish: %s", dst, err)
            raise
        fsync_path(out.parent)
    shutil.rmtree(backup_dir, ignore_errors=True)


# ---- reading ------------------------------------------------------------------------------------------------
def _regenerate_hint(man: Manifest) -> str:
    if man.kind == "onnx" and man.precision == "fp32":
        how = "re-export it with invpt-export"
    elif man.kind == "onnx":
        how = f"re-create it with invpt-quantize --precision {man.precision}"
    else:
        how = "rebuild it with the stage that made it"
    if man.command:
        how += f" (it was made by: {man.command})"
    return how


def verified_manifest(
    artifact: str | os.PathLike,
    error_cls: Type[InvptError] = ManifestError,
    *,
    what: str = "Artifact",
) -> Manifest:
    """The manifest of an input ``artifact``, after checking that it still describes the file.

    ``artifact`` must be a readable regular file; its manifest (:func:`~invpt.manifest.manifest_path_for`) must
    load; the file's sha256 must equal the manifest's ``sha256``; the external-data files the manifest lists must
    be regular files beside it, and the artifact plus them must total the manifest's ``size_bytes``. The manifest
    is read and the file hashed under the shared lock of :func:`publish` (when its lock file exists, i.e. an invpt run
    published there), so a concurrent publish is never seen half done. Any failure raises ``error_cls`` (exit 2) naming the file, both values and the fix.
    """
    artifact = Path(artifact)
    require_file(artifact, what, "Pass the file written by an invpt stage (its JSON manifest must be beside it).",
                 error_cls)
    man_path = manifest_path_for(artifact)
    with artifact_lock(artifact, shared=True):
        try:
            man = Manifest.load(man_path)
        except ManifestError as err:
            if error_cls is ManifestError:
                raise
            raise error_cls(str(err)) from err
        if not man.sha256:
            raise error_cls(f"Manifest '{man_path}' records no sha256 for '{artifact}', so the file cannot be checked "
                            f"against it; {_regenerate_hint(man)}.")
        actual = sha256_file(artifact)
        if actual != man.sha256:
            raise error_cls(
                f"'{artifact}' does not match its manifest '{man_path}': sha256 {actual} on disk, {man.sha256} "
                f"recorded. The file was changed (or replaced) after the manifest was written, so the manifest's "
                f"verification and provenance do not describe it. Restore the original file, or {_regenerate_hint(man)}."
            )
        size = artifact.stat().st_size
        for name in man.external_data:
            data = artifact.parent / name
            if Path(name).name != name:
                raise error_cls(f"Manifest '{man_path}' lists external data '{name}' outside the artifact's folder; "
                                f"{_regenerate_hint(man)}.")
            problem = describe_path_problem(data)
            if problem:
                raise error_cls(
                    f"External-data file '{data}' of '{artifact}' {problem}; the weights live there. Keep it next to "
                    f"the artifact (move both together), or {_regenerate_hint(man)}."
                )
            size += data.stat().st_size
        if man.size_bytes and size != man.size_bytes:
            raise error_cls(
                f"'{artifact}' plus its external data {list(man.external_data)} total {size} bytes, but its manifest "
                f"'{man_path}' records {man.size_bytes}. The external data was changed or replaced; restore it, or "
                f"{_regenerate_hint(man)}."
            )
    return man



def private_copy(src: str | os.PathLike, into_dir: str | os.PathLike, expect_sha256: Optional[str] = None, *,
                 summary: Optional[GraphSummary] = None) -> Path:
    """Copy the ONNX file ``src`` and the external-data files it references into ``into_dir``; return the copy.

    ``expect_sha256``: the sha256 its manifest records; the model file is hashed while it is copied (one read, not
    a copy and then a hash of a 1.6 GB file) and a copy that differs is an :class:`~invpt.errors.InputError`: the
    user's file changed after the stage checked it.

    A stage hands libraries (ModelOpt, onnxruntime's quantizer) this copy, never the user's file: they rewrite their
    input in place (shape inference) or write beside it. The copy is a real one (a new inode, not a hard link, which a
    library opening the path for writing would truncate through) and writable whatever the source's mode, so
    ModelOpt's fallback for a read-only input folder (a temp folder it never removes) never triggers. External data
    keeps its relative location; a location outside the model's folder, or a missing file, is an
    :class:`~invpt.errors.InputError` naming it.

    ``summary``: ``src``'s :class:`~invpt.onnx_summary.GraphSummary` when the caller has read it; its
    ``external_data`` names the files to copy, and ``src`` is not parsed here (parsing a self-contained model reads
    all its inline weights).
    """
    src, into = Path(src), Path(into_dir)
    into.mkdir(parents=True, exist_ok=True)
    dst = into / src.name
    locations = list(summary.external_data) if summary is not None else _read_external_data_locations(src)
    for loc in locations:
        rel = Path(loc)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise InputError(
                f"'{src}' keeps weights in '{loc}', outside its own folder; invpt only reads external data beside the "
                "model. Re-export it with invpt-export (which writes <name>.onnx.data next to it)."
            )
        data = src.parent / rel
        problem = describe_path_problem(data)
        if problem:
            raise InputError(
                f"External-data file '{data}' of '{src}' {problem}; the weights live there. Keep it next to the model "
                "(move both together), or re-export with invpt-export."
            )
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
        _copy_new_inode(data, into / rel)
    digest = _copy_new_inode(src, dst, hashed=expect_sha256 is not None)
    if expect_sha256 is not None and digest != expect_sha256:
        raise InputError(
            f"'{src}' changed after invpt checked it against its manifest (sha256 {digest[:12]}... now, "
            f"{expect_sha256[:12]}... recorded); nothing was written. Run again once it is no longer being written."
        )
    return dst


def _read_external_data_locations(src: Path) -> list[str]:
    """The external-data locations of the ONNX file ``src`` (its graph parsed, external data not loaded)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(src), load_external_data=False)
    except (DecodeError, OSError) as err:
        raise InputError(
            f"'{src}' is not a readable ONNX model ({type(err).__name__}: {err}); it is truncated, unreadable or not an "
            "ONNX file. Re-export it with invpt-export."
        ) from err
    return external_data_locations(proto)


def _copy_new_inode(src: Path, dst: Path, hashed: bool = False) -> Optional[str]:
    """``shutil.copyfile`` into a fresh inode: an existing ``dst`` is unlinked first, never truncated (it could be a
    hard link of someone's file); ``dst`` being ``src`` itself is a bug in the caller. With ``hashed``, the bytes
    are copied in chunks and their sha256 (hex) returned."""
    if os.path.lexists(dst):
        if os.path.exists(dst) and os.path.samefile(src, dst):
            raise ValueError(f"private_copy: '{dst}' is the source file itself; copy into a folder of the stage's own")
        os.unlink(dst)
    if not hashed:
        shutil.copyfile(src, dst)
        return None
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while block := fin.read(1 << 22):
            h.update(block)
            fout.write(block)
    return h.hexdigest()
