"""Tests of invpt.data.visualize: palettes, per-task visuals, overview grid and atomic PNG writing."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from invpt.data.decode import decode_all
from invpt.data.visualize import (
    colorize_depth,
    colorize_labels,
    colorize_normals,
    colorize_probability,
    overview,
    save_png,
    visualize,
    voc_palette,
)
from invpt.errors import InputError
from invpt.tasks import DATASETS


def test_voc_palette_known_deterministic_distinct():
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    np.testing.assert_array_equal(pal[:5], [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]])
    np.testing.assert_array_equal(pal[15], [192, 128, 128])  # VOC 'person'
    assert len({tuple(c) for c in pal}) == 256
    pal[1] = 7  # a copy: mutating it must not change the next call
    np.testing.assert_array_equal(voc_palette(), np.vstack([pal[:1], [[128, 0, 0]], pal[2:]]))


def test_colorize_labels_and_ignore():
    pal = voc_palette()
    labels = np.array([[0, 1, 20], [255, 30, 15]], np.uint8)
    rgb = colorize_labels(labels, num_classes=21)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0], pal[[0, 1, 20]])
    np.testing.assert_array_equal(rgb[1, 0], pal[255])
    np.testing.assert_array_equal(rgb[1, 1], pal[255])  # 30 is out of range for 21 classes
    np.testing.assert_array_equal(rgb[1, 2], pal[15])
    np.testing.assert_array_equal(colorize_labels(labels)[1, 1], pal[30])


def test_colorize_probability_grey():
    rgb = colorize_probability(np.array([[0.0, 0.5, 1.0]], np.float32))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 128, 255])
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_colorize_depth_range_and_nan():
    depth = np.array([[0.5, 1.0], [2.0, np.nan]], np.float32)
    rgb, (lo, hi) = colorize_depth(depth)
    assert (lo, hi) == (0.5, 2.0)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert not np.array_equal(rgb[0, 0], rgb[1, 0])
    assert (rgb[1, 1] == 0).all()
    flat, rng = colorize_depth(np.full((3, 3), 4.0, np.float32))  # constant image: no division by zero
    assert rng == (4.0, 4.0) and (flat == flat[0, 0]).all()


def test_colorize_normals():
    n = np.zeros((3, 1, 2), np.float32)
    n[:, 0, 0] = (0, 0, 1)
    n[:, 0, 1] = (-1, 1, 0)
    rgb = colorize_normals(n)
    np.testing.assert_array_equal(rgb[0], [[128, 128, 255], [0, 255, 128]])


@pytest.mark.parametrize("ds_name", sorted(DATASETS))
def test_visualize_every_task_and_overview(ds_name):
    ds = DATASETS[ds_name]
    rng = np.random.default_rng(0)
    outputs = {t.name: rng.standard_normal((t.channels, 12, 16)).astype(np.float32) for t in ds.tasks}
    visuals = {name: visualize(ds.task(name), m) for name, m in decode_all(ds, outputs).items()}
    for name, v in visuals.items():
        assert v.shape == (12, 16, 3) and v.dtype == np.uint8, name
    image = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    grid = overview(image, visuals, titles=False)
    n = len(visuals) + 1  # 6 (PASCAL) and 5 (NYUD) tiles -> 3 columns x 2 rows, 4 px gaps
    assert n in (5, 6) and grid.shape == (2 * 12 + 4, 3 * 16 + 2 * 4, 3)
    np.testing.assert_array_equal(grid[:12, :16], image)  # input first
    first = ds.tasks[0].name
    np.testing.assert_array_equal(grid[:12, 20:36], visuals[first])
    titled = overview(image, visuals, titles=True)
    assert titled.shape == grid.shape and not np.array_equal(titled[:12, :16], image)


def test_overview_resizes_tiles_and_row_layout():
    image = np.zeros((10, 20, 3), np.uint8)
    vis = {"a": np.full((5, 10, 3), 200, np.uint8)}
    grid = overview(image, vis, titles=False, gap=0)
    assert grid.shape == (10, 40, 3) and (grid[:, 20:] == 200).all()


def test_save_png_roundtrip_atomic(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    path = save_png(tmp_path / "sub" / "out.png", rgb)
    back = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, rgb)
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.png"]  # no temp file left behind


def test_save_png_unwritable_directory(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    target = blocker / "out.png"  # parent is a file, so it can never be a directory
    with pytest.raises(InputError) as exc:
        save_png(target, np.zeros((2, 2, 3), np.uint8))
    assert str(target) in str(exc.value)
    with pytest.raises(InputError, match="uint8"):
        save_png(tmp_path / "x.png", np.zeros((2, 2, 3), np.float32))
