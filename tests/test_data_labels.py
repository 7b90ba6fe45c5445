"""Label decoding of the official splits (invpt.data.labels): every task's encoding, range errors, missing files."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from invpt.data.datasets import NYUDReader, PascalContextReader
from invpt.data.labels import (
    HUMAN_PART_IDS,
    NORMALS_VALID_CONTEXT_CLASSES,
    edges_from_labelmap,
    load_targets,
)
from invpt.data.train_transforms import AddIgnoreRegions
from invpt.data.visualize import voc_palette
from invpt.errors import ConfigError, InputError

sio = pytest.importorskip("scipy.io")
H, W = 6, 8


def _png(path: Path, arr: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr, np.uint8).tobytes())
        im.putpalette(voc_palette().ravel().tolist())
        im.save(path)
    else:
        Image.fromarray(arr).save(path)


def _mat(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sio.savemat(str(path), data)


def _anno(objects: list[tuple[int, np.ndarray, list[tuple[str, np.ndarray]]]]) -> np.ndarray:
    """A PASCAL-Part anno struct: objects (class_ind, mask, [(part_name, mask)])."""
    objs = np.empty((1, len(objects)), dtype=[("class", object), ("class_ind", object), ("mask", object),
                                               ("parts", object)])
    for k, (cls, mask, parts) in enumerate(objects):
        if parts:
            p = np.empty((1, len(parts)), dtype=[("part_name", object), ("mask", object)])
            for j, (name, pm) in enumerate(parts):
                p["part_name"][0, j] = name
                p["mask"][0, j] = pm.astype(np.uint8)
        else:
            p = np.zeros((0, 0))
        objs["class"][0, k] = "person" if cls == 15 else "other"
        objs["class_ind"][0, k] = np.array([[cls]], np.uint8)
        objs["mask"][0, k] = mask.astype(np.uint8)
        objs["parts"][0, k] = p
    anno = np.empty((1, 1), dtype=[("imname", object), ("objects", object)])
    anno["imname"][0, 0] = "x"
    anno["objects"][0, 0] = objs
    return anno


def _pascal(tmp_path: Path, ids=("2008_000001",)) -> Path:
    root = tmp_path / "PASCALContext"
    (root / "ImageSets" / "Context").mkdir(parents=True)
    (root / "ImageSets" / "Context" / "val.txt").write_text("".join(f"{i}\n" for i in ids))
    for sid in ids:
        (root / "JPEGImages").mkdir(exist_ok=True)
        cv2.imwrite(str(root / "JPEGImages" / f"{sid}.jpg"), np.full((H, W, 3), 100, np.uint8))
    return root


def _nyud(tmp_path: Path, sid: str = "000001") -> Path:
    root = tmp_path / "NYUDv2"
    (root / "gt_sets").mkdir(parents=True)
    (root / "gt_sets" / "val.txt").write_text(f"{sid}\n")
    (root / "images").mkdir()
    cv2.imwrite(str(root / "images" / f"{sid}.png"), np.full((H, W, 3), 100, np.uint8))
    return root


def test_pascal_semseg_palette_indices_fallback_and_range(tmp_path):
    root = _pascal(tmp_path, ("a", "b"))
    seg = np.zeros((H, W), np.uint8)
    seg[1:3, 2:5] = 15
    seg[0, 0] = 255
    seg[5, 7] = 20
    _png(root / "semseg" / "VOC12" / "a.png", seg, palette=True)  # palette PNG: the indices are the classes
    _png(root / "semseg" / "pascal-context" / "b.png", seg[::-1].copy())  # only under the fallback
    r = PascalContextReader(tmp_path, "val")
    a = load_targets(r, 0, ["semseg"])["semseg"]
    assert a.dtype == np.float32 and a.shape == (H, W)
    np.testing.assert_array_equal(a, seg.astype(np.float32))
    np.testing.assert_array_equal(load_targets(r, 1, ["semseg"])["semseg"], seg[::-1].astype(np.float32))
    seg[2, 2] = 30
    _png(root / "semseg" / "VOC12" / "a.png", seg, palette=True)
    with pytest.raises(InputError, match=r"a\.png.*30.*0\.\.20"):
        load_targets(r, 0, ["semseg"])


def test_nyud_semseg_shift_and_range(tmp_path):
    root = _nyud(tmp_path)
    raw = np.zeros((H, W), np.uint8)
    raw[0, :4] = [0, 1, 2, 40]
    raw[1:] = 7
    _png(root / "segmentation" / "000001.png", raw)
    r = NYUDReader(tmp_path, "val")
    seg = load_targets(r, 0, ["semseg"])["semseg"]
    np.testing.assert_array_equal(seg[0, :4], [255, 0, 1, 39])
    assert (seg[1:] == 6).all() and seg.dtype == np.float32
    raw[3, 3] = 41
    _png(root / "segmentation" / "000001.png", raw)
    with pytest.raises(InputError, match=r"000001\.png.*41.*0\.\.40"):
        load_targets(r, 0, ["semseg"])


def test_saliency_threshold(tmp_path):
    root = _pascal(tmp_path)
    grey = np.zeros((H, W), np.uint8)
    grey[0, :5] = [0, 127, 128, 200, 255]
    _png(root / "sal_distill" / "2008_000001.png", grey)
    sal = load_targets(PascalContextReader(tmp_path, "val"), 0, ["sal"])["sal"]
    np.testing.assert_array_equal(sal[0, :5], [0, 0, 1, 1, 1])
    assert set(np.unique(sal)) <= {0.0, 1.0}


def test_normals_decoding_and_pascal_masking(tmp_path):
    root = _pascal(tmp_path)
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 0, 255, 51
    _png(root / "normals_distill" / "2008_000001.png", rgb)
    lm = np.full((H, W), 440, np.uint16)  # wall: valid
    lm[:, :3] = 360  # sky: not an NYU class, so normals are zeroed there
    lm[0, 7] = 427  # tvmonitor: added by hand upstream
    _mat(root / "pascal-context" / "trainval" / "2008_000001.mat", {"LabelMap": lm})
    n = load_targets(PascalContextReader(tmp_path, "val"), 0, ["normals"])["normals"]
    assert n.shape == (H, W, 3) and n.dtype == np.float32
    np.testing.assert_allclose(n[0, 7], [-1.0, 1.0, 2 * 51 / 255 - 1], atol=1e-6)
    np.testing.assert_allclose(n[:, 3:], np.broadcast_to([-1.0, 1.0, 2 * 51 / 255 - 1], (H, W - 3, 3)), atol=1e-6)
    assert (n[:, :3] == 0).all()
    out = AddIgnoreRegions()({"normals": n.copy()}, np.random.default_rng(0))["normals"]
    assert (out[:, :3] == 255).all() and (out[:, 3:] != 255).all()
    # NYUD: decoded only, no mask
    nroot = _nyud(tmp_path)
    _png(nroot / "normals" / "000001.png", rgb)
    nn = load_targets(NYUDReader(tmp_path / "NYUDv2", "val"), 0, ["normals"])["normals"]
    np.testing.assert_allclose(nn, 2.0 * rgb.astype(np.float32) / 255.0 - 1.0, atol=1e-6)


def test_normals_valid_class_list_facts():
    valid = set(NORMALS_VALID_CONTEXT_CLASSES)
    assert len(valid) == len(NORMALS_VALID_CONTEXT_CLASSES) == 170
    assert {427, 440, 158, 284, 72} <= valid  # tvmonitor (added by hand), wall, floor, person, chair
    assert not {431, 360, 187, 2} & valid  # unknown, sky, grass, aeroplane


def test_pascal_edges_are_thinned_labelmap_boundaries(tmp_path):
    lm = np.ones((12, 14), np.int64)
    lm[:, 7:] = 2
    lm[8:, :] = 3
    edge = edges_from_labelmap(lm)
    assert edge.dtype == np.float32 and set(np.unique(edge)) == {0.0, 1.0}
    # only next to a label change, and thin: one pixel per row on the vertical boundary, one per column on the other
    diff = np.zeros_like(lm, bool)
    diff[:, 1:] |= lm[:, 1:] != lm[:, :-1]
    diff[:, :-1] |= lm[:, 1:] != lm[:, :-1]
    diff[1:] |= lm[1:] != lm[:-1]
    diff[:-1] |= lm[1:] != lm[:-1]
    assert not (edge.astype(bool) & ~diff).any()
    assert (edge[1:6, 6:8].sum(axis=1) == 1).all()
    assert (edge[7:9, 1:5].sum(axis=0) == 1).all()
    # the reader derives them from the pascal-context LabelMap
    root = _pascal(tmp_path)
    _mat(root / "pascal-context" / "trainval" / "2008_000001.mat", {"LabelMap": lm[:H, :W].astype(np.uint16)})
    got = load_targets(PascalContextReader(tmp_path, "val"), 0, ["edge"])["edge"]
    np.testing.assert_array_equal(got, edges_from_labelmap(lm[:H, :W]))
    assert got.sum() == got[:, 6:8].sum() >= H - 2  # the 7|8 column boundary only, about one pixel per row


def test_nyud_edge_and_depth(tmp_path):
    root = _nyud(tmp_path)
    e = np.zeros((H, W), np.uint8)
    e[2, :] = 255
    _png(root / "edge" / "000001.png", e)
    d = np.full((H, W), 2.5, np.float32)
    d[0, 0] = 0.0
    (root / "depth").mkdir()
    np.save(root / "depth" / "000001.npy", d)
    r = NYUDReader(tmp_path, "val")
    t = load_targets(r, 0, ["depth", "edge"])
    np.testing.assert_array_equal(t["edge"], e / 255.0)
    assert t["depth"][0, 0] == 0 and t["depth"][1, 1] == pytest.approx(2.5)
    ig = AddIgnoreRegions()({"depth": t["depth"].copy()}, np.random.default_rng(0))["depth"]
    assert ig[0, 0] == 255 and (ig[1:] == 2.5).all()
    e[0, 0] = 7  # a soft edge value is read as upstream reads it (/255), not refused
    _png(root / "edge" / "000001.png", e)
    assert load_targets(r, 0, ["edge"])["edge"][0, 0] == pytest.approx(7 / 255.0)
    d[3, 3] = np.nan
    np.save(root / "depth" / "000001.npy", d)
    with pytest.raises(InputError, match="non-finite"):
        load_targets(r, 0, ["depth"])


def test_human_parts_mapping_and_no_person(tmp_path):
    root = _pascal(tmp_path, ("a", "b"))
    full = np.ones((H, W), bool)
    masks = {name: np.zeros((H, W), bool) for name in ("hair", "neck", "ruarm", "lhand", "luleg", "rfoot")}
    for k, m in enumerate(masks.values()):
        m[k, :] = True
    cow_part = np.zeros((H, W), bool)
    cow_part[:, 0] = True
    _mat(root / "human_parts" / "a.mat", {"anno": _anno([
        (10, full, [("head", cow_part)]),  # a cow's "head" is not a human part
        (15, full, list(masks.items())),
    ])})
    _mat(root / "human_parts" / "b.mat", {"anno": _anno([(10, full, [])])})  # no person
    r = PascalContextReader(tmp_path, "val")
    hp = load_targets(r, 0, ["human_parts"])["human_parts"]
    assert hp.dtype == np.float32 and hp.shape == (H, W)
    np.testing.assert_array_equal(hp[:, 0], [1, 2, 3, 4, 5, 6])  # hair->head, neck->torso, ..., foot->lower leg
    none = load_targets(r, 1, ["human_parts"])["human_parts"]
    assert none.shape == (H, W) and (none == 0).all()
    out = AddIgnoreRegions()({"human_parts": none}, np.random.default_rng(0))["human_parts"]
    assert (out == 255).all()
    kept = AddIgnoreRegions()({"human_parts": hp.copy()}, np.random.default_rng(0))["human_parts"]
    np.testing.assert_array_equal(kept, hp)
    _mat(root / "human_parts" / "b.mat", {"anno": _anno([(15, full, [("tail", full)])])})
    with pytest.raises(InputError, match=r"b\.mat.*'tail'"):
        load_targets(r, 1, ["human_parts"])


def test_human_part_grouping_table():
    assert set(HUMAN_PART_IDS.values()) == {1, 2, 3, 4, 5, 6}
    assert [HUMAN_PART_IDS[p] for p in ("hair", "mouth", "neck", "luarm", "rhand", "llarm", "ruleg", "lfoot")] == \
        [1, 1, 2, 3, 4, 4, 5, 6]


def test_missing_label_file_and_unknown_task(tmp_path):
    _pascal(tmp_path)
    r = PascalContextReader(tmp_path, "val")
    with pytest.raises(InputError, match=r"semseg/VOC12/2008_000001\.png.*semseg/pascal-context"):
        load_targets(r, 0, ["semseg"])
    with pytest.raises(InputError, match=r"pascal-context/trainval/2008_000001\.mat"):
        load_targets(r, 0, ["edge"])
    with pytest.raises(ConfigError, match="depth"):
        load_targets(r, 0, ["depth"])
    # normals also need the LabelMap they are masked with
    assert [p.name for p in r.missing_label_files(["normals"])] == ["2008_000001.png", "2008_000001.mat"]
