"""Tests of invpt.data.datasets on tiny fake layouts, folders and videos built in tmp_path."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from invpt.data.datasets import (
    ImageFolderReader,
    ImageListReader,
    NYUDReader,
    PascalContextReader,
    VideoReader,
    collect_images,
    open_source,
    unique_ids,
)
from invpt.errors import ConfigError, InputError


def _write(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _img(value: int, h: int = 6, w: int = 8) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def _write_ret(path: Path, value: int = 7) -> Path:
    _write(path, _img(value))
    return path


def make_pascal(db_root: Path, ids=("2008_000001", "2009_000002", "2009_000003"), split="val") -> Path:
    root = db_root / "PASCALContext"
    for k, sid in enumerate(ids):
        _write(root / "JPEGImages" / f"{sid}.jpg", _img(40 * k))
    (root / "ImageSets" / "Context").mkdir(parents=True)
    (root / "ImageSets" / "Context" / f"{split}.txt").write_text("\n".join(ids) + "\n\n")
    _write(root / "semseg" / "pascal-context" / f"{ids[0]}.png", _img(1))
    return root


def make_nyud(db_root: Path, ids=("0003", "0004", "0150"), split="val") -> Path:
    root = db_root / "NYUDv2"
    for k, sid in enumerate(ids):
        _write(root / "images" / f"{sid}.png", _img(50 * k))
    (root / "gt_sets").mkdir(parents=True)
    (root / "gt_sets" / f"{split}.txt").write_text("\n".join(ids))
    (root / "depth").mkdir()
    np.save(root / "depth" / f"{ids[1]}.npy", np.ones((6, 8), np.float32))
    return root


def make_video(path: Path, n: int = 7) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    assert writer.isOpened()
    for i in range(n):
        rgb = np.zeros((24, 32, 3), np.uint8)
        rgb[..., 0] = 30 * i  # red ramps with the frame index
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_pascal_reader(tmp_path):
    root = make_pascal(tmp_path)
    r = PascalContextReader(root, "val")
    assert len(r) == 3 and r.ids() == ["2008_000001", "2009_000002", "2009_000003"]
    img = r.load(1)
    assert img.shape == (6, 8, 3) and img.dtype == np.uint8 and abs(int(img.mean()) - 40) <= 2
    assert [r.strata(i) for i in range(3)] == ["2008", "2009", "2009"]
    s = r.sample(0)
    assert s["id"] == "2008_000001" and s["image_path"] == root / "JPEGImages" / "2008_000001.jpg"
    assert s["labels"] == {"semseg": root / "semseg" / "pascal-context" / "2008_000001.png"}  # VOC12 fallback
    assert r.sample(1)["labels"] == {}
    assert "PASCAL-Context" in r.describe() and "3 images" in r.describe()
    assert PascalContextReader(tmp_path).root == root  # db_root works too


def test_pascal_reader_errors(tmp_path):
    with pytest.raises(InputError) as exc:
        PascalContextReader(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(exc.value) and "JPEGImages" in str(exc.value)
    root = make_pascal(tmp_path)
    with pytest.raises(InputError) as exc:
        PascalContextReader(root, "train")
    assert str(root / "ImageSets" / "Context" / "train.txt") in str(exc.value) and "val" in str(exc.value)
    (root / "JPEGImages" / "2009_000002.jpg").unlink()
    with pytest.raises(InputError) as exc:
        PascalContextReader(root, "val")
    assert str(root / "JPEGImages" / "2009_000002.jpg") in str(exc.value) and "1 of 3" in str(exc.value)
    with pytest.raises(ConfigError):
        PascalContextReader(root, "../val")


def test_nyud_reader(tmp_path):
    root = make_nyud(tmp_path)
    r = NYUDReader(root)
    assert r.ids() == ["0003", "0004", "0150"] and len(r) == 3
    assert abs(int(r.load(2).mean()) - 100) <= 1  # PNG is lossless
    assert [r.strata(i) for i in range(3)] == ["0000+", "0000+", "0100+"]
    assert r.sample(1)["labels"] == {"depth": root / "depth" / "0004.npy"}
    (root / "images" / "0150.png").unlink()
    with pytest.raises(InputError, match="0150.png"):
        NYUDReader(root)


def test_image_folder_reader(tmp_path):
    _write(tmp_path / "b" / "x.PNG", _img(10))
    _write(tmp_path / "a.jpg", _img(20))
    _write(tmp_path / "b" / "c" / "y.jpeg", _img(30))
    _write(tmp_path / ".hidden" / "z.png", _img(40))
    (tmp_path / "notes.txt").write_text("not an image")
    r = ImageFolderReader(tmp_path)
    assert r.ids() == ["a", "b/c/y", "b/x"]
    assert [r.strata(i) for i in range(3)] == [".", "b", "b"]
    assert abs(int(r.load(2).mean()) - 10) <= 1
    assert [sid for sid, _ in r] == r.ids()


def test_image_folder_id_collision_and_empty(tmp_path):
    _write(tmp_path / "d" / "a.jpg", _img(1))
    _write(tmp_path / "d" / "a.png", _img(2))
    assert ImageFolderReader(tmp_path / "d").ids() == ["a.jpg", "a.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as exc:
        ImageFolderReader(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(exc.value) and "no images" in str(exc.value)


def test_video_reader(tmp_path):
    path = make_video(tmp_path / "clip.avi")
    with VideoReader(path, every_n=2) as v:
        assert len(v) == 4 and v.frame_count == 7
        assert v.ids() == ["frame_000000", "frame_000002", "frame_000004", "frame_000006"]
        f3, f0 = v.load(3), v.load(0)  # random access, backwards seek
        assert f3.shape == (24, 32, 3) and f3.dtype == np.uint8
        assert abs(float(f3[..., 0].mean()) - 180) < 6 and f3[..., 2].mean() < 6  # RGB, not BGR
        assert abs(float(f0[..., 0].mean()) - 0) < 6
        frames = list(v)
        assert [sid for sid, _ in frames] == v.ids()
        for (_, img), k in zip(frames, range(4)):
            np.testing.assert_array_equal(img, v.load(k))
        assert {v.strata(i) for i in range(4)} == {"t0", "t2", "t5", "t7"}
        assert "7 frames" in v.describe()


def test_video_reader_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        VideoReader(tmp_path / "none.avi")
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError) as exc:
        VideoReader(bad)
    assert str(bad) in str(exc.value)
    with pytest.raises(ConfigError, match="every_n"):
        VideoReader(make_video(tmp_path / "ok.avi", 2), every_n=0)


def test_open_source_detection(tmp_path):
    pascal = make_pascal(tmp_path / "p")
    nyud = make_nyud(tmp_path / "n")
    assert isinstance(open_source(pascal), PascalContextReader)
    assert isinstance(open_source(tmp_path / "p"), PascalContextReader)  # db_root
    assert isinstance(open_source(nyud), NYUDReader)
    assert isinstance(open_source(nyud / "images"), ImageFolderReader)
    assert isinstance(open_source(nyud, "folder"), ImageFolderReader)  # the hint wins over detection
    video = open_source(make_video(tmp_path / "v.avi"), every_n=3)
    assert isinstance(video, VideoReader) and len(video) == 3
    single = open_source(nyud / "images" / "0003.png")
    assert isinstance(single, ImageListReader) and single.ids() == ["0003"] and single.load(0).shape == (6, 8, 3)
    with pytest.raises(InputError, match="does not exist"):
        open_source(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="hint"):
        open_source(pascal, "coco")
    with pytest.raises(InputError, match=r"JPEGImages"):
        open_source(nyud, "pascal_context")
    make_nyud(tmp_path / "p")  # db_root with both datasets: ambiguous without a hint
    with pytest.raises(ConfigError, match="dataset_hint"):
        open_source(tmp_path / "p")
    assert isinstance(open_source(tmp_path / "p", "nyud_v2"), NYUDReader)
    txt = tmp_path / "list.txt"
    txt.write_text("x")
    with pytest.raises(InputError, match="neither"):
        open_source(txt)


# ---- unique ids (collect_images, ImageListReader) ------------------------------------------------------------

def test_same_file_name_in_two_subfolders_keeps_the_subfolder(tmp_path):
    _write(tmp_path / "in" / "a" / "x.jpg", _img(1))
    _write(tmp_path / "in" / "b" / "x.jpg", _img(2))
    r = collect_images([tmp_path / "in"])
    assert r.ids() == ["a/x", "b/x"] and len(r) == 2
    assert [r.image_path(i) for i in range(2)] == [tmp_path / "in" / "a" / "x.jpg", tmp_path / "in" / "b" / "x.jpg"]


def test_extension_is_kept_only_where_it_alone_differs(tmp_path):
    _write(tmp_path / "in" / "x.jpg", _img(1))
    _write(tmp_path / "in" / "x.png", _img(2))
    _write(tmp_path / "in" / "y.png", _img(3))
    assert collect_images([tmp_path / "in"]).ids() == ["x.jpg", "x.png", "y"]
    # the same as two single-file inputs
    assert collect_images([tmp_path / "in" / "x.jpg", tmp_path / "in" / "x.png"]).ids() == ["x.jpg", "x.png"]


def test_two_input_folders_with_the_same_name(tmp_path):
    _write(tmp_path / "d1" / "photos" / "p.jpg", _img(1))
    _write(tmp_path / "d2" / "photos" / "p.jpg", _img(2))
    _write(tmp_path / "d2" / "photos" / "sub" / "q.png", _img(3))
    r = collect_images([tmp_path / "d1" / "photos", tmp_path / "d2" / "photos"])
    assert r.ids() == ["photos/p", "photos-2/p", "photos-2/sub/q"]
    assert r.image_path(1) == tmp_path / "d2" / "photos" / "p.jpg"
    assert [r.strata(i) for i in range(3)] == ["photos", "photos-2", "photos-2"]


def test_single_file_inputs_use_the_stem(tmp_path):
    one = _write_ret(tmp_path / "f" / "x.jpg")
    assert collect_images([one]).ids() == ["x"]
    two = _write_ret(tmp_path / "g" / "x.jpg")
    other = _write_ret(tmp_path / "h" / "y.png")
    assert collect_images([one, two, other]).ids() == ["x", "x-2", "y"]  # same name, different folders: numbered
    folder = tmp_path / "f"
    assert collect_images([folder, two]).ids() == ["f/x", "x"]  # a folder's name prefixes its ids


def test_a_file_reached_twice_is_processed_once(tmp_path):
    x = _write_ret(tmp_path / "in" / "x.jpg")
    r = collect_images([tmp_path / "in", x, tmp_path / "in"])
    assert r.ids() == ["in/x"] and len(r) == 1


def test_collect_images_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        collect_images([tmp_path / "missing.jpg"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        collect_images([tmp_path / "empty"])
    import os

    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(InputError, match="FIFO"):
        collect_images([tmp_path / "pipe.jpg"])


def test_image_list_without_root_never_repeats_an_id(tmp_path):
    a, b = _write_ret(tmp_path / "a" / "x.jpg"), _write_ret(tmp_path / "b" / "x.jpg")
    assert ImageListReader([a, b]).ids() == ["x", "x-2"]


def test_unique_ids_resolves_chains_and_case():
    assert unique_ids(["a", "a", "a.jpg"], ["a.jpg", "a.png", "a.jpg.png"]) == ["a.jpg", "a.png", "a.jpg.png"]
    assert unique_ids(["X", "x"], ["X.jpg", "x.jpg"]) == ["X", "x-2"]  # case-insensitive file systems
    assert unique_ids(["x", "x", "x-2"], ["x.jpg", "x.jpg", "x-2.jpg"]) == ["x", "x-3", "x-2"]


def test_duplicate_explicit_ids_are_a_bug(tmp_path):
    a, b = _write_ret(tmp_path / "a.jpg"), _write_ret(tmp_path / "b.jpg")
    with pytest.raises(ValueError, match="duplicate"):
        ImageListReader([a, b], ids=["same", "same"])
    with pytest.raises(ValueError, match="clean relative path"):
        ImageListReader([a], ids=["../escape"])
