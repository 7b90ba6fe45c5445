"""Colourised visuals of decoded task maps, all as ``HxWx3`` uint8 **RGB**.

Label maps use the PASCAL VOC bit-shuffle palette; saliency and boundary probabilities are grey (white = 1);
depth uses the TURBO colormap normalised per image (the range in metres is returned and written on the tile);
normals use the usual ``(n + 1) / 2 * 255`` RGB encoding. :func:`overview` puts the input and every task side by
side with titles, and :func:`save_png` writes atomically.
"""
from __future__ import annotations

import logging
import math
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import cv2
import numpy as np

from invpt.atomic import write_atomic
from invpt.data.decode import normals_to_uint8, probability_to_uint8
from invpt.errors import ConfigError, InputError
from invpt.tasks import TaskSpec

logger = logging.getLogger(__name__)

#: Colour of labels outside ``[0, num_classes)`` (e.g. the 255 "ignore" label): VOC palette entry 255.
IGNORE_LABEL = 255


@lru_cache(maxsize=None)
def _voc_palette() -> np.ndarray:
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    pal.setflags(write=False)
    return pal


def voc_palette() -> np.ndarray:
    """The 256-entry PASCAL VOC colour palette (``[256, 3]`` uint8 RGB, a fresh copy).

    Built by spreading the bits of the class id over R, G and B (most significant first), so it is
    deterministic, starts with black for class 0 (background) and has 256 distinct colours.
    """
    return _voc_palette().copy()


def colorize_labels(labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Colour an ``[H, W]`` integer label map with the VOC palette.

    Labels outside ``[0, num_classes)`` (for example the 255 ignore label) get palette entry 255, the VOC
    "void" colour. With ``num_classes=None`` every value in ``0..255`` keeps its own colour.
    """
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise InputError(f"colorize_labels() expects an [H, W] label map, got shape {lab.shape}.")
    n = 256 if num_classes is None else min(int(num_classes), 256)
    idx = lab.astype(np.int64)
    idx = np.where((idx < 0) | (idx >= n), IGNORE_LABEL, idx)
    return _voc_palette()[idx]


def colorize_probability(prob: np.ndarray) -> np.ndarray:
    """Grey visual of an ``[H, W]`` probability map in ``[0, 1]`` (white = 1), used for saliency and boundary."""
    p = np.asarray(prob)
    if p.ndim != 2:
        raise InputError(f"colorize_probability() expects an [H, W] map, got shape {p.shape}.")
    grey = probability_to_uint8(np.nan_to_num(p, nan=0.0))
    return np.repeat(grey[:, :, None], 3, axis=2)


def colorize_depth(
    depth: np.ndarray,
    vmin: float | None = None,
    vmax: float | None = None,
    colormap: int = cv2.COLORMAP_TURBO,
) -> tuple[np.ndarray, tuple[float, float]]:
    """Colour an ``[H, W]`` depth map (metres) with a cv2 colormap, normalised per image.

    Args:
        depth: depth in metres.
        vmin, vmax: fixed range; by default the finite min/max of this image (so colours are not comparable
            across images; pass a fixed range for videos).
        colormap: a ``cv2.COLORMAP_*`` constant.

    Returns:
        ``(rgb, (vmin, vmax))``: the visual and the range in metres it spans. Non-finite pixels are black.
    """
    d = np.asarray(depth, dtype=np.float32)
    if d.ndim != 2:
        raise InputError(f"colorize_depth() expects an [H, W] depth map, got shape {d.shape}.")
    finite = np.isfinite(d)
    lo = float(vmin) if vmin is not None else (float(d[finite].min()) if finite.any() else 0.0)
    hi = float(vmax) if vmax is not None else (float(d[finite].max()) if finite.any() else 0.0)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    u8 = np.clip(np.rint((np.where(finite, d, lo) - lo) * scale), 0, 255).astype(np.uint8)
    rgb = cv2.cvtColor(cv2.applyColorMap(u8, colormap), cv2.COLOR_BGR2RGB)
    rgb[~finite] = 0
    return rgb, (lo, hi)


def colorize_normals(normals: np.ndarray) -> np.ndarray:
    """RGB visual of ``[3, H, W]`` unit normals: ``(n + 1) / 2 * 255`` with x, y, z as R, G, B."""
    n = np.asarray(normals)
    if n.ndim != 3 or n.shape[0] != 3:
        raise InputError(f"colorize_normals() expects [3, H, W] normals, got shape {n.shape}.")
    return np.ascontiguousarray(normals_to_uint8(n).transpose(1, 2, 0))


def _put_label(img: np.ndarray, text: str, corner: str = "top") -> None:
    """Write ``text`` on ``img`` in place, white on a dark box, scaled to the image width."""
    h, w = img.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max(0.3, min(1.0, w / 400.0))
    thick = 1 if scale < 0.7 else 2
    (tw, th), base = cv2.getTextSize(text, font, scale, thick)
    pad = max(2, int(4 * scale))
    y0 = 0 if corner == "top" else max(0, h - th - base - 2 * pad)
    x1, y1 = min(w, tw + 2 * pad), min(h, y0 + th + base + 2 * pad)
    img[y0:y1, 0:x1] = (img[y0:y1, 0:x1].astype(np.uint16) // 4).astype(np.uint8)
    cv2.putText(img, text, (pad, y0 + pad + th), font, scale, (255, 255, 255), thick, cv2.LINE_AA)


def visualize(task: TaskSpec, decoded: np.ndarray, *, annotate: bool = True) -> np.ndarray:
    """Colour one image's decoded map of ``task`` (as returned by :func:`invpt.data.decode.decode`).

    Dispatches on ``task.kind``. With ``annotate`` the depth tile gets its metre range written at the bottom.

    Raises:
        InputError: the map does not have the shape the task kind decodes to (e.g. a batch was passed).
        ConfigError: unknown task kind.
    """
    kind = task.kind
    if kind == "label":
        return colorize_labels(decoded, task.channels)
    if kind in ("saliency", "boundary"):
        return colorize_probability(decoded)
    if kind == "normals":
        return colorize_normals(decoded)
    if kind == "depth":
        rgb, (lo, hi) = colorize_depth(decoded)
        if annotate:
            _put_label(rgb, f"{lo:.2f}-{hi:.2f} m", corner="bottom")
        return rgb
    raise ConfigError(f"Task '{task.name}' has unknown kind '{kind}'; cannot visualise it.")


def overview(
    image_rgb: np.ndarray,
    visuals: Mapping[str, np.ndarray],
    titles: bool = True,
    *,
    columns: int | None = None,
    gap: int = 4,
) -> np.ndarray:
    """Tile the input image and each task visual into one grid image (uint8 RGB), input first.

    Every tile is brought to the input image's size (nearest neighbour, so labels stay crisp) and, with
    ``titles``, labelled with its name ("input", then the keys of ``visuals``). By default up to 3 tiles go in
    one row, more are split over two rows (PASCAL: 3x2, NYUD: 3x2).
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise InputError(f"overview() expects an HxWx3 input image, got shape {image_rgb.shape}.")
    h, w = image_rgb.shape[:2]
    tiles: list[tuple[str, np.ndarray]] = [("input", image_rgb)] + list(visuals.items())
    n = len(tiles)
    cols = columns if columns is not None else (n if n <= 3 else math.ceil(n / 2))
    cols = max(1, min(int(cols), n))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, dtype=np.uint8)
    for k, (name, tile) in enumerate(tiles):
        t = np.asarray(tile)
        if t.ndim == 2:
            t = np.repeat(t[:, :, None], 3, axis=2)
        if t.ndim != 3 or t.shape[2] != 3:
            raise InputError(f"overview(): visual '{name}' must be HxWx3 (or HxW), got shape {t.shape}.")
        t = t.astype(np.uint8, copy=False)
        if t.shape[:2] != (h, w):
            t = cv2.resize(t, (w, h), interpolation=cv2.INTER_NEAREST)
        else:
            t = t.copy()
        if titles:
            _put_label(t, name)
        r, c = divmod(k, cols)
        y, x = r * (h + gap), c * (w + gap)
        canvas[y : y + h, x : x + w] = t
    return canvas


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an ``HxWx3`` uint8 RGB (or ``HxW`` grey) image as PNG, atomically.

    The PNG is encoded in memory, written to a temporary file in the destination directory and moved into place
    with ``os.replace``, so readers never see a half-written file. Parent directories are created.

    Raises:
        InputError: the array is not an image, or the directory cannot be created or written.
    """
    p = Path(path)
    img = np.asarray(rgb)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise InputError(
            f"save_png('{p}') needs an HxWx3 or HxW uint8 image, got shape {img.shape} dtype {img.dtype}."
        )
    ok, buf = cv2.imencode(".png", img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if not ok:
        raise InputError(f"OpenCV could not encode the image for '{p}' as PNG (shape {img.shape}).")
    write_atomic(p, lambda f: f.write(buf.tobytes()), "PNG", InputError)  # umask's mode, never half-written
    logger.debug("wrote %s (%dx%d)", p, img.shape[1], img.shape[0])
    return p
