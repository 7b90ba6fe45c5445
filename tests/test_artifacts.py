"""invpt.artifacts: output checks, manifests that describe their artifact, locked publishing, stale staging cleanup.

Unit tests work on small files; a few CLI cases (invpt-quantize) use one tiny exported model.
"""
from __future__ import annotations

import fcntl
import hashlib
import re
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from invpt.artifacts import (
    UNLOCKED_STAGING_GRACE_S,
    artifact_lock,
    check_output,
    clean_stale_staging,
    lock_path_for,
    publish,
    staging_dir,
    verified_manifest,
)
from invpt.errors import InputError, ManifestError
from invpt.manifest import Manifest, Preprocessing, manifest_path_for, parent_record, sha256_file
from tests.helpers import copy_artifact

REPO = Path(__file__).resolve().parents[1]


def _manifest_for(path: Path, data_files: tuple[str, ...] = (), **kw) -> Manifest:
    size = path.stat().st_size + sum((path.parent / d).stat().st_size for d in data_files)
    return Manifest(artifact=path.name, kind="onnx", precision="fp32", config={}, inputs=(), outputs=(),
                    preprocessing=Preprocessing(size=(8, 8)), sha256=sha256_file(path), size_bytes=size,
                    external_data=data_files, **kw)


def _artifact(folder: Path, name: str = "m.onnx", content: bytes = b"weights", data: bytes | None = None) -> Path:
    """A small artifact with its manifest (and optionally an external-data file)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content)
    files: tuple[str, ...] = ()
    if data is not None:
        (folder / (name + ".data")).write_bytes(data)
        files = (name + ".data",)
    _manifest_for(path, files).save(manifest_path_for(path))
    return path


def _snapshot(folder: Path) -> dict[str, str]:
    """Content of every file in ``folder`` except publish lock files (hidden, empty, never removed by design)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".lock"))}


# ---- manifest names -------------------------------------------------------------------------------------------
def test_manifest_names_do_not_collide_across_kinds():
    assert manifest_path_for("d/model.onnx") == Path("d/model.json")
    assert manifest_path_for("d/model.fp16.onnx") == Path("d/model.fp16.json")
    assert manifest_path_for("d/model.fp16.plan") == Path("d/model.fp16.plan.json")
    assert manifest_path_for("ckpt.pth.tar") == Path("ckpt.pth.tar.json")
    assert manifest_path_for("d/model.fp16.plan") != manifest_path_for("d/model.fp16.onnx")


# ---- check_output ---------------------------------------------------------------------------------------------
def test_check_output_accepts_new_and_replaceable_paths(tmp_path):
    inp = _artifact(tmp_path, "m.onnx")
    assert check_output(tmp_path / "new" / "m.fp16.onnx", [inp]) == tmp_path / "new" / "m.fp16.onnx"
    old = _artifact(tmp_path, "old.onnx", b"previous output")  # invpt's earlier output there (not an input)
    assert check_output(old, [inp, None]) == old
    gone = _artifact(tmp_path, "gone.onnx")
    gone.unlink()  # its manifest stayed: the manifest of this very output, replaceable
    assert check_output(gone, [inp]) == gone
    made = _artifact(tmp_path / "made", "m.onnx", b"an artifact the user renamed")
    renamed = tmp_path / "renamed.onnx"
    os.rename(made, renamed)
    os.rename(manifest_path_for(made), manifest_path_for(renamed))  # the manifest still says m.onnx, same sha256
    assert check_output(renamed, [inp]) == renamed
    renamed.write_bytes(b"changed since")  # no longer the file the manifest describes: not invpt's to replace
    with pytest.raises(InputError, match="is the manifest of"):
        check_output(renamed, [inp])


@pytest.mark.parametrize("case", ["user_file", "checkpoint", "other_artifact_manifest", "user_json"])
def test_check_output_refuses_files_invpt_did_not_make_there(tmp_path, case):
    """A file at the output (or at its manifest path) is replaced only when an invpt manifest there names this very
    output: a plan written over a checkpoint or a user's file, or a manifest written over another artifact's manifest
    (m.fp16 -> m.fp16.json is m.fp16.onnx's manifest), lost the user's data."""
    inp = _artifact(tmp_path / "in", "m.onnx")
    folder = tmp_path / "out"
    folder.mkdir()
    if case == "user_file":
        out = folder / "mine.plan"
        out.write_bytes(b"the user's own engine")
        fragment = "is not an invpt artifact made at this path"
    elif case == "checkpoint":
        out = folder / "t.pth"
        out.write_bytes(b"weights")
        fragment = "is not an invpt artifact made at this path"
    elif case == "other_artifact_manifest":
        _artifact(folder, "m.fp16.onnx")
        out = folder / "m.fp16"  # its manifest path is m.fp16.json: the ONNX's manifest
        fragment = f"is the manifest of '{folder / 'm.fp16.onnx'}'"
    else:
        out = folder / "x.plan"
        (folder / "x.plan.json").write_text('{"my": "settings"}')
        fragment = "is not an invpt manifest"
    before = _snapshot(folder)
    with pytest.raises(InputError, match=re.escape(fragment)):
        check_output(out, [inp])
    assert _snapshot(folder) == before


@pytest.mark.parametrize("case", ["same", "relative", "hardlink", "symlink", "input_manifest_hardlink",
                                  "input_data", "own_manifest_is_input", "manifests_collide"])
def test_check_output_refuses_inputs(tmp_path, monkeypatch, case):
    inp = _artifact(tmp_path / "in", "m.onnx", data=b"ext")
    ckpt = tmp_path / "in" / "x.pth"
    ckpt.write_bytes(b"checkpoint")
    before = _snapshot(tmp_path / "in")
    if case == "same":
        out = inp
    elif case == "relative":
        monkeypatch.chdir(tmp_path / "in")
        out, inp = Path("../in/./m.onnx"), tmp_path / "in" / "m.onnx"
    elif case == "hardlink":
        out = tmp_path / "link.onnx"
        os.link(inp, out)
    elif case == "symlink":
        out = tmp_path / "sym.onnx"
        out.symlink_to(inp)
    elif case == "input_manifest_hardlink":
        out = tmp_path / "alias.onnx"
        os.link(manifest_path_for(inp), out)
    elif case == "input_data":
        out = tmp_path / "in" / "m.onnx.data"
    elif case == "own_manifest_is_input":  # out a.onnx would write a.json, which is an input here
        out = tmp_path / "in" / "x.onnx"
        (tmp_path / "in" / "x.json").write_text("{}")
        inp = tmp_path / "in" / "x.json"
        before = _snapshot(tmp_path / "in")
    else:  # x.pth.onnx's manifest is x.pth.json, the checkpoint's manifest name
        out, inp = tmp_path / "in" / "x.pth.onnx", ckpt
    with pytest.raises(InputError, match="never writes into its inputs") as err:
        check_output(out, [inp])
    assert str(out) in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(tmp_path / "in") == before


def test_check_output_refuses_bad_kinds_of_output(tmp_path):
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(InputError, match="is an existing directory"):
        check_output(tmp_path / "dir.onnx")
    with pytest.raises(InputError, match="ends in .json"):
        check_output(tmp_path / "x.json")
    with pytest.raises(InputError, match="ends in .json"):
        check_output(tmp_path / "X.JSON")
    os.mkfifo(tmp_path / "pipe.onnx")
    with pytest.raises(InputError, match="FIFO"):
        check_output(tmp_path / "pipe.onnx")
    (tmp_path / "busy.json").mkdir()  # the output's manifest path is taken by a folder
    with pytest.raises(InputError, match="manifest path .* is an existing directory"):
        check_output(tmp_path / "busy.onnx")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_output(tmp_path / "file" / "sub" / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy.json", "dir.onnx", "file", "pipe.onnx"]


# ---- verified_manifest ----------------------------------------------------------------------------------------
def test_verified_manifest_accepts_an_intact_pair(tmp_path):
    art = _artifact(tmp_path, data=b"external weights")
    man = verified_manifest(art)
    assert man.sha256 == sha256_file(art) and man.external_data == ("m.onnx.data",)
    assert not lock_path_for(art).exists()  # reading never adds files to an input's folder


def test_verified_manifest_waits_for_a_publish_in_progress(tmp_path):
    import threading

    art = _artifact(tmp_path)
    done = threading.Event()
    with artifact_lock(art):  # a publisher holds the exclusive lock
        reader = threading.Thread(target=lambda: (verified_manifest(art), done.set()))
        reader.start()
        assert not done.wait(0.3)  # the reader waits for the shared lock
    reader.join(5)
    assert done.is_set()


def test_verified_manifest_refuses_an_edited_artifact(tmp_path):
    art = _artifact(tmp_path)
    recorded = Manifest.load(manifest_path_for(art)).sha256
    art.write_bytes(b"edited after export")
    with pytest.raises(ManifestError) as err:
        verified_manifest(art)
    msg = str(err.value)
    assert recorded in msg and sha256_file(art) in msg and "invpt-export" in msg
    assert "high precision" not in msg


def test_verified_manifest_checks_external_data(tmp_path):
    art = _artifact(tmp_path, data=b"0123456789")
    (tmp_path / "m.onnx.data").write_bytes(b"012345")  # truncated
    with pytest.raises(ManifestError, match="total .* bytes"):
        verified_manifest(art)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ManifestError, match="does not exist"):
        verified_manifest(art)


def test_verified_manifest_path_problems(tmp_path):
    (tmp_path / "d.onnx").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        verified_manifest(tmp_path / "d.onnx", InputError)
    os.mkfifo(tmp_path / "p.onnx")
    with pytest.raises(ManifestError, match="FIFO"):
        verified_manifest(tmp_path / "p.onnx")
    (tmp_path / "bare.onnx").write_bytes(b"x")
    with pytest.raises(ManifestError, match="Manifest .* does not exist"):
        verified_manifest(tmp_path / "bare.onnx")


# ---- parent paths -------------------------------------------------------------------------------------------
def test_parent_path_is_relative_to_the_manifest_folder(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    ckpt = tmp_path / "a" / "c.pth"
    ckpt.write_bytes(b"ckpt")
    rec = parent_record("checkpoint", ckpt, tmp_path / "a", "sha")
    assert rec["path"] == "c.pth" and rec["sha256"] == "sha"
    man_file = tmp_path / "a" / "m.json"
    man = _manifest_for(ckpt).replace(parent=rec)
    monkeypatch.chdir(tmp_path)  # not the manifest's folder
    assert man.parent_path(man_file) == tmp_path / "a" / "c.pth"
    (tmp_path / "a").rename(tmp_path / "moved")  # the whole folder moves
    assert man.parent_path(tmp_path / "moved" / "m.json") == tmp_path / "moved" / "c.pth"
    # A parent outside the folder: relative first, the recorded absolute path when the folder moved without it.
    (tmp_path / "out").mkdir()
    rec = parent_record("checkpoint", tmp_path / "moved" / "c.pth", tmp_path / "out", "sha")
    assert rec["path"] == os.path.join("..", "moved", "c.pth")
    (tmp_path / "out").rename(tmp_path / "elsewhere")
    (tmp_path / "deeper").mkdir()
    (tmp_path / "elsewhere").rename(tmp_path / "deeper" / "out")
    assert man.replace(parent=rec).parent_path(tmp_path / "deeper" / "out" / "m.json") == tmp_path / "moved" / "c.pth"


# ---- publishing -----------------------------------------------------------------------------------------------
def _stage(staging: Path, out: Path, content: bytes, data: bytes | None = None) -> list[str]:
    art = staging / out.name
    art.write_bytes(content)
    side = []
    if data is not None:
        (staging / (out.name + ".data")).write_bytes(data)
        side = [out.name + ".data"]
    _manifest_for(art, tuple(side)).save(manifest_path_for(art))
    return side


def test_publish_writes_a_consistent_pair_and_cleans_up(tmp_path):
    out = tmp_path / "m.onnx"
    with staging_dir(out, InputError) as staging:
        publish(staging, out, _stage(staging, out, b"v1", b"data1"))
    assert verified_manifest(out).sha256 == sha256_file(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.onnx.lock", "m.json", "m.onnx", "m.onnx.data"]


@pytest.mark.parametrize("had_previous", [True, False])
def test_failed_artifact_rename_restores_the_previous_manifest(tmp_path, monkeypatch, had_previous):
    out = tmp_path / "m.onnx"
    if had_previous:
        with staging_dir(out, InputError) as staging:
            publish(staging, out, _stage(staging, out, b"old", b"old data"))
    before = _snapshot(tmp_path)
    real_replace = os.replace

    def failing_replace(src, dst, *a, **kw):
        if Path(dst) == out:
            raise OSError(28, "No space left on device (injected)")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        with staging_dir(out, InputError) as staging:
            publish(staging, out, _stage(staging, out, b"new content", b"new data"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert _snapshot(tmp_path) == before  # old manifest and data back (or nothing, as before)
    assert not [p for p in tmp_path.iterdir() if ".staging." in p.name]
    if had_previous:
        verified_manifest(out)
    else:
        assert not out.exists() and not (tmp_path / "m.json").exists() and not (tmp_path / "m.onnx.data").exists()


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from invpt.artifacts import publish, staging_dir
    from invpt.errors import InputError
    from invpt.manifest import Manifest, Preprocessing, manifest_path_for, sha256_file

    out, tag, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    for i in range(n):
        with staging_dir(out, InputError) as staging:
            art = staging / out.name
            art.write_bytes((f"{tag}-{i}-" * (1 + i % 50)).encode())
            Manifest(artifact=out.name, kind="onnx", precision="fp32", config={}, inputs=(), outputs=(),
                     preprocessing=Preprocessing(size=(8, 8)), sha256=sha256_file(art),
                     size_bytes=art.stat().st_size).save(manifest_path_for(art))
            publish(staging, out)
""")


def test_concurrent_publishers_never_leave_a_mismatched_pair(tmp_path):
    out = tmp_path / "race.onnx"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [subprocess.Popen([sys.executable, str(script), str(out), tag, "150"], env=env) for tag in ("A", "B")]
    checks = 0
    while any(w.poll() is None for w in writers):
        if out.exists():
            verified_manifest(out)  # raises on a manifest that does not describe the file
            checks += 1
    assert [w.wait() for w in writers] == [0, 0]
    man = verified_manifest(out)
    assert out.read_bytes().startswith((b"A-149-", b"B-149-")) and man.size_bytes == out.stat().st_size
    assert checks > 5
    assert not [p for p in tmp_path.iterdir() if ".staging." in p.name]


# ---- staging ---------------------------------------------------------------------------------------------------
def _fake_staging(folder: Path, out: Path, suffix: str, lock: bool = True) -> Path:
    d = folder / f".{out.name}.staging.{suffix}"
    (d / "tmp").mkdir(parents=True)
    (d / "big.onnx").write_bytes(b"x" * 1000)
    if lock:
        (d / ".lock").touch()
    return d


def test_stale_staging_is_removed_and_live_staging_is_kept(tmp_path):
    out = tmp_path / "m.onnx"
    stale = _fake_staging(tmp_path, out, "stale1")
    live = _fake_staging(tmp_path, out, "live1")
    other = _fake_staging(tmp_path, tmp_path / "other.onnx", "x")  # another output's staging: not ours to touch
    young = _fake_staging(tmp_path, out, "young", lock=False)
    old = _fake_staging(tmp_path, out, "old", lock=False)
    os.utime(old, (time.time() - UNLOCKED_STAGING_GRACE_S - 60,) * 2)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()", str(live / ".lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with staging_dir(out, InputError) as staging:
            assert staging.is_dir() and (staging / ".lock").is_file()
            assert not stale.exists() and not old.exists()
            assert live.exists() and young.exists() and other.exists()
            # Our own staging folder is locked too: a concurrent run's cleanup keeps it.
            assert clean_stale_staging(out) == [] and staging.exists()
        assert not staging.exists()
    finally:
        holder.stdin.close()
        holder.wait()
    assert clean_stale_staging(out) == [live]  # the holder exited: its folder is stale now


def test_staging_redirects_library_temp_files(tmp_path):
    out = tmp_path / "m.onnx"
    before_dir, before_env = tempfile.gettempdir(), os.environ.get("TMPDIR")
    with pytest.raises(RuntimeError):
        with staging_dir(out, InputError) as staging:
            assert Path(tempfile.gettempdir()) == staging / "tmp"
            assert os.environ["TMPDIR"] == str(staging / "tmp")
            child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.mkstemp()[1])"],
                                   capture_output=True, text=True, check=True)
            assert Path(child.stdout.strip()).parent == staging / "tmp"
            leftover = tempfile.NamedTemporaryFile(delete=False)  # a library forgets its temp file
            raise RuntimeError("stage failed")
    assert not Path(leftover.name).exists() and not staging.exists()
    assert tempfile.gettempdir() == before_dir and os.environ.get("TMPDIR") == before_env


def test_staging_dir_reports_unwritable_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="Cannot write"):
        with staging_dir(tmp_path / "file" / "m.onnx", InputError):
            pass


def test_artifact_lock_is_exclusive_against_shared(tmp_path):
    out = tmp_path / "m.onnx"
    with artifact_lock(out) as held:
        assert held
        fd = os.open(lock_path_for(out), os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    with artifact_lock(out, shared=True), artifact_lock(out, shared=True):
        pass  # readers share


# ---- invpt-quantize at the CLI (validation happens before any model work) ---------------------------------------
@pytest.fixture
def exported(pascal_onnx):
    """The session's tiny exported model (read-only: the tests below work on copies made by _copy_export)."""
    return pascal_onnx


def _copy_export(exported, folder: Path) -> Path:
    return copy_artifact(exported.onnx_path, folder)


def test_quantize_refuses_output_equal_to_input(exported, tmp_path):
    from invpt.calib.cli import main as quantize_main

    onnx = _copy_export(exported, tmp_path)
    before = _snapshot(tmp_path)
    assert quantize_main(["--onnx", str(onnx), "--precision", "fp16", "--out", str(onnx), "--no-verify"]) == 2
    assert quantize_main(["--onnx", str(onnx), "--precision", "fp16", "--out", str(tmp_path / "m.json")]) == 2
    assert quantize_main(["--onnx", str(onnx), "--precision", "fp16", "--out", str(tmp_path)]) == 2
    assert _snapshot(tmp_path) == before
    assert not [p for p in tmp_path.iterdir() if ".staging." in p.name]


def test_quantize_refuses_edited_onnx(exported, tmp_path, capsys):
    from invpt.calib.cli import main as quantize_main

    onnx = _copy_export(exported, tmp_path)
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    before = _snapshot(tmp_path)
    assert quantize_main(["--onnx", str(onnx), "--precision", "fp16", "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert sha256_file(onnx) in err and exported.manifest.sha256 in err and "high precision" not in err
    assert quantize_main(["--onnx", str(onnx), "--list-terms"]) == 2
    assert _snapshot(tmp_path) == before


def test_quantize_refuses_truncated_onnx_with_matching_manifest(exported, tmp_path, capsys):
    from invpt.calib.cli import main as quantize_main

    onnx = _copy_export(exported, tmp_path)
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    man = Manifest.load(manifest_path_for(onnx))
    man.replace(sha256=sha256_file(onnx), size_bytes=onnx.stat().st_size).save(manifest_path_for(onnx))
    before = _snapshot(tmp_path)
    assert quantize_main(["--onnx", str(onnx), "--precision", "fp16", "--no-verify"]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err
    assert quantize_main(["--onnx", str(onnx), "--list-terms"]) == 2
    assert _snapshot(tmp_path) == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".m.fp16")]


@pytest.mark.parametrize("args, needle", [
    (["--holdout-samples", "0"], "at least 1 held-out"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--calib-samples", "0"], "--calib-samples must be >= 1"),
    (["--out", "x.json"], "ends in .json"),
])
def test_quantize_bad_options(exported, tmp_path, capsys, args, needle):
    from invpt.calib.cli import main as quantize_main

    onnx = _copy_export(exported, tmp_path)
    before = _snapshot(tmp_path)
    args = [str(tmp_path / a) if a == "x.json" else a for a in args]
    assert quantize_main(["--onnx", str(onnx), "--precision", "fp16", *args]) == 2
    assert needle in capsys.readouterr().err
    assert _snapshot(tmp_path) == before and len(list(tmp_path.iterdir())) == 2


def test_quantize_onnx_that_is_a_directory_or_fifo(tmp_path, capsys):
    from invpt.calib.cli import main as quantize_main

    (tmp_path / "d.onnx").mkdir()
    os.mkfifo(tmp_path / "p.onnx")
    assert quantize_main(["--onnx", str(tmp_path / "d.onnx"), "--precision", "fp16"]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert quantize_main(["--onnx", str(tmp_path / "p.onnx"), "--list-terms"]) == 2
    assert "FIFO" in capsys.readouterr().err


def test_quantize_checks_the_given_checkpoint(exported, tmp_path, capsys):
    """--ckpt must be the checkpoint the ONNX came from (else parity would compare other weights)."""
    from invpt.calib.cli import main as quantize_main

    onnx = _copy_export(exported, tmp_path)
    other = tmp_path / "other.pth"
    other.write_bytes(b"not the parent")
    assert quantize_main(["--onnx", str(onnx), "--precision", "fp16", "--ckpt", str(other)]) == 2
    err = capsys.readouterr().err
    assert "is not the checkpoint" in err and "high precision" not in err
    assert not (tmp_path / "m.fp16.onnx").exists()


def test_reference_checkpoint_resolves_from_the_manifest_folder(exported, tiny_pascal_official_ckpt, tmp_path,
                                                                monkeypatch):
    from invpt.calib.pipeline import resolve_reference_checkpoint

    folder = tmp_path / "bundle"
    onnx = _copy_export(exported, folder)
    (folder / "c.pth").write_bytes(tiny_pascal_official_ckpt.read_bytes())
    man = Manifest.load(manifest_path_for(onnx))
    man = man.replace(parent=parent_record("checkpoint", folder / "c.pth", folder, man.parent["sha256"]))
    man.save(manifest_path_for(onnx))
    assert man.parent["path"] == "c.pth"
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    moved = tmp_path / "moved"
    folder.rename(moved)
    got = resolve_reference_checkpoint(man, manifest_path_for(moved / onnx.name), None)
    assert got == moved / "c.pth"
    (moved / "c.pth").write_bytes(b"changed")  # a changed parent is not used as the reference
    assert resolve_reference_checkpoint(man, manifest_path_for(moved / onnx.name), None) is None
