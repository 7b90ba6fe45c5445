"""Decoding of raw InvPT outputs into meaningful per-task maps (spec §11), in numpy only (restoring the
original geometry with ``info=`` uses OpenCV's resize).

The same functions decode torch, ONNX Runtime and TensorRT outputs, so parity checks compare like with like.
Input is one image's raw output ``[C, H, W]`` or a batch ``[B, C, H, W]``. What each task kind returns
(single-channel results drop the channel axis, a batch keeps its leading ``B``):

=========  ==================================================  ===========================
kind       operation                                           result (one image)
=========  ==================================================  ===========================
label      argmax over channels                                ``[H, W]`` uint8 (int64 if C > 256)
saliency   softmax over the 2 channels, channel 1               ``[H, W]`` float32 in [0, 1]
boundary   sigmoid                                              ``[H, W]`` float32 in [0, 1]
normals    L2 normalise over channels (eps 1e-12, F.normalize)  ``[3, H, W]`` float32 unit vectors
depth      clamp at 0 (metres, no other scaling)                ``[H, W]`` float32
=========  ==================================================  ===========================

Outputs are at the network input size. To get maps at the original image size, pass the ``PadInfo`` that
:func:`invpt.data.transforms.preprocess` returned as ``info=``: the raw output is first mapped back with
:func:`~invpt.data.transforms.restore_geometry` (crop for ``pad``; bilinear for ``resize``; crop then bilinear for
a scaled ``letterbox``) and then decoded, as the official ``inference.py`` does (logits are interpolated, never
class ids; normals are re-normalised after interpolation, depth is clamped after it).

The official code multiplies saliency/boundary by 255 and encodes normals as ``(n + 1) * 255 / 2``; those
encodings are available as :func:`probability_to_uint8` and :func:`normals_to_uint8` for saving PNGs.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable, Mapping, Optional

import numpy as np

from invpt.errors import ConfigError
from invpt.tasks import DatasetSpec, TaskSpec, get_dataset

if TYPE_CHECKING:
    from invpt.data.transforms import PadInfo

logger = logging.getLogger(__name__)

NORMALIZE_EPS = 1e-12


def stable_sigmoid(x: np.ndarray) -> np.ndarray:
    """Element-wise logistic function without overflow for large ``|x|`` (float32 result)."""
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32, copy=False)


def stable_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    """Softmax along ``axis`` with the max subtracted first, so large logits do not overflow (float32)."""
    x = np.asarray(x, dtype=np.float32)
    z = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return z / np.sum(z, axis=axis, keepdims=True)


def _check_raw(task: TaskSpec, raw: np.ndarray) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.ndim not in (3, 4):  # the caller passed the wrong array: a programming error, not a config problem
        raise ValueError(
            f"Raw output for task '{task.name}' must be [C,H,W] or [B,C,H,W], got shape {raw.shape}. "
            "Pass the model output for that task unchanged."
        )
    if raw.shape[-3] != task.channels:
        raise ConfigError(
            f"Raw output for task '{task.name}' has {raw.shape[-3]} channels (shape {raw.shape}) but the task "
            f"has {task.channels}; the model or engine was built for a different dataset or task set. "
            "Decode with the DatasetSpec recorded in the model's manifest."
        )
    return raw


def decode_labels(raw: np.ndarray) -> np.ndarray:
    """Argmax over the channel axis (``-3``): class ids as uint8 (int64 when there are more than 256 classes)."""
    labels = np.argmax(raw, axis=-3)
    return labels.astype(np.uint8 if raw.shape[-3] <= 256 else np.int64)


def decode_saliency(raw: np.ndarray) -> np.ndarray:
    """Probability of the salient class: ``softmax(raw, channels)[1]``, computed as ``sigmoid(x1 - x0)``."""
    x = np.asarray(raw, dtype=np.float32)
    return stable_sigmoid(x[..., 1, :, :] - x[..., 0, :, :])


def decode_boundary(raw: np.ndarray) -> np.ndarray:
    """Boundary probability: ``sigmoid`` of the single channel, channel axis dropped."""
    return stable_sigmoid(np.asarray(raw)[..., 0, :, :])


def decode_normals(raw: np.ndarray) -> np.ndarray:
    """Unit normal vectors: ``x / max(||x||_2, 1e-12)`` over channels, like ``F.normalize`` (0-norm stays 0)."""
    x = np.asarray(raw, dtype=np.float32)
    norm = np.sqrt(np.sum(x * x, axis=-3, keepdims=True))
    return (x / np.maximum(norm, np.float32(NORMALIZE_EPS))).astype(np.float32, copy=False)


def decode_depth(raw: np.ndarray) -> np.ndarray:
    """Depth in metres: the raw regression clamped at 0 (the network predicts metres directly)."""
    return np.maximum(np.asarray(raw, dtype=np.float32)[..., 0, :, :], np.float32(0.0))


_DECODERS = {
    "label": decode_labels,
    "saliency": decode_saliency,
    "boundary": decode_boundary,
    "normals": decode_normals,
    "depth": decode_depth,
}


def _restore(task: TaskSpec, raw: np.ndarray, info: PadInfo) -> np.ndarray:
    """One image's raw output mapped back to its original size (see :func:`restore_geometry`)."""
    from invpt.data.transforms import restore_geometry  # OpenCV; decoding alone stays numpy only
    if raw.ndim == 4:
        if raw.shape[0] != 1:
            raise ValueError(
                f"Raw output for task '{task.name}' is a batch of {raw.shape[0]} (shape {raw.shape}) but one PadInfo "
                "was given; images of a batch can have different original sizes. Decode each image on its own: "
                "decode(task, raw[i], info=infos[i])."
            )
        return restore_geometry(raw[0], info)[None]
    return restore_geometry(raw, info)


def decode(task: TaskSpec, raw: np.ndarray, info: Optional[PadInfo] = None) -> np.ndarray:
    """Decode one task's raw output (``[C,H,W]`` or ``[B,C,H,W]``) according to ``task.kind`` (spec §11).

    Args:
        task: the task's spec.
        raw: the raw output at the network input size.
        info: the image's ``PadInfo`` from :func:`invpt.data.transforms.preprocess`; when given, the raw output is
            restored to the original image size first (one image: ``[C,H,W]`` or ``[1,C,H,W]``), so the result
            has the original geometry.

    Raises:
        ValueError: ``raw`` is not [C,H,W] or [B,C,H,W], or a batch of more than one image comes with one ``info``.
        ConfigError: the channel count does not match ``task`` (a model of another dataset), the kind is unknown,
            or ``info`` does not fit the output (another input size).
    """
    raw = _check_raw(task, raw)
    try:
        fn = _DECODERS[task.kind]
    except KeyError:
        raise ConfigError(
            f"Task '{task.name}' has unknown kind '{task.kind}'; known kinds: {', '.join(_DECODERS)}."
        ) from None
    if info is not None:
        raw = _restore(task, raw, info)
    return fn(raw)


def _as_task_map(specs: str | DatasetSpec | Iterable[TaskSpec] | Mapping[str, TaskSpec]) -> dict[str, TaskSpec]:
    if isinstance(specs, str):
        specs = get_dataset(specs)
    if isinstance(specs, DatasetSpec):
        return {t.name: t for t in specs.tasks}
    if isinstance(specs, Mapping):
        return dict(specs)
    return {t.name: t for t in specs}


def decode_all(
    specs: str | DatasetSpec | Iterable[TaskSpec] | Mapping[str, TaskSpec],
    outputs: Mapping[str, np.ndarray],
    *,
    require_all: bool = False,
    info: Optional[PadInfo] = None,
) -> dict[str, np.ndarray]:
    """Decode every task output in ``outputs`` (``task name -> raw array``), keeping the spec's task order.

    Args:
        specs: a dataset name, a :class:`DatasetSpec`, an iterable of :class:`TaskSpec`, or a ``name -> TaskSpec`` mapping.
        outputs: raw outputs keyed by task name (the ONNX/TensorRT output names are the task names).
        require_all: if true, every task of ``specs`` must be present; otherwise a model exported for a subset
            of the tasks is fine.
        info: the image's ``PadInfo``; when given, every output is restored to the original image size before
            decoding (see :func:`decode`).

    Raises:
        ConfigError: an output name is not a task of ``specs``, a required task is missing, or a shape is wrong.
    """
    tasks = _as_task_map(specs)
    unknown = [k for k in outputs if k not in tasks]
    if unknown:
        raise ConfigError(
            f"Outputs {unknown} are not tasks of this dataset (tasks: {', '.join(tasks)}); the model was built "
            "for a different dataset. Decode with the dataset recorded in the model's manifest."
        )
    missing = [k for k in tasks if k not in outputs]
    if missing and require_all:
        raise ConfigError(
            f"Outputs for tasks {missing} are missing (got: {', '.join(outputs) or 'none'}); the model was exported "
            "for a subset of the tasks. Re-export with all tasks or decode with require_all=False."
        )
    return {name: decode(task, outputs[name], info) for name, task in tasks.items() if name in outputs}


def probability_to_uint8(prob: np.ndarray) -> np.ndarray:
    """Official 0..255 encoding of a probability map (``255 * p``, rounded, clipped) for saliency/edge PNGs."""
    return np.clip(np.rint(np.asarray(prob, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def normals_to_uint8(normals: np.ndarray) -> np.ndarray:
    """Official 0..255 encoding of unit normals, ``(n + 1) * 255 / 2`` rounded and clipped, same layout as input.

    The metrics code (spec §13) decodes this back with ``2 * v / 255 - 1``.
    """
    n = np.asarray(normals, dtype=np.float32)
    return np.clip(np.rint((n + 1.0) * 127.5), 0, 255).astype(np.uint8)
