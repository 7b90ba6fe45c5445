"""Synthetic datasets (invpt.data.synthetic) read back by the official readers, and MultiTaskDataset over them."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from invpt.data.datasets import NYUDReader, PascalContextReader
from invpt.data.labels import NORMALS_VALID_CONTEXT_CLASSES, load_targets, read_labelmap
from invpt.data.multitask import MultiTaskDataset, collate_multitask
from invpt.data.synthetic import main, make_synthetic
from invpt.errors import ConfigError, InputError

pytest.importorskip("scipy")
pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def db_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    make_synthetic("pascal_context", root, n_train=6, n_val=3, seed=0)
    make_synthetic("nyud_v2", root, n_train=4, n_val=2, seed=0)
    return root


def _boundary(lm: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label."""
    b = np.zeros(lm.shape, bool)
    b[:, 1:] |= lm[:, 1:] != lm[:, :-1]
    b[:, :-1] |= lm[:, 1:] != lm[:, :-1]
    b[1:] |= lm[1:] != lm[:-1]
    b[:-1] |= lm[1:] != lm[:-1]
    return b


def test_pascal_tree_reads_back_with_consistent_labels(db_root):
    root = db_root / "PASCALContext"
    assert (root / "ImageSets" / "Context" / "train.txt").read_text().split()[0] == "2008_000001"
    r = PascalContextReader(db_root, "train")
    assert len(r) == 6 and len(PascalContextReader(root, "val")) == 3
    assert r.missing_label_files(["semseg", "human_parts", "sal", "normals", "edge"]) == []
    assert any("pascal-context" in str(r.label_file(i, "semseg")) for i in range(len(r)))  # fallback exercised
    parts = json.loads((root / "ImageSets" / "Parts" / "train.txt").read_text())  # upstream's object lists
    assert list(parts) == r.ids()
    sizes, no_person = set(), 0
    for i in range(len(r)):
        img = r.load(i)
        h, w = img.shape[:2]
        sizes.add((h, w))
        assert 100 <= h <= 128 and 100 <= w <= 128
        t = load_targets(r, i, ["semseg", "human_parts", "sal", "normals", "edge"])
        seg, hp, sal = t["semseg"], t["human_parts"], t["sal"]
        assert all(v.shape[:2] == (h, w) for v in t.values())
        assert set(np.unique(seg)) <= set(range(21)) | {255}
        assert (hp > 0).any() == (seg == 15).any() == (15 in parts[r.ids()[i]])
        if not (hp > 0).any():
            no_person += 1
        assert np.isin(seg[hp > 0], [15, 255]).all()  # parts only on the person
        labelled = seg != 255
        assert ((sal == 1) == (seg > 0))[labelled].mean() > 0.97  # saliency = the objects
        lm = read_labelmap(r.label_file(i, "edge"))
        valid = np.isin(lm, NORMALS_VALID_CONTEXT_CLASSES)
        norms = np.linalg.norm(t["normals"], axis=2)
        assert (norms[~valid] == 0).all() and (norms[valid] > 0.9).all()
        assert t["edge"].any() and not (t["edge"].astype(bool) & ~_boundary(lm)).any()
    assert len(sizes) > 3 and no_person >= 1


def test_nyud_tree_reads_back_with_consistent_labels(db_root):
    r = NYUDReader(db_root / "NYUDv2", "val")
    assert r.ids() == ["000005", "000006"]
    for i in range(len(r)):
        assert r.load(i).shape == (128, 192, 3)
        t = load_targets(r, i, ["semseg", "depth", "normals", "edge"])
        seg, depth = t["semseg"], t["depth"]
        assert set(np.unique(seg)) <= set(range(40)) | {255} and (seg == 255).any()  # unlabelled patch
        assert (depth == 0).any() and depth.max() < 10 and np.isfinite(depth).all()
        np.testing.assert_allclose(np.linalg.norm(t["normals"], axis=2), 1.0, atol=0.02)
        assert t["edge"].any() and not (t["edge"].astype(bool) & ~_boundary(seg)).any()


def test_same_seed_same_files_and_refuses_existing(tmp_path, db_root):
    make_synthetic("pascal_context", tmp_path / "a", n_train=1, n_val=1, seed=3)
    make_synthetic("pascal_context", tmp_path / "b", n_train=1, n_val=1, seed=3)
    make_synthetic("pascal_context", tmp_path / "c", n_train=1, n_val=1, seed=4)

    def digest(root: Path) -> str:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".mat")  # .mat headers hold a date
        data = b"".join(p.relative_to(root).as_posix().encode() + p.read_bytes() for p in files)
        return hashlib.sha256(data).hexdigest()

    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    with pytest.raises(InputError, match="already exists and is not empty"):
        make_synthetic("pascal_context", tmp_path / "a", n_train=1, n_val=1)
    with pytest.raises(ConfigError, match="at least 1 train"):
        make_synthetic("nyud_v2", tmp_path / "d", n_train=0)
    assert not list((tmp_path / "a").glob(".*tmp*"))  # no staging folder left behind


def test_cli_help_and_output(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "example" in capsys.readouterr().out
    assert main(["--dataset", "nyud_v2", "--out", str(tmp_path), "--train", "2", "--val", "1", "--size", "64", "64",
                 "-q"]) == 0
    assert (tmp_path / "NYUDv2" / "gt_sets" / "val.txt").read_text() == "000003\n"
    assert NYUDReader(tmp_path, "train").load(1).shape == (64, 64, 3)
    assert main(["--dataset", "nyud_v2", "--out", str(tmp_path), "-q"]) == 2  # refuses the existing dataset


def test_multitask_dataset_items_collate_and_seeding(db_root):
    ds = MultiTaskDataset(db_root, "tiny_pascal", split="train", seed=5)
    item = ds[2]
    assert item["image"].shape == (3, 128, 128) and item["human_parts"].shape == (1, 128, 128)
    assert item["normals"].shape == (3, 128, 128) and item["meta"]["id"] == ds.ids()[2]
    again = ds[2]
    assert all(torch.equal(item[k], again[k]) for k in ds.tasks + ("image",))
    ds.set_epoch(1)
    assert not torch.equal(ds[2]["image"], item["image"])
    ds.set_epoch(0)
    loaders = [torch.utils.data.DataLoader(ds, batch_size=3, num_workers=n, collate_fn=collate_multitask)
               for n in (0, 2)]
    b0, b2 = (next(iter(dl)) for dl in loaders)
    assert b0["image"].shape == (3, 3, 128, 128) and [m["id"] for m in b0["meta"]] == ds.ids()[:3]
    for k in ("image",) + ds.tasks:
        assert torch.equal(b0[k], b2[k]), k


def test_multitask_eval_crop_back_and_missing_labels(db_root, tmp_path):
    ds = MultiTaskDataset(db_root / "PASCALContext", "tiny_pascal", split="val", transforms="eval")
    raw = MultiTaskDataset(db_root, "tiny_pascal", split="val", transforms=None)
    item, src = ds[0], raw[0]
    (h, w), (top, left) = item["meta"]["size"], item["meta"]["pad"]
    assert src["image"].shape[:2] == (h, w) and (top, left) == ((128 - h) // 2, (128 - w) // 2)
    np.testing.assert_array_equal(item["semseg"][0, top:top + h, left:left + w].numpy(), src["semseg"])
    # a missing label file is reported once, with the count and the layout
    make_synthetic("nyud_v2", tmp_path, n_train=3, n_val=1)
    (tmp_path / "NYUDv2" / "depth" / "000002.npy").unlink()
    (tmp_path / "NYUDv2" / "edge" / "000003.png").unlink()
    with pytest.raises(InputError, match=r"2 label file\(s\).*depth/000002\.npy.*<root>/depth/<id>\.npy"):
        MultiTaskDataset(tmp_path, "tiny_nyud", split="train")
    assert len(MultiTaskDataset(tmp_path, "tiny_nyud", split="train", tasks=["semseg", "normals"])) == 3
    with pytest.raises(ConfigError, match="sal"):
        MultiTaskDataset(tmp_path, "tiny_nyud", split="train", tasks=["sal"])
