"""Upstream's training / evaluation transforms (invpt.data.train_transforms): seeding, geometry, fills, ignore."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from invpt.data.train_transforms import (
    AddIgnoreRegions,
    Compose,
    Normalize,
    PadImage,
    PhotoMetricDistortion,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScaling,
    ToTensor,
    build_eval_transforms,
    build_train_transforms,
)
from invpt.data.transforms import normalize, restore_labels
from invpt.errors import InputError


def _sample(h: int = 40, w: int = 52, seed: int = 0, tasks=("semseg", "depth", "normals", "edge")) -> dict:
    g = np.random.default_rng(seed)
    s = {"image": g.integers(0, 256, (h, w, 3)).astype(np.float32), "meta": {"id": "x", "size": (h, w)}}
    if "semseg" in tasks:
        s["semseg"] = g.integers(0, 5, (h, w)).astype(np.float32)
    if "depth" in tasks:
        s["depth"] = g.uniform(0.5, 5.0, (h, w)).astype(np.float32)
    if "normals" in tasks:
        n = g.normal(size=(h, w, 3)).astype(np.float32)
        s["normals"] = n / np.linalg.norm(n, axis=2, keepdims=True)
    if "edge" in tasks:
        s["edge"] = (g.random((h, w)) < 0.1).astype(np.float32)
    if "human_parts" in tasks:
        s["human_parts"] = g.integers(0, 7, (h, w)).astype(np.float32)
    return s


def _copy(s: dict) -> dict:
    return {k: (dict(v) if k == "meta" else v.copy()) for k, v in s.items()}


def test_train_transforms_are_seeded(tmp_path):
    t = build_train_transforms({"dataset": "nyud_v2", "image_size": [64, 64]})
    base = _sample(50, 70)
    a = t(_copy(base), np.random.default_rng([0, 0, 3]))
    b = t(_copy(base), np.random.default_rng([0, 0, 3]))
    c = t(_copy(base), np.random.default_rng([0, 1, 3]))
    for k in ("image", "semseg", "depth", "normals", "edge"):
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["image"], c["image"])
    assert a["image"].shape == (3, 64, 64) and a["image"].dtype == torch.float32
    assert a["semseg"].shape == (1, 64, 64) and a["normals"].shape == (3, 64, 64) and a["depth"].shape == (1, 64, 64)


def test_flip_negates_normals_x_and_keeps_ignored():
    s = _sample(8, 10)
    s["normals"][0, 0] = 255.0  # an ignored pixel keeps its 255s
    before = _copy(s)
    out = RandomHorizontalFlip(p=1.0)(s, np.random.default_rng(0))
    assert out["meta"]["flipped"] is True
    np.testing.assert_array_equal(out["image"], before["image"][:, ::-1])
    np.testing.assert_array_equal(out["semseg"], before["semseg"][:, ::-1])
    n0 = before["normals"][:, ::-1]
    np.testing.assert_array_equal(out["normals"][..., 1:], n0[..., 1:])
    np.testing.assert_array_equal(out["normals"][1:, :, 0], -n0[1:, :, 0])
    np.testing.assert_array_equal(out["normals"][0, -1], [255, 255, 255])
    kept = RandomHorizontalFlip(p=0.0)(_copy(before), np.random.default_rng(0))
    np.testing.assert_array_equal(kept["normals"], before["normals"])


def test_scaling_divides_depth_and_uses_nearest_for_labels():
    s = _sample(40, 60)
    s["depth"][:] = 3.0
    s["depth"][:5] = 0.0  # invalid stays 0
    out = RandomScaling(0.5, 2.0)(s, np.random.default_rng(7))
    sc = out["meta"]["scale"]
    assert 0.5 <= sc <= 2.0 and abs(sc - 1.0) > 0.05
    hw = (int(40 * sc), int(60 * sc))  # upstream truncates
    assert out["image"].shape == hw + (3,) and out["semseg"].shape == hw and out["normals"].shape == hw + (3,)
    vals = np.unique(out["depth"])
    np.testing.assert_allclose(vals, [0.0, 3.0 / sc], rtol=1e-6)
    assert set(np.unique(out["semseg"])) <= set(range(5))  # nearest: no invented classes
    norms = np.linalg.norm(out["normals"], axis=2)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def _acceptable(seg: np.ndarray, ratio: float = 0.75) -> bool:
    v, c = np.unique(seg, return_counts=True)
    c = c[v != 255]
    return len(c) > 1 and c.max() / c.sum() < ratio


def test_crop_respects_cat_max_ratio_when_possible():
    seg = np.ones((64, 256), np.float32)
    seg[:, 128:] = 2  # one crop offset in six mixes both classes enough
    base = {"image": np.zeros((64, 256, 3), np.float32), "semseg": seg}
    with_retry = sum(_acceptable(RandomCrop((64, 64))(_copy(base), np.random.default_rng(s))["semseg"])
                     for s in range(60))
    no_retry = sum(_acceptable(RandomCrop((64, 64), cat_max_ratio=1.0)(_copy(base), np.random.default_rng(s))["semseg"])
                   for s in range(60))
    assert with_retry >= 40 and with_retry >= no_retry + 20
    # impossible (one class): the crop is still made, of the requested size
    one = {"image": np.zeros((70, 90, 3), np.float32), "semseg": np.ones((70, 90), np.float32)}
    out = RandomCrop((64, 64))(one, np.random.default_rng(0))
    assert out["image"].shape == (64, 64, 3) and out["semseg"].shape == (64, 64)
    small = RandomCrop((64, 64))({"image": np.zeros((30, 90, 3), np.float32)}, np.random.default_rng(0))
    assert small["image"].shape == (30, 64, 3)  # a smaller side is kept whole


def test_photometric_distortion_changes_only_the_image():
    s = _sample(16, 16)
    before = _copy(s)
    a = PhotoMetricDistortion()(_copy(s), np.random.default_rng(1))
    b = PhotoMetricDistortion()(_copy(s), np.random.default_rng(1))
    np.testing.assert_array_equal(a["image"], b["image"])
    changed = [not np.array_equal(PhotoMetricDistortion()(_copy(s), np.random.default_rng(k))["image"],
                                  before["image"]) for k in range(8)]
    assert sum(changed) >= 6
    assert a["image"].dtype == np.float32 and 0 <= a["image"].min() and a["image"].max() <= 255
    for k in ("semseg", "depth", "normals", "edge"):
        np.testing.assert_array_equal(a[k], before[k])


def test_eval_transforms_pad_centred_and_allow_crop_back():
    t = build_eval_transforms({"dataset": "nyud_v2", "image_size": [64, 128]})
    s = _sample(50, 91)
    s["depth"][0, 0] = 0.0
    before = _copy(s)
    out = t(s, np.random.default_rng(0))
    top, left = out["meta"]["pad"]
    assert (top, left) == ((64 - 50) // 2, (128 - 91) // 2) and out["meta"]["size"] == (50, 91)
    crop = (slice(top, top + 50), slice(left, left + 91))
    np.testing.assert_allclose(out["image"][:, crop[0], crop[1]].numpy(),
                               normalize(before["image"]).transpose(2, 0, 1), rtol=1e-6)
    np.testing.assert_array_equal(out["semseg"][0, crop[0], crop[1]].numpy(), before["semseg"])
    np.testing.assert_array_equal(restore_labels(out["edge"][0].numpy(), out["meta"]["pad_info"]), before["edge"])
    np.testing.assert_array_equal(out["normals"][:, crop[0], crop[1]].numpy(), before["normals"].transpose(2, 0, 1))
    assert out["depth"][0, top, left] == 255  # the invalid depth pixel
    # padding: image 0 (the mean colour), every label ignored
    pad = torch.ones(64, 128, dtype=torch.bool)
    pad[crop] = False
    assert (out["image"][:, pad] == 0).all()
    for k in ("semseg", "edge", "depth", "normals"):
        assert (out[k][:, pad] == 255).all(), k


def test_eval_refuses_an_image_larger_than_the_model():
    t = build_eval_transforms({"dataset": "pascal_context", "image_size": [64, 64]})
    with pytest.raises(InputError, match=r"'x' is 70x50.*larger than the model input size 64x64.*image_size"):
        t(_sample(70, 50, tasks=()), np.random.default_rng(0))


def test_ignore_regions_and_to_tensor():
    s = _sample(6, 7, tasks=("human_parts", "normals", "depth"))
    s["human_parts"][:] = 0
    s["normals"][2, 3] = 0
    s["depth"][1, 1] = 0
    s = Compose([Normalize(), PadImage((8, 8)), AddIgnoreRegions(), ToTensor()])(s, np.random.default_rng(0))
    assert (s["human_parts"] == 255).all()  # no part anywhere: the whole map is ignored
    top, left = s["meta"]["pad"]
    assert (s["normals"][:, top + 2, left + 3] == 255).all() and s["depth"][0, top + 1, left + 1] == 255
    assert s["human_parts"].shape == (1, 8, 8) and s["normals"].shape == (3, 8, 8) and s["image"].shape == (3, 8, 8)
