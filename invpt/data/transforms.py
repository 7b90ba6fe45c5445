"""The official InvPT input pipeline, shared by inference, export verification and calibration.

Spec §10: the image is normalised first (``/255`` then ImageNet mean/std) and only then brought to the
network's fixed input size, by one of three geometry modes:

- ``pad``: a centred zero pad that never crops and never scales (the official evaluation pipeline); an image
  larger than the input is refused.
- ``resize``: a bilinear resize to the input size that ignores the aspect ratio (the official ``inference.py``).
- ``letterbox``: ``pad`` for images that fit; a larger image is first scaled down (``INTER_AREA``, by
  ``min(H/h, W/w)``, aspect ratio kept, never upscaled) and then padded like ``pad``. So it accepts any image and
  equals ``pad`` exactly wherever ``pad`` works.

Zero fill after normalisation equals the mean colour (the official pad value). :class:`PadInfo` records the
geometry so that outputs can be mapped back to the original image with :func:`restore_geometry` (float maps:
logits, probabilities, depth, normals; bilinear) or :func:`restore_labels` (integer maps; nearest).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import cv2
import numpy as np

from invpt.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: File extensions :func:`read_image` is documented to accept (anything OpenCV decodes works).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp")

GeometryMode = Literal["pad", "resize", "letterbox"]

#: Every geometry mode :func:`preprocess` accepts.
GEOMETRY_MODES: tuple[str, ...] = ("pad", "resize", "letterbox")


@dataclass(frozen=True)
class PadInfo:
    """How one image was brought to the network input size, so outputs can be mapped back.

    Attributes:
        mode: ``'pad'`` (centred zero pad, no scaling), ``'resize'`` (bilinear, aspect ratio not kept) or
            ``'letterbox'`` (scaled down to fit if needed, aspect ratio kept, then centred zero pad).
        original_hw: the image size before pre-processing.
        size_hw: the network input size (the padded canvas or the resize target).
        top: rows of padding above the image content (0 for ``'resize'``).
        left: columns of padding left of the image content (0 for ``'resize'``).
        resized_hw: the size of the image content inside the canvas (``original_hw`` for ``'pad'`` and for a
            ``'letterbox'`` image that fit, ``size_hw`` for ``'resize'``).
        scale: the factor the image content was scaled by: ``min(H/h, W/w, 1)`` for ``'letterbox'`` (1.0 when
            the image fit), 1.0 for ``'pad'``; for ``'resize'`` the two axes differ, see ``resized_hw`` and
            ``original_hw`` (recorded as 1.0).
    """

    mode: GeometryMode
    original_hw: tuple[int, int]
    size_hw: tuple[int, int]
    top: int
    left: int
    resized_hw: tuple[int, int]
    scale: float = 1.0

    @property
    def scaled(self) -> bool:
        """Whether the image content was rescaled (``'resize'`` to another size, or a ``'letterbox'`` downscale)."""
        return tuple(self.resized_hw) != tuple(self.original_hw)


def read_image(path: str | Path, exif_orientation: bool = True) -> np.ndarray:
    """Read an image file as an ``HxWx3`` uint8 **RGB** array.

    ``exif_orientation``: rotate a JPEG as its EXIF orientation says (what a photo viewer shows, right for a
    user's photos). The official dataset readers pass False: upstream decodes with PIL, which ignores the EXIF
    orientation, and the label maps are aligned with the stored pixels.

    OpenCV decodes to BGR, so the channels are swapped here once; everything downstream assumes RGB as the
    official pipeline does (PIL). Grey images are expanded to 3 channels, an alpha channel is dropped and 16-bit
    images are reduced to 8 bit. The file is read through Python and decoded in memory, which also works for
    non-ASCII paths.

    Raises:
        InputError: the file is missing, is a directory, cannot be read, or is not a decodable image.
    """
    p = Path(path)
    accepted = ", ".join(IMAGE_EXTENSIONS)
    if not p.is_file():
        what = "is a directory, not an image file" if p.is_dir() else "does not exist"
        raise InputError(
            f"Image '{p}' {what}. Pass the path of an existing image file ({accepted}; any format OpenCV can "
            "decode also works)."
        )
    try:
        data = np.fromfile(str(p), dtype=np.uint8)
    except OSError as err:
        raise InputError(
            f"Image '{p}' could not be read ({err}). Check the file permissions and that the disk is readable."
        ) from err
    flags = cv2.IMREAD_COLOR if exif_orientation else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(data, flags) if data.size else None
    if bgr is None:
        raise InputError(
            f"Image '{p}' ({data.size} bytes) could not be decoded as an image. Accepted formats are {accepted} "
            "(and other formats OpenCV can decode); re-save the file in one of them or check it is not truncated."
        )
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def _check_hw(size_hw: Sequence[int], what: str = "size_hw") -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size_hw)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a pair (height, width) of positive integers, got {size_hw!r}.") from None
    if h <= 0 or w <= 0:
        raise ConfigError(f"{what} must be a pair (height, width) of positive integers, got {size_hw!r}.")
    return h, w


def _check_mode(mode: object) -> None:
    if mode not in GEOMETRY_MODES:
        raise ConfigError(
            f"Unknown pre-processing mode {mode!r}; use 'pad' (official evaluation: centred zero pad, images must "
            "fit), 'resize' (official inference.py: stretch to the input size) or 'letterbox' (scale down to fit "
            "keeping the aspect ratio, then pad like 'pad')."
        )


def _check_rgb(img: np.ndarray, what: str) -> None:
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        shape = getattr(img, "shape", type(img).__name__)
        raise InputError(
            f"{what} must be an HxWx3 RGB image array, got shape {shape}. Load images with "
            "invpt.data.read_image, which returns HxWx3 uint8 RGB."
        )


def normalize(
    img: np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """Normalise an ``HxWx3`` uint8 RGB image to float32: ``/255`` then ``(x - mean) / std`` per channel.

    This is the first step of the official pipeline; padding happens afterwards so that pad pixels are 0, i.e.
    the mean colour.

    Raises:
        InputError: the array is not ``HxWx3``.
    """
    _check_rgb(img, "normalize() input")
    if img.dtype not in (np.uint8, np.float32):  # float32 0..255 is what the training transforms pass
        logger.debug("normalize() got dtype %s; treating values as 0..255", img.dtype)
    m = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3)
    s = np.asarray(std, dtype=np.float32).reshape(1, 1, 3)
    out = img.astype(np.float32) / np.float32(255.0)
    out -= m
    out /= s
    return out


def pad_to(
    img: np.ndarray,
    size_hw: Sequence[int],
    *,
    source: str | Path | None = None,
    fix: str | None = None,
) -> tuple[np.ndarray, PadInfo]:
    """Centre an ``HxWxC`` (or ``HxW``) float image in a zero canvas of ``size_hw`` (official ``PadImage``).

    The offsets are ``top = (H - h) // 2`` and ``left = (W - w) // 2``, so an odd remainder goes to the
    bottom/right. Padding never crops.

    Args:
        img: the normalised image.
        size_hw: the network input size ``(H, W)``.
        source: optional file name used in the error message.
        fix: the advice that ends the too-large error, for callers that know which command and flag the user
            can change (e.g. ``invpt-quantize``, where the geometry comes from the model's manifest). By default the
            message names the options of ``invpt-infer`` and ``invpt-export``.

    Raises:
        InputError: the image is larger than ``size_hw`` in either dimension.
    """
    H, W = _check_hw(size_hw)
    h, w = int(img.shape[0]), int(img.shape[1])
    if h > H or w > W:
        name = f"Image '{source}'" if source is not None else "The image"
        if fix is None:
            fix = (
                "Use 'letterbox' preprocessing, which scales such an image down to fit keeping its aspect ratio and "
                "pads it like 'pad' (invpt-infer --mode letterbox; for an exported model, re-export it with "
                "invpt-export --preprocess letterbox), or 'resize', which stretches every image to the input size "
                "(invpt-infer --mode resize; invpt-export --preprocess resize), use a model whose config has a larger "
                f"image_size (at least {max(h, H)}x{max(w, W)}), or downscale the image first."
            )
        raise InputError(
            f"{name} is {h}x{w} (HxW), larger than the model input size {H}x{W}; 'pad' mode pads to the input "
            f"size and never crops. {fix}"
        )
    top, left = (H - h) // 2, (W - w) // 2
    canvas = np.zeros((H, W) + tuple(img.shape[2:]), dtype=img.dtype)
    canvas[top : top + h, left : left + w] = img
    return canvas, PadInfo("pad", (h, w), (H, W), top, left, (h, w))


def letterbox_hw(image_hw: Sequence[int], size_hw: Sequence[int]) -> tuple[tuple[int, int], float]:
    """Content size and scale of an ``image_hw`` image letterboxed into ``size_hw``: ``((rh, rw), scale)``.

    ``scale = min(H/h, W/w, 1)`` (never upscales); ``rh, rw`` are ``h*scale, w*scale`` rounded half up, at least 1
    and at most the input size. An image that fits keeps its size (``scale == 1``).

    Raises:
        ConfigError: invalid sizes.
    """
    H, W = _check_hw(size_hw)
    h, w = _check_hw(image_hw, "image_hw")
    scale = min(H / h, W / w, 1.0)
    if scale >= 1.0:
        return (h, w), 1.0
    rh = min(H, max(1, int(math.floor(h * scale + 0.5))))
    rw = min(W, max(1, int(math.floor(w * scale + 0.5))))
    return (rh, rw), scale


def content_fraction_for(image_hw: Sequence[int], size_hw: Sequence[int], mode: GeometryMode) -> float:
    """Fraction (0..1) of the network input that image content of size ``image_hw`` covers after pre-processing.

    ``'resize'`` stretches every image over the whole input (1.0). ``'pad'`` centres the image unscaled in a zero
    canvas, so the rest is padding: ``h*w / (H*W)``, capped at 1 (an image larger than the input is refused by
    :func:`pad_to`). ``'letterbox'`` is ``'pad'`` for an image that fits; a larger one covers its scaled size
    ``rh*rw / (H*W)`` (see :func:`letterbox_hw`), e.g. a 2000x500 image in a 512x512 input covers 512x128, 25%.
    A 1x1 image in a 64x64 input covers 1/4096 of it in ``'pad'`` and ``'letterbox'``.

    Raises:
        ConfigError: unknown ``mode`` or invalid sizes.
    """
    H, W = _check_hw(size_hw)
    h, w = _check_hw(image_hw, "image_hw")
    _check_mode(mode)
    if mode == "resize":
        return 1.0
    if mode == "letterbox":
        (h, w), _ = letterbox_hw((h, w), (H, W))
    return min(h, H) * min(w, W) / float(H * W)


def content_fraction(info: PadInfo) -> float:
    """Fraction (0..1) of the network input covered by real image content, from :func:`preprocess`'s ``PadInfo``.

    The rest is padding (zeros after normalisation, the mean colour). Calibration uses it to refuse data that is
    mostly padding, which would calibrate and verify an INT8 model on padding instead of images.
    """
    return content_fraction_for(info.resized_hw, info.size_hw, info.mode)


def resize_to(img: np.ndarray, size_hw: Sequence[int]) -> tuple[np.ndarray, PadInfo]:
    """Bilinearly resize a float image to ``size_hw`` without keeping the aspect ratio (official ``inference.py``).

    Uses ``cv2.resize`` with ``INTER_LINEAR`` (half-pixel centres, like ``F.interpolate(align_corners=False)``).
    """
    H, W = _check_hw(size_hw)
    h, w = int(img.shape[0]), int(img.shape[1])
    out = cv2.resize(img, (W, H), interpolation=cv2.INTER_LINEAR)
    if img.ndim == 3 and out.ndim == 2:  # cv2 drops a trailing singleton channel
        out = out[:, :, None]
    return out, PadInfo("resize", (h, w), (H, W), 0, 0, (H, W))


def letterbox_to(img: np.ndarray, size_hw: Sequence[int]) -> tuple[np.ndarray, PadInfo]:
    """Scale a float image down to fit ``size_hw`` keeping its aspect ratio, then centre it like :func:`pad_to`.

    The scale is ``min(H/h, W/w, 1)`` (see :func:`letterbox_hw`): an image that fits is not scaled, so the result
    equals :func:`pad_to`'s exactly; a larger one is downscaled with ``cv2.INTER_AREA`` (area averaging, no
    aliasing). The content is placed at ``top = (H - rh) // 2``, ``left = (W - rw) // 2`` in a zero canvas (the
    official pad value after normalisation). Never crops, never upscales, accepts any image size.
    """
    H, W = _check_hw(size_hw)
    h, w = int(img.shape[0]), int(img.shape[1])
    (rh, rw), scale = letterbox_hw((h, w), (H, W))
    if (rh, rw) != (h, w):
        src = img if img.dtype != np.float16 else img.astype(np.float32)
        scaled = cv2.resize(src, (rw, rh), interpolation=cv2.INTER_AREA).astype(img.dtype, copy=False)
        if img.ndim == 3 and scaled.ndim == 2:  # cv2 drops a trailing singleton channel
            scaled = scaled[:, :, None]
        logger.debug("letterbox: %dx%d scaled by %.4f to %dx%d in %dx%d", h, w, scale, rh, rw, H, W)
    else:
        scaled = img
    canvas, placed = pad_to(scaled, (H, W))
    return canvas, PadInfo("letterbox", (h, w), (H, W), placed.top, placed.left, (rh, rw), scale)


def preprocess(
    img: np.ndarray,
    size_hw: Sequence[int],
    mode: GeometryMode,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    source: str | Path | None = None,
    fix: str | None = None,
) -> tuple[np.ndarray, PadInfo]:
    """Turn an ``HxWx3`` uint8 RGB image into the network input ``[3, H, W]`` float32 (C-contiguous).

    Official order: normalise, then pad (``mode='pad'``, the evaluation pipeline), resize (``mode='resize'``,
    ``inference.py``) or letterbox (``mode='letterbox'``: scale down to fit if needed, then pad), then HWC to
    CHW. Add the batch axis with ``x[None]``.

    Args:
        img: ``HxWx3`` uint8 RGB, as returned by :func:`read_image`.
        size_hw: the network input size ``(H, W)``.
        mode: ``'pad'``, ``'resize'`` or ``'letterbox'``.
        mean, std: normalisation constants (ImageNet by default, as in the official configs).
        source: optional file name used in error messages.
        fix: advice ending the error for an image larger than ``size_hw`` in ``'pad'`` mode (see :func:`pad_to`).

    Raises:
        ConfigError: unknown ``mode`` or invalid ``size_hw``.
        InputError: bad image array, or an image larger than ``size_hw`` in ``'pad'`` mode.
    """
    _check_mode(mode)
    _check_hw(size_hw)
    x = normalize(img, mean, std)
    if mode == "pad":
        x, info = pad_to(x, size_hw, source=source, fix=fix)
    elif mode == "letterbox":
        x, info = letterbox_to(x, size_hw)
    else:
        x, info = resize_to(x, size_hw)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32), info


def _check_output_size(arr: np.ndarray, info: PadInfo) -> None:
    if arr.ndim not in (2, 3):
        raise ConfigError(
            f"Expected one image's output map as [C,H,W] or [H,W], got shape {arr.shape}; "
            "index the batch first (out[i])."
        )
    if tuple(arr.shape[-2:]) != tuple(info.size_hw):
        raise ConfigError(
            f"Output map is {arr.shape[-2]}x{arr.shape[-1]} but the input was pre-processed to "
            f"{info.size_hw[0]}x{info.size_hw[1]}; the model or engine was built for a different image_size "
            "than the one used for pre-processing. Use the image_size recorded in the model's manifest."
        )


def _crop_padding(arr: np.ndarray, info: PadInfo) -> np.ndarray:
    """Cut the image content region (``resized_hw`` at ``top, left``) out of a padded ``[..., H, W]`` map."""
    h, w = info.resized_hw
    return np.ascontiguousarray(arr[..., info.top : info.top + h, info.left : info.left + w])


def _bilinear_to(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (``cv2.INTER_LINEAR``, half-pixel centres) of ``[C,h,w]`` or ``[h,w]`` to ``hw``."""
    h, w = hw
    src = arr if np.issubdtype(arr.dtype, np.floating) and arr.dtype != np.float16 else arr.astype(np.float32)
    if src.ndim == 2:
        return cv2.resize(src, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.stack([cv2.resize(ch, (w, h), interpolation=cv2.INTER_LINEAR) for ch in src], axis=0)


def restore_geometry(arr: np.ndarray, info: PadInfo) -> np.ndarray:
    """Map a **float** output map (``[C,H,W]`` or ``[H,W]`` at the network size) back to the original image size.

    ``'pad'``: crop the image region back out of the canvas. ``'resize'``: bilinear resize back per channel
    (``cv2.INTER_LINEAR``), as the official ``inference.py`` does *before* decoding. ``'letterbox'``: crop the
    content region, then (if the image was scaled down) bilinear resize it back to the original size. Use it on
    raw outputs (logits, probabilities, depth, normals: normals are re-normalised by decoding afterwards); for
    label tasks restore the logits and then take the argmax, or use :func:`restore_labels` on already decoded
    integer maps.

    Raises:
        ConfigError: the map's spatial size is not ``info.size_hw``.
    """
    _check_output_size(arr, info)
    _check_mode(info.mode)
    if info.mode in ("pad", "letterbox"):
        content = _crop_padding(arr, info)
        if tuple(info.resized_hw) == tuple(info.original_hw):
            return content
        return _bilinear_to(content, tuple(info.original_hw))
    return _bilinear_to(arr, tuple(info.original_hw))


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Source index for each output index with half-pixel centres (PIL / ``INTER_NEAREST_EXACT`` convention)."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.clip(idx, 0, n_in - 1)


def restore_labels(labels: np.ndarray, info: PadInfo) -> np.ndarray:
    """Map an **integer** map (``[H,W]`` or ``[C,H,W]`` at the network size) back to the original size.

    ``'pad'`` crops; ``'resize'`` uses nearest-neighbour sampling (half-pixel centres), which never invents
    class ids; ``'letterbox'`` crops the content region and samples it back to the original size the same way.
    Works for any dtype (uint8, int64, bool). Prefer resizing logits with :func:`restore_geometry` and decoding
    afterwards when the raw outputs are available; that is what the official ``inference.py`` does.

    Raises:
        ConfigError: the map's spatial size is not ``info.size_hw``.
    """
    _check_output_size(labels, info)
    _check_mode(info.mode)
    h, w = info.original_hw
    if info.mode in ("pad", "letterbox"):
        src = _crop_padding(labels, info)
        if tuple(info.resized_hw) == (h, w):
            return src
    else:
        src = labels
    sh, sw = src.shape[-2:]
    rows, cols = _nearest_index(h, sh), _nearest_index(w, sw)
    return np.ascontiguousarray(src[..., rows[:, None], cols[None, :]])
