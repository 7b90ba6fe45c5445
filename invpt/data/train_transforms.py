"""Upstream's training and evaluation transforms (spec §10) on multi-task samples, with explicit randomness.

A sample is a dict ``{"image": HxWx3 float32 RGB 0..255, <task>: label array, "meta": {...}}`` with the labels of
:func:`invpt.data.labels.load_targets`. Every transform is a callable ``t(sample, rng) -> sample`` taking a
``numpy.random.Generator``, so one seed fixes every random choice (see :class:`invpt.data.multitask.MultiTaskDataset`,
which seeds each sample from ``(seed, epoch, index)``).

Training (ATRC style): :class:`RandomScaling` -> :class:`RandomCrop` -> :class:`RandomHorizontalFlip` ->
:class:`PhotoMetricDistortion` -> :class:`Normalize` -> :class:`PadImage` -> :class:`AddIgnoreRegions` ->
:class:`ToTensor`. Evaluation: :class:`Normalize` -> :class:`PadImage` -> :class:`AddIgnoreRegions` ->
:class:`ToTensor` (no resize). ``meta`` carries ``id``, ``size`` (the original ``(h, w)``), ``pad`` (``(top, left)``
of the content in the padded canvas), ``content`` (its ``(h, w)``) and ``pad_info`` (a
:class:`~invpt.data.transforms.PadInfo`), so predictions can be cropped back with
``pred[..., top:top + h, left:left + w]`` or :func:`~invpt.data.transforms.restore_labels`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import cv2
import numpy as np

from invpt.data.transforms import IMAGENET_MEAN, IMAGENET_STD, _check_hw, normalize, pad_to
from invpt.errors import ConfigError, InputError

IGNORE_INDEX = 255

Sample = dict[str, Any]
Transform = Callable[[Sample, np.random.Generator], Sample]

#: Label fill value of :class:`PadImage` per task (spec §10): class-like maps 255, depth and normals 0 (turned into 255
#: by :class:`AddIgnoreRegions`).
PAD_FILL: dict[str, float] = {"semseg": 255.0, "human_parts": 255.0, "sal": 255.0, "edge": 255.0, "depth": 0.0,
                              "normals": 0.0}

_NOT_LABELS = ("image", "meta")


def label_keys(sample: Sample) -> list[str]:
    """The task labels of a sample (every key but ``image`` and ``meta``)."""
    return [k for k in sample if k not in _NOT_LABELS]


def _meta(sample: Sample) -> dict[str, Any]:
    meta = sample.get("meta")
    if meta is None:
        meta = sample["meta"] = {}
    return meta


def _resize_nearest(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    out = cv2.resize(arr, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
    return out.reshape(hw + arr.shape[2:])


class Compose:
    """Apply transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class RandomScaling:
    """Scale by ``s ~ U(min_scale, max_scale)``: image bilinear, labels nearest, depth divided by ``s``.

    The new size is ``int(h * s) x int(w * s)`` (truncated, as upstream; at least 1). A nearer view of the same scene
    (``s > 1``) shows it at ``1/s`` of the distance, hence the depth division.
    """

    def __init__(self, min_scale: float = 0.5, max_scale: float = 2.0) -> None:
        if not 0 < min_scale <= max_scale:
            raise ConfigError(f"RandomScaling needs 0 < min_scale <= max_scale, got {min_scale}, {max_scale}.")
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        s = float(rng.uniform(self.min_scale, self.max_scale))
        h, w = sample["image"].shape[:2]
        hw = (max(1, int(h * s)), max(1, int(w * s)))  # upstream truncates: int(x * scale)
        sample["image"] = cv2.resize(sample["image"], (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
        for k in label_keys(sample):
            arr = _resize_nearest(sample[k], hw)
            if k == "depth":
                arr = (arr / np.float32(s)).astype(np.float32)
            sample[k] = arr
        _meta(sample)["scale"] = s
        return sample

    def __repr__(self) -> str:
        return f"RandomScaling({self.min_scale}, {self.max_scale})"


class RandomCrop:
    """Crop to ``size`` (or the whole side where the image is smaller) at a uniform random offset (mmseg style).

    With ``semseg`` present and ``cat_max_ratio < 1``, up to ``max_retries`` further offsets are drawn until the crop
    holds more than one valid class and no class covers ``cat_max_ratio`` or more of its valid pixels; the last offset
    drawn is kept if none qualifies.
    """

    def __init__(self, size: Sequence[int], cat_max_ratio: float = 0.75, max_retries: int = 10,
                 ignore_index: int = IGNORE_INDEX) -> None:
        self.size = _check_hw(size, "size")
        self.cat_max_ratio = float(cat_max_ratio)
        self.max_retries = int(max_retries)
        self.ignore_index = ignore_index

    def _bbox(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        ch, cw = min(self.size[0], h), min(self.size[1], w)
        top = int(rng.integers(0, h - ch + 1))
        left = int(rng.integers(0, w - cw + 1))
        return top, left, ch, cw

    def _acceptable(self, seg: np.ndarray) -> bool:
        values, counts = np.unique(seg, return_counts=True)
        counts = counts[values != self.ignore_index]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        h, w = sample["image"].shape[:2]
        top, left, ch, cw = self._bbox(h, w, rng)
        if self.cat_max_ratio < 1.0 and "semseg" in sample:
            seg = sample["semseg"]
            for _ in range(self.max_retries):
                if self._acceptable(seg[top : top + ch, left : left + cw]):
                    break
                top, left, ch, cw = self._bbox(h, w, rng)
        for k in ["image", *label_keys(sample)]:
            sample[k] = np.ascontiguousarray(sample[k][top : top + ch, left : left + cw])
        _meta(sample)["crop"] = (top, left, ch, cw)
        return sample

    def __repr__(self) -> str:
        return f"RandomCrop({self.size}, cat_max_ratio={self.cat_max_ratio})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``; the normals' x component changes sign (ignored pixels kept)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        flip = bool(rng.random() < self.p)
        if flip:
            for k in ["image", *label_keys(sample)]:
                sample[k] = np.ascontiguousarray(sample[k][:, ::-1])
            if "normals" in sample:
                n = sample["normals"].copy()
                keep = ~np.all(n == IGNORE_INDEX, axis=2)
                n[..., 0] = np.where(keep, -n[..., 0], n[..., 0])
                sample["normals"] = n
        _meta(sample)["flipped"] = flip
        return sample

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip({self.p})"


class PhotoMetricDistortion:
    """mmseg's photometric distortion of the image, each step with probability 1/2, values kept in 0..255.

    Order: brightness (``+U(-32, 32)``), then contrast (``xU(0.5, 1.5)``) either here or last (coin flip),
    saturation (``xU(0.5, 1.5)`` in HSV), hue (an integer shift in ``[-18, 17]`` of OpenCV's 0..180 hue: upstream
    draws ``random.randint(-hue_delta, hue_delta - 1)``, like mmseg's ``np.random.randint(-d, d)``), [contrast]. As in
    mmseg, each step works on 8-bit values (clipped, then truncated).
    """

    def __init__(self, brightness_delta: int = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> None:
        self.brightness_delta = int(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = int(hue_delta)

    @staticmethod
    def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def _contrast(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            return self._convert(img, alpha=float(rng.uniform(*self.contrast_range)))
        return img

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        img = np.clip(sample["image"], 0, 255).astype(np.uint8)
        if rng.integers(2):
            img = self._convert(img, beta=float(rng.uniform(-self.brightness_delta, self.brightness_delta)))
        contrast_first = bool(rng.integers(2))
        if contrast_first:
            img = self._contrast(img, rng)
        if rng.integers(2):
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[:, :, 1] = self._convert(hsv[:, :, 1], alpha=float(rng.uniform(*self.saturation_range)))
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if rng.integers(2):
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            shift = int(rng.integers(-self.hue_delta, self.hue_delta))  # [-d, d - 1], as upstream
            hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.int32) + shift) % 180).astype(np.uint8)
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not contrast_first:
            img = self._contrast(img, rng)
        sample["image"] = img.astype(np.float32)
        return sample

    def __repr__(self) -> str:
        return "PhotoMetricDistortion()"


class Normalize:
    """``/255`` then ``(x - mean) / std`` (ImageNet constants by default), float32; labels untouched."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        sample["image"] = normalize(sample["image"], self.mean, self.std)
        return sample

    def __repr__(self) -> str:
        return "Normalize()"


class PadImage:
    """Centre the sample in a ``size`` canvas (offsets ``delta // 2``): image 0 (after :class:`Normalize`, the mean
    colour), labels :data:`PAD_FILL`. Never crops: an image larger than ``size`` is an InputError (upstream's
    fixed-size model would fail on it). Records ``meta['pad'] = (top, left)``, ``meta['content'] = (h, w)`` and
    ``meta['pad_info']``, a :class:`~invpt.data.transforms.PadInfo` that :func:`~invpt.data.transforms.restore_labels`
    and :func:`~invpt.data.transforms.restore_geometry` accept to crop predictions back (in evaluation the content is
    the original image)."""

    def __init__(self, size: Sequence[int]) -> None:
        self.size = _check_hw(size, "size")

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        H, W = self.size
        h, w = sample["image"].shape[:2]
        meta = _meta(sample)
        if h > H or w > W:
            sid = meta.get("id")
            name = f"Image '{sid}'" if sid is not None else "The image"
            raise InputError(
                f"{name} is {h}x{w} (HxW), larger than the model input size {H}x{W}. The official evaluation pads "
                "every image to the model size and never resizes or crops, so upstream would fail on this image. Use "
                f"a config whose image_size is at least {max(h, H)}x{max(w, W)} (multiples of 64), or downscale or "
                "crop the dataset images to fit first."
            )
        canvas, info = pad_to(sample["image"], (H, W))
        sample["image"] = canvas
        top, left = info.top, info.left
        for k in label_keys(sample):
            arr = sample[k]
            out = np.full((H, W) + arr.shape[2:], PAD_FILL.get(k, float(IGNORE_INDEX)), dtype=np.float32)
            out[top : top + h, left : left + w] = arr
            sample[k] = out
        meta["pad"] = (int(top), int(left))
        meta["content"] = (int(h), int(w))
        meta["pad_info"] = info
        return sample

    def __repr__(self) -> str:
        return f"PadImage({self.size})"


class AddIgnoreRegions:
    """Mark what the losses must skip with 255 (spec §10): normals of norm 0 (all three channels), depth 0, and a
    human_parts map with no part at all (only 0 / 255: an image without annotated people) entirely."""

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if "normals" in sample:
            n = sample["normals"].astype(np.float32, copy=True)
            n[np.linalg.norm(n, axis=2) == 0] = IGNORE_INDEX
            sample["normals"] = n
        if "depth" in sample:
            d = sample["depth"].astype(np.float32, copy=True)
            d[d == 0] = IGNORE_INDEX
            sample["depth"] = d
        if "human_parts" in sample:
            hp = sample["human_parts"]
            if np.all((hp == 0) | (hp == IGNORE_INDEX)):
                sample["human_parts"] = np.full_like(hp, IGNORE_INDEX, dtype=np.float32)
        return sample

    def __repr__(self) -> str:
        return "AddIgnoreRegions()"


class ToTensor:
    """Numpy to float32 torch tensors: image ``[3, H, W]``, each label ``[1, H, W]`` (normals ``[3, H, W]``)."""

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        import torch

        sample["image"] = torch.from_numpy(np.ascontiguousarray(sample["image"].transpose(2, 0, 1), dtype=np.float32))
        for k in label_keys(sample):
            arr = np.asarray(sample[k], dtype=np.float32)
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            sample[k] = torch.from_numpy(np.ascontiguousarray(arr))
        return sample

    def __repr__(self) -> str:
        return "ToTensor()"


def _size_of(config: Any) -> tuple[int, int]:
    from invpt.config import InvPTConfig, load_config

    cfg = config if isinstance(config, InvPTConfig) else load_config(config)
    return tuple(int(v) for v in cfg.image_size)  # type: ignore[return-value]


def build_train_transforms(config: Any) -> Compose:
    """Upstream's training pipeline for ``config`` (an InvPTConfig or anything :func:`invpt.config.load_config`
    accepts), cropping and padding to ``config.image_size``."""
    size = _size_of(config)
    return Compose([
        RandomScaling(0.5, 2.0),
        RandomCrop(size, cat_max_ratio=0.75),
        RandomHorizontalFlip(0.5),
        PhotoMetricDistortion(),
        Normalize(),
        PadImage(size),
        AddIgnoreRegions(),
        ToTensor(),
    ])


def build_eval_transforms(config: Any) -> Compose:
    """Upstream's evaluation pipeline: Normalize -> PadImage(image_size) -> AddIgnoreRegions -> ToTensor (no resize;
    an image larger than ``image_size`` is an InputError)."""
    size = _size_of(config)
    return Compose([Normalize(), PadImage(size), AddIgnoreRegions(), ToTensor()])
