"""The official InvPT input pipeline, shared by inference, export verification and calibration.

Spec §10: the image is normalised first (``/255`` then ImageNet mean/std) and only then brought to the
network's fixed input size, either by a centred zero pad that never crops (the evaluation pipeline, ``pad``) or
by a bilinear resize that ignores the aspect ratio (the official ``inference.py``, ``resize``). Zero fill after
normalisation equals the mean colour. :class:`PadInfo` records the geometry so that outputs can be mapped back
to the original image with :func:`restore_geometry` (float maps) or :func:`restore_labels` (integer maps).
"""
from __future__ import annotations

import logging
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

GeometryMode = Literal["pad", "resize"]


@dataclass(frozen=True)
class PadInfo:
    """How one image was brought to the network input size, so outputs can be mapped back.

    Attributes:
        mode: ``'pad'`` (centred zero pad, no scaling) or ``'resize'`` (bilinear, aspect ratio not kept).
        original_hw: the image size before pre-processing.
        size_hw: the network input size (the padded canvas or the resize target).
        top: rows of padding above the image content (0 for ``'resize'``).
        left: columns of padding left of the image content (0 for ``'resize'``).
        resized_hw: the size of the image content inside the canvas (``original_hw`` for ``'pad'``,
            ``size_hw`` for ``'resize'``).
    """

    mode: GeometryMode
    original_hw: tuple[int, int]
    size_hw: tuple[int, int]
    top: int
    left: int
    resized_hw: tuple[int, int]


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as an ``HxWx3`` uint8 **RGB** array.

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
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
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
    if img.dtype != np.uint8:
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
                "Use 'resize' preprocessing, which rescales to the input size without keeping the aspect ratio "
                "(invpt-infer --mode resize; for an exported model, re-export it with invpt-export --preprocess "
                f"resize), use a model whose config has a larger image_size (at least {max(h, H)}x{max(w, W)}), or "
                "downscale the image first."
            )
        raise InputError(
            f"{name} is {h}x{w} (HxW), larger than the model input size {H}x{W}; 'pad' mode pads to the input "
            f"size and never crops. {fix}"
        )
    top, left = (H - h) // 2, (W - w) // 2
    canvas = np.zeros((H, W) + tuple(img.shape[2:]), dtype=img.dtype)
    canvas[top : top + h, left : left + w] = img
    return canvas, PadInfo("pad", (h, w), (H, W), top, left, (h, w))


def content_fraction_for(image_hw: Sequence[int], size_hw: Sequence[int], mode: GeometryMode) -> float:
    """Fraction (0..1) of the network input that image content of size ``image_hw`` covers after pre-processing.

    ``'resize'`` stretches every image over the whole input (1.0). ``'pad'`` centres the image unscaled in a zero
    canvas, so the rest is padding: ``h*w / (H*W)``, capped at 1 (an image larger than the input is refused by
    :func:`pad_to`). A 1x1 image in a 64x64 input covers 1/4096 of it.

    Raises:
        ConfigError: unknown ``mode`` or invalid sizes.
    """
    H, W = _check_hw(size_hw)
    h, w = _check_hw(image_hw, "image_hw")
    if mode == "resize":
        return 1.0
    if mode != "pad":
        raise ConfigError(f"Unknown pre-processing mode {mode!r}; use 'pad' (official evaluation) or 'resize'.")
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

    Official order: normalise, then pad (``mode='pad'``, the evaluation pipeline) or resize
    (``mode='resize'``, ``inference.py``), then HWC to CHW. Add the batch axis with ``x[None]``.

    Args:
        img: ``HxWx3`` uint8 RGB, as returned by :func:`read_image`.
        size_hw: the network input size ``(H, W)``.
        mode: ``'pad'`` or ``'resize'``.
        mean, std: normalisation constants (ImageNet by default, as in the official configs).
        source: optional file name used in error messages.
        fix: advice ending the error for an image larger than ``size_hw`` in ``'pad'`` mode (see :func:`pad_to`).

    Raises:
        ConfigError: unknown ``mode`` or invalid ``size_hw``.
        InputError: bad image array, or an image larger than ``size_hw`` in ``'pad'`` mode.
    """
    if mode not in ("pad", "resize"):
        raise ConfigError(f"Unknown pre-processing mode {mode!r}; use 'pad' (official evaluation) or 'resize'.")
    x = normalize(img, mean, std)
    x, info = pad_to(x, size_hw, source=source, fix=fix) if mode == "pad" else resize_to(x, size_hw)
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
    """Cut the original image region out of a padded ``[..., H, W]`` map."""
    h, w = info.original_hw
    return np.ascontiguousarray(arr[..., info.top : info.top + h, info.left : info.left + w])


def restore_geometry(arr: np.ndarray, info: PadInfo) -> np.ndarray:
    """Map a **float** output map (``[C,H,W]`` or ``[H,W]`` at the network size) back to the original image size.

    ``'pad'``: crop the image region back out of the canvas. ``'resize'``: bilinear resize back per channel
    (``cv2.INTER_LINEAR``), as the official ``inference.py`` does *before* decoding. Use it on raw outputs
    (logits, probabilities, depth, normals); for label tasks restore the logits and then take the argmax, or use
    :func:`restore_labels` on already decoded integer maps.

    Raises:
        ConfigError: the map's spatial size is not ``info.size_hw``.
    """
    _check_output_size(arr, info)
    h, w = info.original_hw
    if info.mode == "pad":
        return _crop_padding(arr, info)
    src = arr if np.issubdtype(arr.dtype, np.floating) and arr.dtype != np.float16 else arr.astype(np.float32)
    if src.ndim == 2:
        return cv2.resize(src, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.stack([cv2.resize(ch, (w, h), interpolation=cv2.INTER_LINEAR) for ch in src], axis=0)


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Source index for each output index with half-pixel centres (PIL / ``INTER_NEAREST_EXACT`` convention)."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.clip(idx, 0, n_in - 1)


def restore_labels(labels: np.ndarray, info: PadInfo) -> np.ndarray:
    """Map an **integer** map (``[H,W]`` or ``[C,H,W]`` at the network size) back to the original size.

    ``'pad'`` crops; ``'resize'`` uses nearest-neighbour sampling (half-pixel centres), which never invents
    class ids. Works for any dtype (uint8, int64, bool). Prefer resizing logits with :func:`restore_geometry`
    and decoding afterwards when the raw outputs are available; that is what the official ``inference.py`` does.

    Raises:
        ConfigError: the map's spatial size is not ``info.size_hw``.
    """
    _check_output_size(labels, info)
    h, w = info.original_hw
    if info.mode == "pad":
        return _crop_padding(labels, info)
    H, W = info.size_hw
    rows, cols = _nearest_index(h, H), _nearest_index(w, W)
    return np.ascontiguousarray(labels[..., rows[:, None], cols[None, :]])
