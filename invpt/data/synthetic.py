"""``invpt-synth-data``: small synthetic datasets in the official PASCAL-Context and NYUD-v2 layouts (spec §14).

For tests, demos and smoke runs of training and evaluation without the real data. Each image is a scene of a few
textured objects on a two-part background, and every label is derived from the same scene, so the tasks agree:

* PASCAL-Context (``<out>/PASCALContext``): a person (three samples in four) drawn from PASCAL-Part parts (head,
  hair, neck, torso, arms, hands, legs, feet) plus one or two other VOC objects (discs shaded as spheres,
  rectangles as tilted planes). Images are JPEGs slightly smaller than ``size`` with varying sides (about 78-100%),
  so padding and crop-back are exercised. Written: the pascal-context ``LabelMap`` (459-class ids; the background
  mixes classes inside and outside the normals' valid list), VOC semseg PNGs (palette PNGs with a 255 band on object
  outlines; every fourth sample under the ``semseg/pascal-context`` fallback instead), PASCAL-Part ``anno`` .mat
  files, distilled normals (RGB) and saliency (grey, soft edges) PNGs, the split files and ``ImageSets/Parts``
  (upstream's JSON list of object categories per image, which it would otherwise generate).
* NYUD-v2 (``<out>/NYUDv2``): ceiling / wall / floor with furniture, an unlabelled patch (class 0) and a patch of
  invalid depth (0). Images are PNGs of exactly ``size`` (the real NYUD images match the model size). Written:
  segmentation (0..40), depth (.npy metres: planes per surface), normals, edges (the thinned class boundaries, as
  PASCAL's are computed) and the split files.

Ids look like the real ones: ``2008_000123`` (PASCAL) and ``000123`` (NYUD). The output directory is written in a
staging folder beside it and renamed into place at the end; an existing non-empty one is refused.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from invpt.cli.common import add_logging_args, run_main
from invpt.errors import ConfigError, InputError

_logger = logging.getLogger("invpt.synth")

DEFAULT_SIZES: dict[str, tuple[int, int]] = {"pascal_context": (128, 128), "nyud_v2": (128, 192)}
DIR_NAMES: dict[str, str] = {"pascal_context": "PASCALContext", "nyud_v2": "NYUDv2"}
MIN_SIDE = 32
MAX_SIDE = 4096  # ample for every preset (ViT-L PASCAL 512x512, NYUD 480x640); larger scenes exhaust memory

#: VOC class id -> (name, pascal-context 459-class id) for the objects drawn in PASCAL scenes.
VOC_TO_CONTEXT: dict[int, tuple[str, int]] = {
    1: ("aeroplane", 2), 2: ("bicycle", 23), 3: ("bird", 25), 4: ("boat", 31), 5: ("bottle", 34), 6: ("bus", 45),
    7: ("car", 59), 8: ("cat", 65), 9: ("chair", 72), 10: ("cow", 98), 11: ("diningtable", 397), 12: ("dog", 113),
    13: ("horse", 207), 14: ("motorbike", 258), 15: ("person", 284), 16: ("pottedplant", 308), 17: ("sheep", 347),
    18: ("sofa", 368), 19: ("train", 416), 20: ("tvmonitor", 427),
}
#: Background regions of PASCAL scenes: (pascal-context name, id); sky/grass/road are outside the normals' valid list.
PASCAL_UPPER = (("sky", 360), ("wall", 440))
PASCAL_LOWER = (("grass", 187), ("floor", 158), ("road", 324))
#: NYUD-v2 40-class ids (1-based, as in the segmentation PNGs) of the furniture drawn.
NYUD_FLOOR_OBJECTS = (3, 4, 5, 6, 7, 10, 29, 35)  # cabinet bed chair sofa table bookshelf box lamp
NYUD_WALL_OBJECTS = (11, 25, 9)  # picture television window


def _colour(key: int) -> np.ndarray:
    """A fixed mid-range RGB colour per class key."""
    return np.random.default_rng(1000 + key).integers(40, 216, 3).astype(np.float32)


def _unit(v: Sequence[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float32)
    return a / np.linalg.norm(a)


class _Canvas:
    """The scene being drawn: image, a class map, normals and (NYUD) depth, painted object by object."""

    def __init__(self, h: int, w: int, rng: np.random.Generator) -> None:
        self.h, self.w, self.rng = h, w, rng
        self.yy, self.xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self.image = np.zeros((h, w, 3), np.float32)
        self.normals = np.zeros((h, w, 3), np.float32)
        self.depth = np.zeros((h, w), np.float32)

    def texture(self, key: int) -> np.ndarray:
        """Colour of class ``key`` modulated by stripes of a random orientation and period, plus noise."""
        angle = self.rng.uniform(0, np.pi)
        period = self.rng.uniform(4, 12)
        phase = np.cos(angle) * self.xx + np.sin(angle) * self.yy
        shade = 1.0 + 0.15 * np.sin(2 * np.pi * phase / period)
        tex = _colour(key)[None, None, :] * shade[:, :, None]
        return tex + self.rng.normal(0, 5, tex.shape).astype(np.float32)

    def paint(self, mask: np.ndarray, key: int, normals: np.ndarray, depth: np.ndarray | float | None = None) -> None:
        self.image[mask] = self.texture(key)[mask]
        n = np.broadcast_to(normals, (self.h, self.w, 3)) if normals.ndim == 1 else normals
        self.normals[mask] = n[mask]
        if depth is not None:
            self.depth[mask] = (np.broadcast_to(depth, (self.h, self.w)))[mask]

    def disc(self, cy: float, cx: float, r: float) -> tuple[np.ndarray, np.ndarray]:
        """Mask of a disc and the normals of the sphere it shows."""
        dx, dy = (self.xx - cx) / r, (self.yy - cy) / r
        rr = dx * dx + dy * dy
        mask = rr <= 1.0
        z = np.sqrt(np.clip(1.0 - rr, 0.0, 1.0))
        n = np.stack([dx, dy, z], axis=2)
        n /= np.maximum(np.linalg.norm(n, axis=2, keepdims=True), 1e-6)
        return mask, n.astype(np.float32)

    def rect(self, y0: float, x0: float, y1: float, x1: float) -> np.ndarray:
        return (self.yy >= y0) & (self.yy < y1) & (self.xx >= x0) & (self.xx < x1)

    def tilted_plane(self) -> np.ndarray:
        return _unit([self.rng.uniform(-0.4, 0.4), self.rng.uniform(-0.4, 0.4), 1.0])


def _encode_normals(n: np.ndarray) -> np.ndarray:
    """Upstream's PNG encoding of unit normals: ``round((n + 1) * 255 / 2)`` as uint8 RGB."""
    return np.clip(np.round((n + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _finish_image(c: _Canvas) -> np.ndarray:
    return np.clip(np.round(c.image + c.rng.normal(0, 3, c.image.shape)), 0, 255).astype(np.uint8)


# ---- PASCAL-Context -----------------------------------------------------------------------------------------------
def _person_parts(c: _Canvas, top: float, cx: float, bh: float) -> dict[str, np.ndarray]:
    """Masks of PASCAL-Part person parts for a standing figure of height ``bh`` whose head top is at ``top``."""
    u = bh
    head_c = (top + 0.085 * u, cx)
    head, _ = c.disc(head_c[0], head_c[1], 0.075 * u)
    hair = head & (c.yy < head_c[0] - 0.035 * u)
    parts = {
        "hair": hair,
        "head": head & ~hair,
        "neck": c.rect(top + 0.155 * u, cx - 0.03 * u, top + 0.2 * u, cx + 0.03 * u),
        "torso": c.rect(top + 0.2 * u, cx - 0.1 * u, top + 0.52 * u, cx + 0.1 * u),
    }
    for side, s in (("l", 1.0), ("r", -1.0)):
        arm = (cx + s * 0.1 * u, cx + s * 0.165 * u)
        ax0, ax1 = min(arm), max(arm)
        parts[f"{side}uarm"] = c.rect(top + 0.21 * u, ax0, top + 0.37 * u, ax1)
        parts[f"{side}larm"] = c.rect(top + 0.37 * u, ax0, top + 0.51 * u, ax1)
        parts[f"{side}hand"] = c.rect(top + 0.51 * u, ax0, top + 0.56 * u, ax1)
        leg = (cx + s * 0.012 * u, cx + s * 0.095 * u)
        lx0, lx1 = min(leg), max(leg)
        parts[f"{side}uleg"] = c.rect(top + 0.52 * u, lx0, top + 0.74 * u, lx1)
        parts[f"{side}lleg"] = c.rect(top + 0.74 * u, lx0, top + 0.95 * u, lx1)
        foot = (cx + s * 0.012 * u, cx + s * 0.13 * u)
        parts[f"{side}foot"] = c.rect(top + 0.95 * u, min(foot), top + 1.0 * u, max(foot))
    return {k: v for k, v in parts.items() if v.any()}


#: Colour keys of the person's parts (skin, hair, shirt, trousers, shoes).
_PART_COLOUR = {"head": 101, "neck": 101, "lhand": 101, "rhand": 101, "hair": 102, "torso": 103, "luarm": 103,
                "ruarm": 103, "llarm": 103, "rlarm": 103, "luleg": 104, "ruleg": 104, "llleg": 104, "rlleg": 104,
                "lfoot": 105, "rfoot": 105}


def _pascal_scene(h: int, w: int, rng: np.random.Generator, with_person: bool) -> dict[str, Any]:
    c = _Canvas(h, w, rng)
    labelmap = np.zeros((h, w), np.uint16)
    semseg = np.zeros((h, w), np.uint8)
    horizon = rng.uniform(0.35, 0.6) * h
    upper_name, upper_id = PASCAL_UPPER[rng.integers(len(PASCAL_UPPER))]
    lower_name, lower_id = PASCAL_LOWER[rng.integers(len(PASCAL_LOWER))]
    up = c.yy < horizon
    c.paint(up, 200 + upper_id, _unit([0.0, 0.0, 1.0]))
    c.paint(~up, 200 + lower_id, _unit([0.0, -0.9, 0.45]))
    labelmap[up], labelmap[~up] = upper_id, lower_id
    objects: list[dict[str, Any]] = []
    n_other = int(rng.integers(1, 3))
    others = [k for k in VOC_TO_CONTEXT if k != 15]
    for cls in rng.choice(others, size=n_other, replace=False):
        cls = int(cls)
        if rng.random() < 0.5:
            r = rng.uniform(0.12, 0.22) * min(h, w)
            mask, n = c.disc(rng.uniform(r * 0.6, h - r * 0.6), rng.uniform(r * 0.6, w - r * 0.6), r)
        else:
            bh, bw = rng.uniform(0.2, 0.45) * h, rng.uniform(0.2, 0.45) * w
            y0, x0 = rng.uniform(0, h - bh), rng.uniform(0, w - bw)
            mask, n = c.rect(y0, x0, y0 + bh, x0 + bw), c.tilted_plane()
        c.paint(mask, cls, n)
        for o in objects:  # occluded parts of earlier objects
            o["mask"] &= ~mask
        objects.append({"class": VOC_TO_CONTEXT[cls][0], "class_ind": cls, "mask": mask, "parts": []})
    if with_person:
        bh = rng.uniform(0.6, 0.85) * h
        top = rng.uniform(0.0, h - bh)
        cx = rng.uniform(0.2 * w, 0.8 * w)
        parts = _person_parts(c, top, cx, bh)
        person = np.zeros((h, w), bool)
        for name, pmask in parts.items():
            n = c.disc(top + 0.085 * bh, cx, 0.075 * bh)[1] if name in ("head", "hair") else _unit([0.0, 0.0, 1.0])
            c.paint(pmask, _PART_COLOUR[name], n)
            person |= pmask
        for o in objects:
            o["mask"] &= ~person
        objects.append({"class": "person", "class_ind": 15, "mask": person,
                        "parts": [(name, pmask) for name, pmask in parts.items()]})
    import cv2

    outline = np.zeros((h, w), bool)
    for o in objects:
        labelmap[o["mask"]] = VOC_TO_CONTEXT[o["class_ind"]][1]
        semseg[o["mask"]] = o["class_ind"]
        m8 = o["mask"].astype(np.uint8)
        outline |= (cv2.dilate(m8, np.ones((3, 3), np.uint8)) > 0) & ~o["mask"]
        outline |= o["mask"] & (cv2.erode(m8, np.ones((3, 3), np.uint8)) == 0)
    semseg[outline] = 255  # VOC marks object outlines as "void"
    fg = np.zeros((h, w), np.uint8)
    for o in objects:
        fg[o["mask"]] = 255
    sal = cv2.GaussianBlur(fg, (5, 5), 1.2)
    return {"image": _finish_image(c), "labelmap": labelmap, "semseg": semseg, "sal": sal,
            "normals": _encode_normals(c.normals), "objects": objects}


def _anno_struct(imname: str, objects: list[dict[str, Any]]) -> np.ndarray:
    """A PASCAL-Part ``anno`` struct (imname, objects(class, class_ind, mask, parts(part_name, mask))) for savemat."""
    obj_dt = [("class", object), ("class_ind", object), ("mask", object), ("parts", object)]
    part_dt = [("part_name", object), ("mask", object)]
    objs = np.empty((1, len(objects)), dtype=obj_dt)
    for k, o in enumerate(objects):
        if o["parts"]:
            parts = np.empty((1, len(o["parts"])), dtype=part_dt)
            for j, (name, pmask) in enumerate(o["parts"]):
                parts["part_name"][0, j] = name
                parts["mask"][0, j] = pmask.astype(np.uint8)
        else:
            parts = np.zeros((0, 0))
        objs["class"][0, k] = o["class"]
        objs["class_ind"][0, k] = np.array([[o["class_ind"]]], dtype=np.uint8)
        objs["mask"][0, k] = o["mask"].astype(np.uint8)
        objs["parts"][0, k] = parts
    anno = np.empty((1, 1), dtype=[("imname", object), ("objects", object)])
    anno["imname"][0, 0] = imname
    anno["objects"][0, 0] = objs
    return anno


# ---- NYUD-v2 ------------------------------------------------------------------------------------------------------
def _nyud_scene(h: int, w: int, rng: np.random.Generator) -> dict[str, Any]:
    c = _Canvas(h, w, rng)
    seg = np.zeros((h, w), np.uint8)
    d_wall = rng.uniform(3.0, 4.5)
    ceiling_y = rng.uniform(0.0, 0.15) * h
    horizon = rng.uniform(0.55, 0.75) * h
    wall = (c.yy >= ceiling_y) & (c.yy < horizon)
    ceiling = c.yy < ceiling_y
    floor = c.yy >= horizon
    x_rel = c.xx / w - 0.5
    c.paint(wall, 1, _unit([0.0, 0.0, 1.0]), d_wall + 0.3 * x_rel)
    c.paint(ceiling, 22, _unit([0.0, 1.0, 0.2]), d_wall - (ceiling_y - c.yy) / max(ceiling_y, 1.0) * 0.8)
    c.paint(floor, 2, _unit([0.0, -1.0, 0.2]), d_wall - (c.yy - horizon) / max(h - horizon, 1.0) * (d_wall - 1.0))
    seg[wall], seg[ceiling], seg[floor] = 1, 22, 2
    for cls in rng.choice(NYUD_WALL_OBJECTS, size=1):
        bh, bw = rng.uniform(0.12, 0.25) * h, rng.uniform(0.12, 0.25) * w
        y0, x0 = rng.uniform(ceiling_y, max(horizon - bh, ceiling_y + 1)), rng.uniform(0, w - bw)
        mask = c.rect(y0, x0, y0 + bh, x0 + bw) & wall
        c.paint(mask, int(cls), _unit([0.0, 0.0, 1.0]), d_wall - 0.05 + 0.3 * x_rel)
        seg[mask] = int(cls)
    for cls in rng.choice(NYUD_FLOOR_OBJECTS, size=int(rng.integers(1, 3)), replace=False):
        bh, bw = rng.uniform(0.2, 0.4) * h, rng.uniform(0.15, 0.35) * w
        y1 = rng.uniform(horizon + 0.05 * h, h)
        x0 = rng.uniform(0, w - bw)
        d = rng.uniform(1.2, d_wall - 0.6)
        if rng.random() < 0.5:
            mask, n = c.rect(y1 - bh, x0, y1, x0 + bw), c.tilted_plane()
            depth = d + 0.2 * (c.xx - x0) / bw * n[0]
        else:
            r = 0.5 * min(bh, bw)
            mask, n = c.disc(y1 - r, x0 + bw / 2, r)
            depth = d - 0.2 * n[:, :, 2]
        c.paint(mask, int(cls), n, depth)
        seg[mask] = int(cls)
    # an unlabelled patch (class 0) and, elsewhere, a patch without depth (0), like the holes of the real data
    uy, ux = rng.uniform(0, 0.85 * h), rng.uniform(0, 0.85 * w)
    seg[c.rect(uy, ux, uy + 0.1 * h, ux + 0.1 * w)] = 0
    dy, dx = rng.uniform(0, 0.9 * h), rng.uniform(0, 0.9 * w)
    hole = c.rect(dy, dx, dy + 0.08 * h, dx + 0.06 * w)
    shade = np.clip(1.2 - 0.08 * c.depth, 0.6, 1.2)
    c.image *= shade[:, :, None]
    depth = c.depth.astype(np.float32)
    depth[hole] = 0.0
    return {"image": _finish_image(c), "semseg": seg, "depth": depth, "normals": _encode_normals(c.normals)}


# ---- writing ------------------------------------------------------------------------------------------------------
def _write_png(path: Path, arr: np.ndarray, palette: np.ndarray | None = None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if palette is not None:  # a palette PNG whose indices are the values, like the VOC label files
        im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
        im.putpalette(palette.astype(np.uint8).ravel().tolist())
        im.save(path)
    else:
        Image.fromarray(arr).save(path)


def _write_jpg(path: Path, rgb: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:  # pragma: no cover - OpenCV always encodes a valid uint8 RGB array
        raise RuntimeError(f"OpenCV could not encode {path}")
    path.write_bytes(buf.tobytes())


def _savemat(path: Path, data: dict[str, Any]) -> None:
    from invpt.lazy import require

    sio = require("scipy.io", "train", "writing .mat label files")
    path.parent.mkdir(parents=True, exist_ok=True)
    sio.savemat(str(path), data, do_compression=True)


def _split_ids(dataset: str, n: int, offset: int) -> list[str]:
    if dataset == "pascal_context":
        return [f"{2008 + (offset + k) % 4}_{offset + k + 1:06d}" for k in range(n)]
    return [f"{offset + k + 1:06d}" for k in range(n)]


def _pascal_sample(root: Path, sid: str, k: int, size: tuple[int, int], rng: np.random.Generator) -> list[int]:
    """Write one PASCAL sample; returns the PASCAL-Part object categories it holds (for ``ImageSets/Parts``)."""
    from invpt.data.visualize import voc_palette

    H, W = size
    h = int(rng.integers(max(MIN_SIDE, int(round(0.78 * H))), H + 1))
    w = int(rng.integers(max(MIN_SIDE, int(round(0.78 * W))), W + 1))
    scene = _pascal_scene(h, w, rng, with_person=(k % 4 != 3))
    _write_jpg(root / "JPEGImages" / f"{sid}.jpg", scene["image"])
    _savemat(root / "pascal-context" / "trainval" / f"{sid}.mat", {"LabelMap": scene["labelmap"]})
    if k % 4 == 2:  # exercise the fallback location
        _write_png(root / "semseg" / "pascal-context" / f"{sid}.png", scene["semseg"])
    else:
        _write_png(root / "semseg" / "VOC12" / f"{sid}.png", scene["semseg"], palette=voc_palette())
    _savemat(root / "human_parts" / f"{sid}.mat", {"anno": _anno_struct(sid, scene["objects"])})
    _write_png(root / "normals_distill" / f"{sid}.png", scene["normals"])
    _write_png(root / "sal_distill" / f"{sid}.png", scene["sal"])
    return sorted({int(o["class_ind"]) for o in scene["objects"]})


def _nyud_sample(root: Path, sid: str, k: int, size: tuple[int, int], rng: np.random.Generator) -> None:
    """Write one NYUD sample."""
    from invpt.data.labels import edges_from_labelmap

    scene = _nyud_scene(size[0], size[1], rng)
    _write_png(root / "images" / f"{sid}.png", scene["image"])
    _write_png(root / "segmentation" / f"{sid}.png", scene["semseg"])
    (root / "depth").mkdir(parents=True, exist_ok=True)
    np.save(root / "depth" / f"{sid}.npy", scene["depth"])
    _write_png(root / "normals" / f"{sid}.png", scene["normals"])
    edge = (edges_from_labelmap(scene["semseg"]) * 255).astype(np.uint8)
    _write_png(root / "edge" / f"{sid}.png", edge)


def make_synthetic(
    dataset: str,
    out_root: str | Path,
    n_train: int = 8,
    n_val: int = 4,
    size: Sequence[int] | None = None,
    seed: int = 0,
) -> Path:
    """Write a synthetic ``dataset`` (``pascal_context`` / ``nyud_v2``) under ``out_root`` and return its directory.

    Args:
        dataset: which official layout to write.
        out_root: the parent directory (the official ``db_root``); the dataset goes to ``out_root/PASCALContext`` or
            ``out_root/NYUDv2``, which must not exist or be empty.
        n_train, n_val: number of samples in ``train.txt`` and ``val.txt`` (at least 1 each).
        size: the model input size ``(H, W)`` the data is for (default 128x128 for PASCAL, 128x192 for NYUD).
            PASCAL images are 78-100% of it per side, NYUD images exactly it.
        seed: the seed of every random choice (same seed, same files).

    Raises:
        ConfigError: unknown dataset, counts below 1 or a side below 32.
        InputError: the target directory exists and is not empty, or ``out_root`` is a file.
        DependencyError: scipy / scikit-image (``train`` extra) are missing.
    """
    if dataset not in DIR_NAMES:
        raise ConfigError(f"Unknown dataset {dataset!r} for synthetic data; use one of {', '.join(DIR_NAMES)}.")
    if int(n_train) < 1 or int(n_val) < 1:
        raise ConfigError(f"Synthetic data needs at least 1 train and 1 val sample, got {n_train} and {n_val}.")
    hw = DEFAULT_SIZES[dataset] if size is None else tuple(int(v) for v in size)
    if len(hw) != 2 or min(hw) < MIN_SIDE or max(hw) > MAX_SIDE:
        raise ConfigError(f"Synthetic image size must be (H, W) with both sides in {MIN_SIDE}..{MAX_SIDE}, got {size!r}.")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"--seed must be an integer >= 0 (NumPy seeds are non-negative), got {seed!r}.")
    out_root = Path(out_root)
    if out_root.exists() and not out_root.is_dir():
        raise InputError(f"--out '{out_root}' is a file; pass a directory (it will hold {DIR_NAMES[dataset]}/).")
    target = out_root / DIR_NAMES[dataset]
    if os.path.lexists(target) and not target.is_dir():
        raise InputError(f"'{target}' exists and is not a folder; invpt-synth-data writes the dataset folder there and "
                         "never replaces a file. Move it away, or choose another --out.")
    if target.exists() and any(target.iterdir()):
        raise InputError(
            f"'{target}' already exists and is not empty; invpt-synth-data never writes into existing data. Choose "
            "another --out, or delete that directory yourself if it is an old synthetic dataset."
        )
    from invpt.artifacts import staging_dir
    from invpt.paths import check_output_dir, is_within, nearest_existing

    check_output_dir(out_root, "--out", "Choose a writable folder for the synthetic dataset.")
    existing = nearest_existing(out_root)  # folders below it that the run creates are removed again if it fails
    try:
        # A locked staging folder beside the target (.NAME.staging.XXXX): the stale ones of killed runs are removed
        # when the next run starts, and a run that fails or is interrupted removes its own.
        with staging_dir(target, InputError, redirect_tmp=False) as staging:
            stage = staging / "data"
            _write_dataset(stage, dataset, int(n_train), int(n_val), hw, int(seed))
            if target.is_dir():
                target.rmdir()  # empty (checked above)
            os.replace(stage, target)
    except BaseException:
        folder = out_root.absolute()
        while folder != existing and is_within(folder, existing):
            try:
                folder.rmdir()  # only if empty
            except OSError:
                break
            folder = folder.parent
        raise
    return target


def _write_dataset(stage: Path, dataset: str, n_train: int, n_val: int, hw: tuple[int, ...], seed: int) -> None:
    """Write the whole dataset into the new folder ``stage`` (split files, images and labels)."""
    stage.mkdir()
    split_dir = stage / ("ImageSets/Context" if dataset == "pascal_context" else "gt_sets")
    split_dir.mkdir(parents=True)
    writer = _pascal_sample if dataset == "pascal_context" else _nyud_sample
    splits = {"train": _split_ids(dataset, n_train, 0), "val": _split_ids(dataset, n_val, n_train)}
    k = 0
    from tqdm import tqdm

    with tqdm(total=n_train + n_val, desc=f"synth {dataset}", unit="img", leave=False,
              disable=None) as bar:
        for name, ids in splits.items():
            categories: dict[str, Any] = {}
            for sid in ids:
                categories[sid] = writer(stage, sid, k, hw, np.random.default_rng([seed, k]))
                k += 1
                bar.update(1)
            (split_dir / f"{name}.txt").write_text("".join(f"{sid}\n" for sid in ids), encoding="utf-8")
            if dataset == "pascal_context":  # upstream's object list per image (JSON despite the name)
                parts_dir = stage / "ImageSets" / "Parts"
                parts_dir.mkdir(parents=True, exist_ok=True)
                (parts_dir / f"{name}.txt").write_text(json.dumps(categories, indent=1) + "\n", encoding="utf-8")


# ---- CLI ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthOptions:
    """What ``invpt-synth-data`` was asked to write."""

    dataset: str
    out: Path
    n_train: int
    n_val: int
    size: Optional[tuple[int, int]]
    seed: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SynthOptions":
        return cls(args.dataset, Path(args.out), args.train, args.val,
                   tuple(args.size) if args.size is not None else None, args.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="invpt-synth-data",
        description="Write a small synthetic dataset in the official PASCAL-Context or NYUD-v2 layout (images, every "
        "task's labels, train/val split files), for trying invpt-train and invpt-eval without the real data. The "
        "labels of all tasks come from one drawn scene per image, so they agree with each other.",
        epilog="example:\n  invpt-synth-data --dataset pascal_context --out data/synth --train 16 --val 8\n"
        "  (writes data/synth/PASCALContext; pass data/synth or data/synth/PASCALContext as the dataset root)\n\n"
        "The dataset directory is staged beside its final place and renamed in at the end; an existing non-empty\n"
        "<out>/PASCALContext or <out>/NYUDv2 is refused.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("Data")
    g.add_argument("--dataset", required=True, choices=sorted(DIR_NAMES),
                   help="layout to write: pascal_context (5 tasks) or nyud_v2 (4 tasks)")
    g.add_argument("--out", required=True,
                   help="parent directory (db_root); the data goes to OUT/PASCALContext or OUT/NYUDv2")
    g.add_argument("--train", type=int, default=8, help="number of training samples (default 8)")
    g.add_argument("--val", type=int, default=4, help="number of validation samples (default 4)")
    g.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="model input size the data is for (default 128 128 for pascal_context, 128 192 for nyud_v2; "
                   "use the image_size of the config you train, multiples of 64). PASCAL images are 78-100%% of it "
                   "per side and get padded, NYUD images are exactly it")
    g.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files (default 0)")
    add_logging_args(p)
    return p


def _run(args: argparse.Namespace) -> int:
    opts = SynthOptions.from_args(args)
    path = make_synthetic(opts.dataset, opts.out, opts.n_train, opts.n_val, opts.size, opts.seed)
    _logger.info("synth ok -> %s (%d train, %d val, %s)", path, opts.n_train, opts.n_val, opts.dataset)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``invpt-synth-data``; returns the exit code (0 ok, 2 bad input)."""
    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
