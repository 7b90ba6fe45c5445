"""Calibration data that cannot lie: validated cache entries, atomic cache writes, padding-dominated inputs.

Small synthetic images written with cv2 into tmp_path, preprocessed to 64x64 (a CLI test uses the tiny
model's 128x128).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from invpt.calib import data as data_mod
from invpt.calib.data import CONTENT_MIN, clean_stale_temps, load_calibration_data, stratified_sample
from invpt.data.datasets import open_source
from invpt.errors import InputError
from invpt.manifest import Preprocessing

PREP = Preprocessing(size=(64, 64), mode="pad")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _invpt_logs_reach_caplog(monkeypatch):
    """A CLI run earlier in the session sets propagate=False on the 'invpt' logger; caplog needs it on."""
    monkeypatch.setattr(logging.getLogger("invpt"), "propagate", True)


def _write(folder: Path, name: str, h: int, w: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    path = folder / name
    assert cv2.imwrite(str(path), img)
    return path


def _folder(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    """Images named by their id (``sub/name`` without extension) with the given (h, w)."""
    for k, (sid, (h, w)) in enumerate(sorted(sizes.items())):
        sub, name = sid.split("/")
        _write(root / sub, f"{name}.png", h, w, seed=k)
    return root


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture
def src(tmp_path) -> Path:
    """16 images of 40x48 in two strata: 47% of a 64x64 input is image content."""
    return _folder(tmp_path / "src", {f"{s}/img{i:02d}": (40, 48) for s in ("a", "b") for i in range(8)})


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("calib-*.npz"))


def _temps(cache: Path) -> list[Path]:
    return sorted(cache.glob(".calib-*.tmp.npz"))


def _load(src_dir: Path, cache: Path, n: int = 12, m: int = 4, prep: Preprocessing = PREP, seed: int = 0):
    return load_calibration_data(src_dir, prep, n, holdout=m, seed=seed, cache_dir=cache)


def _assert_same(a, b) -> None:
    np.testing.assert_array_equal(a.calib, b.calib)
    np.testing.assert_array_equal(a.holdout, b.holdout)
    assert a.calib.dtype == b.calib.dtype == np.float32
    assert a.calib_ids == b.calib_ids and a.holdout_ids == b.holdout_ids
    assert a.provenance == b.provenance


# ---------------------------------------------------------------------------------------------- cache hits


def test_cache_hit_after_first_run(src, tmp_path):
    first = _load(src, tmp_path / "c")
    assert not first.cache_hit and first.calib.shape == (12, 3, 64, 64) and first.holdout.shape == (4, 3, 64, 64)
    (entry,) = _entries(tmp_path / "c")
    assert _temps(tmp_path / "c") == []
    second = _load(src, tmp_path / "c")
    assert second.cache_hit
    _assert_same(first, second)
    # One NPZ holds the tensors and the record a hit is checked against.
    with np.load(entry, allow_pickle=False) as z:
        assert set(z.files) == {"calib", "holdout", "meta"}
        meta = json.loads(z["meta"].tobytes().decode())
    assert meta["key"] == first.provenance["cache_key"]
    assert meta["calib_ids"] == first.calib_ids and meta["holdout_ids"] == first.holdout_ids
    assert meta["shapes"] == {"calib": [12, 3, 64, 64], "holdout": [4, 3, 64, 64]} and meta["dtype"] == "float32"
    assert meta["sha256"]["calib"] == hashlib.sha256(first.calib.tobytes()).hexdigest()
    assert meta["sha256"]["holdout"] == hashlib.sha256(first.holdout.tobytes()).hexdigest()


def _meta(entry: Path) -> np.ndarray:
    with np.load(entry, allow_pickle=False) as z:
        return z["meta"]


def _consistent(entry: Path, calib: np.ndarray, hold: np.ndarray, **changes) -> None:
    """Rewrite the entry with other tensors and a metadata record that matches them (a forged entry)."""
    meta = json.loads(_meta(entry).tobytes().decode())
    meta.update(changes)
    meta["shapes"] = {"calib": list(calib.shape), "holdout": list(hold.shape)}
    meta["sha256"] = {"calib": hashlib.sha256(np.ascontiguousarray(calib).tobytes()).hexdigest(),
                      "holdout": hashlib.sha256(np.ascontiguousarray(hold).tobytes()).hexdigest()}
    raw = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with open(entry, "wb") as f:
        np.savez(f, calib=calib, holdout=hold, meta=raw)


def _zeros_without_record(entry, a):
    with open(entry, "wb") as f:
        np.savez(f, calib=np.zeros_like(a.calib), holdout=np.zeros_like(a.holdout))


def _zeros_with_record(entry, a):
    meta = _meta(entry)
    with open(entry, "wb") as f:
        np.savez(f, calib=np.zeros_like(a.calib), holdout=np.zeros_like(a.holdout), meta=meta)


def _fewer_samples_forged(entry, a):
    """3+1 samples with a self-consistent record (ids, shapes, checksums) instead of 12+4."""
    meta = json.loads(_meta(entry).tobytes().decode())
    _consistent(entry, a.calib[:3], a.holdout[:1], calib_ids=a.calib_ids[:3], holdout_ids=a.holdout_ids[:1],
                image_hw={k: v[: 3 if k == "calib" else 1] for k, v in meta["image_hw"].items()},
                content_fraction={k: v[: 3 if k == "calib" else 1] for k, v in meta["content_fraction"].items()})


def _fewer_samples_tensors(entry, a):
    meta = _meta(entry)
    with open(entry, "wb") as f:
        np.savez(f, calib=a.calib[:3], holdout=a.holdout[:1], meta=meta)


def _truncated(entry, a):
    blob = entry.read_bytes()
    entry.write_bytes(blob[: len(blob) // 2])


def _flipped_byte(entry, a):
    blob = bytearray(entry.read_bytes())
    blob[len(blob) // 3] ^= 0x01  # inside the calib tensor
    entry.write_bytes(bytes(blob))


def _not_npz(entry, a):
    entry.write_text("this is not an NPZ file\n")


def _empty(entry, a):
    entry.write_bytes(b"")


def _pickled(entry, a):
    meta = _meta(entry)
    with open(entry, "wb") as f:
        np.savez(f, calib=np.array([{"x": 1}], dtype=object), holdout=a.holdout, meta=meta)


def _nan_forged(entry, a):
    calib = a.calib.copy()
    calib[0, 0, 0, 0] = np.nan
    _consistent(entry, calib, a.holdout)


def _float64_forged(entry, a):
    _consistent(entry, a.calib.astype(np.float64), a.holdout.astype(np.float64))


def _ids_swapped_forged(entry, a):
    """The right tensors under the ids of other samples (e.g. another seed's list)."""
    _consistent(entry, a.calib, a.holdout, calib_ids=list(reversed(a.calib_ids)))


TAMPERED = {
    "zeros_without_record": (_zeros_without_record, "missing array"),
    "zeros_with_record": (_zeros_with_record, "sha256"),
    "fewer_samples_forged": (_fewer_samples_forged, "sample ids"),
    "fewer_samples_tensors": (_fewer_samples_tensors, "shape"),
    "truncated": (_truncated, "unreadable"),
    "flipped_byte": (_flipped_byte, "unreadable"),
    "not_npz": (_not_npz, "unreadable"),
    "empty": (_empty, "unreadable"),
    "pickled_object_array": (_pickled, "unreadable"),
    "nan_forged": (_nan_forged, "NaN"),
    "float64_forged": (_float64_forged, "float32"),
    "ids_swapped_forged": (_ids_swapped_forged, "sample ids"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_cache_is_reported_removed_and_rebuilt(case, src, tmp_path, caplog):
    tamper, reason = TAMPERED[case]
    cache = tmp_path / "c"
    first = _load(src, cache)
    (entry,) = _entries(cache)
    tamper(entry, first)
    before = _tree_digest(src)
    with caplog.at_level(logging.WARNING, logger="invpt.calib.data"):
        again = _load(src, cache)  # no exception
    assert not again.cache_hit
    fresh = _load(src, tmp_path / "fresh")
    assert not fresh.cache_hit
    _assert_same(again, fresh)
    _assert_same(again, first)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(entry) in warnings[0] and "invalid" in warnings[0] and reason in warnings[0], warnings[0]
    # The rebuilt entry replaced the bad one, and the next run trusts it.
    assert _entries(cache) == [entry] and _temps(cache) == []
    assert _load(src, cache).cache_hit
    assert _tree_digest(src) == before  # the source is never written


def test_entry_of_other_inputs_under_this_name_is_refused(src, tmp_path, caplog):
    """An entry whose recorded key is another's (e.g. copied over) is not used."""
    cache = tmp_path / "c"
    other = _load(src, cache, seed=1)
    (other_entry,) = _entries(cache)
    mine = _load(src, cache, seed=0)
    mine_entry = next(p for p in _entries(cache) if p != other_entry)
    os.replace(other_entry, mine_entry)
    with caplog.at_level(logging.WARNING, logger="invpt.calib.data"):
        again = _load(src, cache, seed=0)
    assert not again.cache_hit and other.calib_ids != mine.calib_ids
    _assert_same(again, mine)
    assert any("cache key" in r.getMessage() and str(mine_entry) in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------- atomic writes


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftover_temp_files_of_dead_runs_are_cleaned(src, tmp_path):
    cache = tmp_path / "c"
    cache.mkdir()
    dead = cache / f".calib-0123456789abcdef01234567.{_dead_pid()}.k3j_x9q.tmp.npz"
    dead.write_bytes(b"PK\x03\x04 half an entry")
    old_format = cache / f".calib-0123456789abcdef01234567.npz.{_dead_pid()}.tmp.npz"
    old_format.write_bytes(b"PK")
    live = cache / f".calib-0123456789abcdef01234567.{os.getpid()}.abcdefgh.tmp.npz"  # a writer still running
    live.write_bytes(b"PK")
    stale_live = cache / f".calib-fedcba9876543210fedcba98.{os.getpid()}.zzzzzzzz.tmp.npz"
    stale_live.write_bytes(b"PK")
    hour_ago = time.time() - 2 * 3600
    os.utime(stale_live, (hour_ago, hour_ago))
    unrelated = cache / "notes.txt"
    unrelated.write_text("keep me")
    data = _load(src, cache)
    assert not data.cache_hit and len(_entries(cache)) == 1
    assert not dead.exists() and not old_format.exists() and not stale_live.exists()
    assert live.exists() and unrelated.read_text() == "keep me"
    assert clean_stale_temps(cache) == []  # idempotent: the live one stays


def _disk_full_savez(file, **arrays):
    file.write(b"PK\x03\x04" + b"\0" * 1000)  # part of the entry, then the disk is full
    raise OSError(28, "No space left on device")


def test_interrupted_savez_leaves_no_entry_and_next_run_rebuilds(src, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "c"
    fresh = _load(src, tmp_path / "fresh")
    monkeypatch.setattr(data_mod.np, "savez", _disk_full_savez)
    with caplog.at_level(logging.WARNING, logger="invpt.calib.data"):
        data = _load(src, cache)
    _assert_same(data, fresh)  # the run itself goes on without the cache
    assert any("could not write calibration cache" in r.getMessage() for r in caplog.records)
    assert _entries(cache) == [] and _temps(cache) == []
    monkeypatch.undo()
    again = _load(src, cache)
    assert not again.cache_hit and len(_entries(cache)) == 1
    _assert_same(again, fresh)
    assert _load(src, cache).cache_hit


def test_failed_rename_leaves_no_entry_and_next_run_rebuilds(src, tmp_path, monkeypatch):
    cache = tmp_path / "c"

    def replace(a, b):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(data_mod.os, "replace", replace)
    data = _load(src, cache)
    assert _entries(cache) == [] and _temps(cache) == []
    monkeypatch.undo()
    again = _load(src, cache)
    assert not again.cache_hit and len(_entries(cache)) == 1
    _assert_same(again, data)


def test_keyboard_interrupt_during_write_leaves_nothing(src, tmp_path, monkeypatch):
    cache = tmp_path / "c"

    def savez(file, **arrays):
        file.write(b"PK\x03\x04")
        raise KeyboardInterrupt

    monkeypatch.setattr(data_mod.np, "savez", savez)
    with pytest.raises(KeyboardInterrupt):
        _load(src, cache)
    assert _entries(cache) == [] and _temps(cache) == []


CHILD = r"""
import io, sys, time
import numpy as np
from invpt.calib.data import load_calibration_data
from invpt.manifest import Preprocessing

real = np.savez

def savez(file, **arrays):  # write half of the entry, then hang until killed
    buf = io.BytesIO()
    real(buf, **arrays)
    blob = buf.getvalue()
    file.write(blob[: len(blob) // 2])
    file.flush()
    print("half-written", flush=True)
    time.sleep(120)

np.savez = savez
load_calibration_data(sys.argv[1], Preprocessing(size=(64, 64), mode="pad"), 12, holdout=4, cache_dir=sys.argv[2])
"""


def test_run_killed_while_writing_leaves_no_entry_and_next_run_cleans_up(src, tmp_path):
    """A real SIGKILL mid-write: no entry appears, and the next run removes the temp file and rebuilds."""
    cache = tmp_path / "c"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(src), str(cache)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "half-written", proc.stderr.read() if proc.poll() is not None else line
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert _entries(cache) == []
    (temp,) = _temps(cache)
    assert f".{proc.pid}." in temp.name and temp.stat().st_size > 0
    data = _load(src, cache)
    assert not data.cache_hit and not temp.exists() and len(_entries(cache)) == 1
    _assert_same(data, _load(src, tmp_path / "fresh"))


# ---------------------------------------------------------------------------------------------- padding


def test_mostly_padding_calibration_is_refused(tmp_path):
    """1x1 images in a 64x64 'pad' input: the data is refused before anything is written."""
    src = _folder(tmp_path / "src", {f"a/dot{i:02d}": (1, 1) for i in range(16)})
    before = _tree_digest(src)
    with pytest.raises(InputError) as exc:
        _load(src, tmp_path / "c")
    msg = str(exc.value)
    assert exc.value.exit_code == 2 and "\n" not in msg
    assert "12 of 12 calibration samples" in msg and "1x1" in msg and "64x64" in msg and "dot" in msg
    assert "--calib-data" in msg and "invpt-export --preprocess resize" in msg and "invpt-quantize" in msg
    assert "32x32" in msg  # the smallest image with 25% content
    assert _tree_digest(src) == before
    assert not (tmp_path / "c").exists() or list((tmp_path / "c").iterdir()) == []


def test_not_calibrating_only_warns_about_calibration_padding(tmp_path, caplog):
    """FP16 uses only the held-out samples: mostly-padding 'calibration' samples warn, real held-out ones pass."""
    sizes = {f"a/dot{i:02d}": (2, 2) for i in range(4)}
    sizes.update({f"a/real{i:02d}": (48, 48) for i in range(4)})
    src = _folder(tmp_path / "src", sizes)
    n, m = 4, 2
    seed = _seed_where(src, n, m, lambda calib, hold: sum("dot" in i for i in calib) > n // 2)
    with pytest.raises(InputError, match="mostly padding"):
        load_calibration_data(src, PREP, n, holdout=m, seed=seed, cache_dir=tmp_path / "c")
    with caplog.at_level(logging.WARNING, logger="invpt.calib.data"):
        data = load_calibration_data(src, PREP, n, holdout=m, seed=seed, cache_dir=tmp_path / "c", calibrating=False)
    assert all("real" in i for i in data.holdout_ids)
    assert any("calibration samples" in r.getMessage() and "dot" in r.getMessage() for r in caplog.records)


def test_resize_mode_has_no_padding(tmp_path):
    """The same tiny images stretched to the input ('resize') are all content: accepted."""
    src = _folder(tmp_path / "src", {f"a/dot{i:02d}": (2, 2) for i in range(6)})
    data = _load(src, tmp_path / "c", n=4, m=2, prep=Preprocessing(size=(64, 64), mode="resize"))
    assert data.provenance["content_fraction"]["calib"] == {"min": 1.0, "mean": 1.0}
    assert data.provenance["holdout_redrawn"] == 0


def test_some_padding_warns_and_is_recorded(tmp_path, caplog):
    """A minority of mostly-padding calibration samples is accepted with a warning naming them."""
    sizes = {f"a/big{i:02d}": (48, 48) for i in range(14)}
    sizes.update({f"b/small{i}": (8, 8) for i in range(2)})
    src = _folder(tmp_path / "src", sizes)
    n, m = 12, 4
    seed = _seed_where(src, n, m, lambda calib, hold: 1 <= sum(i.startswith("b/") for i in calib) <= n // 2)
    with caplog.at_level(logging.WARNING, logger="invpt.calib.data"):
        data = _load(src, tmp_path / "c", n=n, m=m, seed=seed)
    low = [i for i in data.calib_ids if i.startswith("b/")]
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{len(low)} of {n} calibration samples" in w and "small" in w and "8x8" in w for w in warns), warns
    frac = data.provenance["content_fraction"]["calib"]
    expected = [(8 * 8 if i.startswith("b/") else 48 * 48) / 64 ** 2 for i in data.calib_ids]
    assert frac["min"] == pytest.approx(min(expected)) and frac["mean"] == pytest.approx(np.mean(expected))


def _ids_of(src: Path, n: int, m: int, seed: int) -> tuple[list[str], list[str]]:
    source = open_source(src)
    ids = source.ids()
    order = stratified_sample(source, n + m, seed)
    return [ids[i] for i in order[:n]], [ids[i] for i in order[n:]]


class _Strata:
    """An in-memory image source whose only real property is its strata (no files): for stratified_sample."""

    def __init__(self, sizes: dict[str, int]):
        self.groups = [g for g, k in sizes.items() for _ in range(k)]

    def __len__(self) -> int:
        return len(self.groups)

    def strata(self, i: int) -> str:
        return self.groups[i]


def test_stratified_sample_is_proportional_distinct_and_seeded():
    from collections import Counter

    src = _Strata({"2008": 50, "2009": 30, "2010": 20})
    for n in (10, 7, 1, 100):
        picked = stratified_sample(src, n, seed=3)
        assert len(picked) == n and len(set(picked)) == n and all(0 <= i < len(src) for i in picked)
        got = Counter(src.strata(i) for i in picked)
        for g, size in (("2008", 50), ("2009", 30), ("2010", 20)):  # each stratum gets its share, rounded
            assert abs(got[g] - n * size / 100) < 1, (n, got)
    assert stratified_sample(src, 10, seed=3) == stratified_sample(src, 10, seed=3)  # seeded
    assert stratified_sample(src, 10, seed=3) != stratified_sample(src, 10, seed=4)
    assert sorted(stratified_sample(src, 100, seed=0)) == list(range(100))  # n == size: every image once
    # 3 strata of 1, 1 and 2 images, 3 samples: quotas 0.75/0.75/1.5 -> the largest remainders (0.75, 0.75) win
    small = _Strata({"a": 1, "b": 1, "c": 2})
    assert Counter(small.strata(i) for i in stratified_sample(small, 3, seed=0)) == {"a": 1, "b": 1, "c": 1}


def _seed_where(src: Path, n: int, m: int, cond) -> int:
    """First seed whose plain stratified draw satisfies ``cond(calib_ids, holdout_ids)`` (a test precondition)."""
    for seed in range(200):
        if cond(*_ids_of(src, n, m, seed)):
            return seed
    raise AssertionError("no seed in 0..199 gives the draw this test needs")


def test_holdout_is_drawn_from_real_content(tmp_path):
    """Held-out candidates that are mostly padding are replaced, seeded, by real-content images outside calib."""
    sizes = {f"{s}/real{i:02d}": (48, 40) for s in ("a", "b") for i in range(6)}
    sizes.update({f"{s}/tiny{i:02d}": (6, 6) for s in ("a", "b") for i in range(6)})
    src = _folder(tmp_path / "src", sizes)
    n, m = 6, 4
    def wanted(calib, hold):
        # two or more tiny held-out candidates, and each stratum has real images left to replace them
        fits = all(sum("real" in i and i.startswith(s) for i in calib) + sum(i.startswith(s) for i in hold) <= 6
                   for s in ("a/", "b/"))
        return sum("tiny" in i for i in hold) >= 2 and sum("tiny" in i for i in calib) <= n // 2 and fits

    seed = _seed_where(src, n, m, wanted)
    plain_calib, plain_hold = _ids_of(src, n, m, seed)
    data = _load(src, tmp_path / "c", n=n, m=m, seed=seed)
    assert data.calib_ids == plain_calib  # the stratified calibration draw is untouched
    assert all("real" in i for i in data.holdout_ids), data.holdout_ids
    assert set(data.holdout_ids).isdisjoint(data.calib_ids) and len(set(data.holdout_ids)) == m
    kept = [i for i in plain_hold if "real" in i]
    assert [i for i in data.holdout_ids if i in kept] == kept  # real-content picks stay where they were
    replaced = sum("tiny" in i for i in plain_hold)
    assert data.provenance["holdout_redrawn"] == replaced
    assert data.provenance["content_fraction"]["holdout"]["min"] >= CONTENT_MIN
    # Replacements keep the stratum of the sample they replace where it has real images left.
    for old, new in zip(plain_hold, data.holdout_ids):
        assert old.split("/")[0] == new.split("/")[0]
    # Deterministic: a fresh build (new cache) draws the same; the cache hit returns the same.
    again = _load(src, tmp_path / "c2", n=n, m=m, seed=seed)
    assert again.holdout_ids == data.holdout_ids and not again.cache_hit
    hit = _load(src, tmp_path / "c", n=n, m=m, seed=seed)
    assert hit.cache_hit and hit.holdout_ids == data.holdout_ids
    np.testing.assert_array_equal(hit.holdout, data.holdout)


def test_no_real_content_holdout_is_refused(tmp_path):
    """Calibration images are fine but every held-out candidate (and none else) is mostly padding: refused."""
    sizes = {f"a/real{i:02d}": (48, 48) for i in range(6)}
    sizes.update({f"a/tiny{i:02d}": (4, 4) for i in range(2)})
    src = _folder(tmp_path / "src", sizes)
    n, m = 6, 2
    seed = _seed_where(src, n, m, lambda calib, hold: all("tiny" in i for i in hold))
    before = _tree_digest(src)
    with pytest.raises(InputError) as exc:
        _load(src, tmp_path / "c", n=n, m=m, seed=seed)
    msg = str(exc.value)
    assert exc.value.exit_code == 2 and "no held-out image with real content" in msg
    assert "tiny" in msg and "4x4" in msg and "64x64" in msg and "invpt-export --preprocess resize" in msg
    assert _tree_digest(src) == before
    assert not (tmp_path / "c").exists() or _entries(tmp_path / "c") == []


def test_too_few_real_images_for_holdout_warns(tmp_path, caplog):
    """Only one real-content image is left for two held-out slots: one low sample stays, with a warning."""
    sizes = {f"a/real{i:02d}": (48, 48) for i in range(7)}
    sizes.update({f"a/tiny{i:02d}": (4, 4) for i in range(2)})
    src = _folder(tmp_path / "src", sizes)
    n, m = 6, 2
    # both held-out candidates tiny, calibration all real: exactly one real image is left for the hold-out
    seed = _seed_where(src, n, m, lambda calib, hold: all("tiny" in i for i in hold))
    with caplog.at_level(logging.WARNING, logger="invpt.calib.data"):
        data = _load(src, tmp_path / "c", n=n, m=m, seed=seed)
    assert sum("real" in i for i in data.holdout_ids) == 1 and data.provenance["holdout_redrawn"] == 1
    assert any("1 of 2 held-out samples" in r.getMessage() for r in caplog.records)
    assert data.provenance["content_fraction"]["holdout"]["min"] == pytest.approx(16 / 64 ** 2)


def test_provenance_records_content_of_both_sets(tmp_path):
    sizes = {f"a/s{i:02d}": (32 + 2 * i, 48) for i in range(10)}
    src = _folder(tmp_path / "src", sizes)
    data = _load(src, tmp_path / "c", n=6, m=3)
    hw = {sid: sizes[sid] for sid in sizes}
    for name, ids in (("calib", data.calib_ids), ("holdout", data.holdout_ids)):
        fr = [hw[i][0] * hw[i][1] / 64 ** 2 for i in ids]
        got = data.provenance["content_fraction"][name]
        assert got["min"] == pytest.approx(min(fr), abs=1e-6) and got["mean"] == pytest.approx(np.mean(fr), abs=1e-6)
    assert data.provenance["content_fraction"]["threshold"] == CONTENT_MIN
    hit = _load(src, tmp_path / "c", n=6, m=3)
    assert hit.cache_hit and hit.provenance == data.provenance
    json.dumps(data.provenance)  # goes into the manifest as is


def _pascal_root(db: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    """A PASCAL-Context root (official layout) with images of the given (h, w), split 'val'."""
    root = db / "PASCALContext"
    for k, (sid, (h, w)) in enumerate(sorted(sizes.items())):
        _write(root / "JPEGImages", f"{sid}.jpg", h, w, seed=k)
    (root / "ImageSets" / "Context").mkdir(parents=True)
    (root / "ImageSets" / "Context" / "val.txt").write_text("\n".join(sorted(sizes)) + "\n")
    return root


def test_dataset_root_image_larger_than_input_is_still_refused(tmp_path):
    """A PASCAL-Context root keeps strict 'pad' (its official images fit): a too-large image is refused, naming
    the fixes an invpt-quantize user has, and nothing is cached."""
    sizes = {f"2008_{i:06d}": (40, 40) for i in range(5)}
    sizes["2009_000099"] = (80, 70)
    root = _pascal_root(tmp_path / "db", sizes)
    before = _tree_digest(root)
    with pytest.raises(InputError) as exc:
        _load(root, tmp_path / "c", n=5, m=1)
    msg = str(exc.value)
    assert exc.value.exit_code == 2 and "2009_000099.jpg" in msg and "80x70" in msg and "never crops" in msg
    assert "('pad' at 64x64)" in msg and "--calib-data" in msg and "invpt-export --preprocess letterbox" in msg
    assert "invpt-export --preprocess resize" in msg
    assert "invpt-infer" not in msg and "\n" not in msg
    assert _tree_digest(root) == before
    assert not (tmp_path / "c").exists() or _entries(tmp_path / "c") == []


def test_dataset_root_that_fits_behaves_as_pad(tmp_path):
    root = _pascal_root(tmp_path / "db", {f"2008_{i:06d}": (40, 48) for i in range(6)})
    data = _load(root, tmp_path / "c", n=4, m=2)
    assert data.provenance["preprocessing_mode"] == "pad"
    assert data.provenance["scaled_images"] == {"calib": 0, "holdout": 0}
    assert data.provenance["source_kind"] == "PascalContextReader"


def _photos(folder: Path, count: int, min_side: int = 80) -> dict[str, tuple[int, int]]:
    """Crops of the repository's photos (assets/*.jpg), upscaled so every one is larger than the 64x64 input.

    Returns id -> (h, w) of the written image."""
    photos = sorted((REPO / "assets").glob("*.jpg"))
    assert photos, "assets/*.jpg are part of the repository"
    rng = np.random.default_rng(11)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for k in range(count):
        img = cv2.imread(str(photos[k % len(photos)]), cv2.IMREAD_COLOR)
        ch, cw = int(rng.integers(60, 140)), int(rng.integers(60, 140))
        y, x = int(rng.integers(0, img.shape[0] - ch)), int(rng.integers(0, img.shape[1] - cw))
        crop = img[y : y + ch, x : x + cw]
        f = max(min_side / min(ch, cw), 1.0) * float(rng.uniform(1.1, 2.0))
        big = cv2.resize(crop, (round(cw * f), round(ch * f)), interpolation=cv2.INTER_CUBIC)
        assert big.shape[0] > 64 and big.shape[1] > 64
        assert cv2.imwrite(str(folder / f"photo{k:02d}.jpg"), big)
        sizes[f"photo{k:02d}"] = big.shape[:2]
    return sizes


def test_folder_of_large_photos_is_letterboxed_in_pad_mode(tmp_path):
    """The issue: --calib-data pointed at ordinary photos larger than the model input, with a 'pad' manifest.
    Every image is letterboxed (scaled down to fit, aspect kept, centred), not refused; provenance says so."""
    from invpt.data.transforms import preprocess, read_image

    src = tmp_path / "photos"
    sizes = _photos(src, 9)
    before = _tree_digest(src)
    data = _load(src, tmp_path / "c", n=6, m=3)
    assert data.calib.shape == (6, 3, 64, 64) and data.holdout.shape == (3, 3, 64, 64)
    prov = data.provenance
    assert prov["preprocessing_mode"] == "letterbox" and prov["scaled_images"] == {"calib": 6, "holdout": 3}
    # each tensor is exactly the letterboxed image (the manifest's normalisation, then scale down and pad)
    for ids, arr in ((data.calib_ids, data.calib), (data.holdout_ids, data.holdout)):
        for sid, x in zip(ids, arr):
            ref, info = preprocess(read_image(src / f"{sid}.jpg"), (64, 64), "letterbox")
            assert info.scaled and info.original_hw == tuple(sizes[sid])
            np.testing.assert_array_equal(x, ref)
    # content fractions are those of the scaled images (the letterbox geometry), not 'pad''s capped 1.0
    expected = []
    for sid in data.calib_ids:
        h, w = sizes[sid]
        s = min(64 / h, 64 / w)
        expected.append(min(64, round(h * s)) * min(64, round(w * s)) / 64 ** 2)
    got = prov["content_fraction"]["calib"]
    assert got["min"] == pytest.approx(min(expected), abs=0.02) and got["mean"] == pytest.approx(np.mean(expected), abs=0.02)
    assert got["min"] < 1.0  # the crops are not all square
    assert _tree_digest(src) == before  # inputs untouched
    # a second run is a validated cache hit with the same provenance
    again = _load(src, tmp_path / "c", n=6, m=3)
    assert again.cache_hit
    _assert_same(data, again)


def test_mixed_folder_pads_images_that_fit_and_counts_the_scaled_ones(tmp_path):
    from invpt.data.transforms import preprocess, read_image

    sizes = {f"a/fit{i:02d}": (48, 40) for i in range(5)}
    sizes.update({f"b/big{i:02d}": (90, 130) for i in range(5)})
    src = _folder(tmp_path / "src", sizes)
    data = _load(src, tmp_path / "c", n=6, m=2)
    ids = data.calib_ids + data.holdout_ids
    assert data.provenance["preprocessing_mode"] == "letterbox"
    assert data.provenance["scaled_images"] == {
        "calib": sum(i.startswith("b/") for i in data.calib_ids),
        "holdout": sum(i.startswith("b/") for i in data.holdout_ids)}
    assert any(i.startswith("a/") for i in ids) and any(i.startswith("b/") for i in ids)
    for sid, x in zip(ids, np.concatenate([data.calib, data.holdout])):
        img = read_image(src / f"{sid}.png")
        if sid.startswith("a/"):  # fits: exactly what 'pad' gives
            np.testing.assert_array_equal(x, preprocess(img, (64, 64), "pad")[0])
        else:
            np.testing.assert_array_equal(x, preprocess(img, (64, 64), "letterbox")[0])


def test_folder_that_fits_records_pad(src, tmp_path):
    data = _load(src, tmp_path / "c")
    assert data.provenance["preprocessing_mode"] == "pad"
    assert data.provenance["scaled_images"] == {"calib": 0, "holdout": 0}


def test_letterbox_manifest_records_letterbox(src, tmp_path):
    prep = Preprocessing(size=(64, 64), mode="letterbox")
    data = _load(src, tmp_path / "c", prep=prep)
    assert data.provenance["preprocessing_mode"] == "letterbox"
    # the same images fit, so the tensors equal the 'pad' manifest's; the cache entries stay separate
    padded = _load(src, tmp_path / "c")
    np.testing.assert_array_equal(data.calib, padded.calib)
    assert not padded.cache_hit and padded.provenance["cache_key"] != data.provenance["cache_key"]
    assert len(_entries(tmp_path / "c")) == 2


def test_cache_key_includes_the_mode_used(tmp_path):
    from invpt.calib.data import cache_key

    args = (tmp_path, [["x", "x.png", 1, 2]], PREP, 4, 2, 0, "val")
    keys = {m: cache_key(*args, mode=m) for m in ("pad", "letterbox", "resize")}
    assert len(set(keys.values())) == 3
    assert cache_key(*args) == keys["pad"]  # default: the manifest's mode


def test_letterboxed_and_padded_entries_never_mix(tmp_path, caplog):
    """The same ids under the same names, first all fitting (pad), then replaced by large images (letterbox): two
    entries under two keys; an entry whose record claims the other mode is refused and rebuilt."""
    src = _folder(tmp_path / "src", {f"a/img{i:02d}": (40, 48) for i in range(6)})
    first = _load(src, tmp_path / "c", n=4, m=2)
    assert first.provenance["preprocessing_mode"] == "pad"
    for i in range(6):  # same names, now larger than the input (new size and mtime)
        _write(src / "a", f"img{i:02d}.png", 100, 80, seed=50 + i)
    os.utime(src / "a" / "img00.png", ns=(time.time_ns() + 10**9,) * 2)
    second = _load(src, tmp_path / "c", n=4, m=2)
    assert not second.cache_hit and second.provenance["preprocessing_mode"] == "letterbox"
    assert second.provenance["cache_key"] != first.provenance["cache_key"]
    assert len(_entries(tmp_path / "c")) == 2
    # forge the letterbox entry's record to claim 'pad': refused (reported, removed) and rebuilt
    entry = tmp_path / "c" / f"calib-{second.provenance['cache_key'][:24]}.npz"
    _consistent(entry, second.calib, second.holdout, mode="pad")
    with caplog.at_level(logging.WARNING, logger="invpt.calib.data"):
        third = _load(src, tmp_path / "c", n=4, m=2)
    assert not third.cache_hit and any("recorded preprocessing mode 'pad'" in r.getMessage() for r in caplog.records)
    _assert_same(second, third)
    assert _load(src, tmp_path / "c", n=4, m=2).cache_hit


def test_video_with_large_frames_is_letterboxed(tmp_path):
    big = _video(tmp_path / "big.avi", 96, 128)
    data = _load(big, tmp_path / "c", n=6, m=2)
    assert data.provenance["preprocessing_mode"] == "letterbox"
    assert data.provenance["scaled_images"] == {"calib": 6, "holdout": 2}
    assert data.provenance["content_fraction"]["calib"]["min"] == pytest.approx(48 * 64 / 64 ** 2)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
def test_non_finite_sample_names_the_file(tmp_path):
    src = _folder(tmp_path / "src", {f"a/img{i}": (40, 40) for i in range(4)})
    prep = Preprocessing(size=(64, 64), mode="pad", std=(0.0, 0.0, 0.0))  # x / 0 -> inf
    with pytest.raises(InputError, match=r"NaN or Inf") as exc:
        _load(src, tmp_path / "c", n=3, m=1, prep=prep)
    assert "img" in str(exc.value) and str(src) in str(exc.value)
    assert not (tmp_path / "c").exists() or _entries(tmp_path / "c") == []


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.fixture
def tiny_onnx(pascal_onnx):
    """The session's exported tiny model (read-only; outputs go to tmp_path)."""
    return pascal_onnx


def test_quantize_cli_refuses_padding_calibration(tiny_onnx, tmp_path, capsys):
    """invpt-quantize on 1x1 images exits 2 with the right command and flag, and writes nothing."""
    from invpt.calib.cli import main

    src = _folder(tmp_path / "src", {f"a/dot{i:02d}": (1, 1) for i in range(8)})
    before = _tree_digest(src)
    model_dir = tiny_onnx.onnx_path.parent
    model_before = _tree_digest(model_dir)
    out = tmp_path / "out" / "m.int8.onnx"
    code = main(["--onnx", str(tiny_onnx.onnx_path), "--precision", "int8", "--calib-data", str(src),
                 "--calib-samples", "4", "--holdout-samples", "2", "--cache-dir", str(tmp_path / "c"),
                 "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert "mostly padding" in err and "1x1" in err and "128x128" in err
    assert "--calib-data" in err and "invpt-export --preprocess resize" in err and "Use 'resize' mode" not in err
    assert "Traceback" not in err
    assert _tree_digest(src) == before and _tree_digest(model_dir) == model_before
    assert not out.exists() and not out.parent.exists()
    assert not (tmp_path / "c").exists() or _entries(tmp_path / "c") == []


def test_quantize_cli_calibrates_on_large_photos_of_a_pad_model(tiny_onnx, tmp_path, capsys):
    """The issue end to end: invpt-quantize --calib-data on a folder of photos larger than the 128x128 'pad' model
    succeeds, and the INT8 manifest records that the images were letterboxed and how many."""
    from invpt.calib.cli import main
    from invpt.manifest import load_manifest_for

    src = tmp_path / "photos"
    _photos(src, 6, min_side=140)
    before = _tree_digest(src)
    out = tmp_path / "out" / "m.int8.onnx"
    code = main(["--onnx", str(tiny_onnx.onnx_path), "--precision", "int8", "--calib-data", str(src),
                 "--calib-samples", "4", "--holdout-samples", "2", "--calib-method", "max", "--cache-dir",
                 str(tmp_path / "c"), "--out", str(out), "--no-verify", "-q"])
    assert code == 0, capsys.readouterr().err
    man = load_manifest_for(out)
    assert man.preprocessing.mode == "pad"  # the model's preprocessing is unchanged
    assert man.calibration["preprocessing_mode"] == "letterbox"
    assert man.calibration["scaled_images"] == {"calib": 4, "holdout": 2}
    assert _tree_digest(src) == before


def _video(path: Path, h: int, w: int, frames: int = 20) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG .avi")
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
    writer.release()
    return path


def test_video_of_small_frames_is_refused_and_normal_frames_cache(tmp_path):
    ok = _video(tmp_path / "ok.avi", 40, 48)
    data = _load(ok, tmp_path / "c", n=6, m=2)
    assert data.provenance["content_fraction"]["calib"]["min"] == pytest.approx(40 * 48 / 64 ** 2)
    assert _load(ok, tmp_path / "c", n=6, m=2).cache_hit
    tiny = _video(tmp_path / "tiny.avi", 8, 8)
    with pytest.raises(InputError) as exc:
        _load(tiny, tmp_path / "c2", n=6, m=2)
    msg = str(exc.value)
    assert "tiny.avi" in msg and "frame_" in msg and "8x8" in msg and "mostly padding" in msg
