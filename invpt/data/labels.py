"""Ground-truth labels of the official splits, decoded into upstream's training encodings (spec §10, §13, §14).

:func:`load_targets` reads every requested task of one sample of a :class:`~invpt.data.datasets.SplitReader` as
numpy arrays, exactly as the official data loaders hand them to the transforms:

=============  ======================  ===========================================================================
task           array                   encoding
=============  ======================  ===========================================================================
semseg         float32 ``HxW``         class ids, 255 = ignore. PASCAL: 0..20 (0 = background). NYUD: the PNG's
                                       0..40 shifted by -1 with 0 becoming 255, so 0..39
human_parts    float32 ``HxW``         0 = background, 1..6 = head, torso, upper arm, lower arm, upper leg, lower
                                       leg (PASCAL-Part ``anno`` .mat, person objects only; all 0 without one)
sal            float32 ``HxW``         {0, 1}: grey PNG / 255 > 0.5
normals        float32 ``HxWx3``       2·v/255 − 1 per RGB channel; PASCAL: zeroed outside
                                       :data:`NORMALS_VALID_CONTEXT_CLASSES` of the pascal-context ``LabelMap``
edge           float32 ``HxW``         {0, 1}. PASCAL: ``thin(|Laplacian(LabelMap)| > 0)``; NYUD: PNG / 255
depth          float32 ``HxW``         metres, 0 = invalid (still 0 here; the transforms turn it into 255)
=============  ======================  ===========================================================================

The ignore value of the losses (255) is only introduced for padding and invalid pixels by
:class:`~invpt.data.train_transforms.AddIgnoreRegions`. scipy (``.mat`` files) and scikit-image (edge thinning) come
with the ``train`` extra and are imported only when needed.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from invpt.data.datasets import SplitReader
from invpt.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255

#: PASCAL-Part object category id of "person" (the only category with human parts).
PERSON_CATEGORY = 15

#: PASCAL-Part person part name -> human_parts class (the 6-part grouping of MTI-Net / ATRC, used by InvPT):
#: 1 head (with hair, ears, eyes, eyebrows, nose, mouth), 2 torso (with neck), 3 upper arm, 4 lower arm (with hand),
#: 5 upper leg, 6 lower leg (with foot). ``l``/``r`` prefixes are the left and right parts.
HUMAN_PART_IDS: dict[str, int] = {
    "head": 1, "hair": 1, "lear": 1, "rear": 1, "leye": 1, "reye": 1, "lebrow": 1, "rebrow": 1, "nose": 1,
    "mouth": 1,
    "torso": 2, "neck": 2,
    "luarm": 3, "ruarm": 3,
    "llarm": 4, "rlarm": 4, "lhand": 4, "rhand": 4,
    "luleg": 5, "ruleg": 5,
    "llleg": 6, "rlleg": 6, "lfoot": 6, "rfoot": 6,
}

#: pascal-context ``LabelMap`` ids (the 459-class full PASCAL-Context label set, 1-based, alphabetical from
#: 1 accordion to 459 wool) at which the distilled PASCAL normals are kept; they are zeroed elsewhere.
#:
#: ASSUMED, derived rather than read: upstream builds this list at run time from two files it ships and we do not,
#: ``data/db_info/context_classes.json`` (PASCAL-Context class name -> id) and ``data/db_info/nyu_classes.json`` (the
#: NYU-Depth-v2 raw label names), as "every NYU class name that is also a PASCAL-Context class name, except
#: 'unknown', plus tvmonitor (427)". The 169 shared names (air conditioner, antenna, ashtray, bag, ..., wall, wallet,
#: wardrobe, washing machine, watch, water dispenser, window, wire) give the ids below, 170 with tvmonitor. A
#: different version of those files would give a different list; pass ``normals_valid_classes`` to
#: :func:`load_targets` to use another one.
NORMALS_VALID_CONTEXT_CLASSES: tuple[int, ...] = (
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51, 53, 55, 56,
    59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107, 111, 113, 115, 122, 124,
    135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202,
    213, 215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255, 260, 261,
    263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309, 310, 314,
    315, 319, 323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380, 383,
    384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432, 440, 441, 442,
    443, 444, 446, 454, 457,
)

PASCAL_SEMSEG_CLASSES = 21
NYUD_RAW_CLASSES = 40  # segmentation PNG values 0..40 (0 = unlabelled)


# ---- readers of single files ---------------------------------------------------------------------------------------
def _pil_array(path: Path, what: str) -> tuple[np.ndarray, str]:
    """Decode an image file with PIL (as upstream does): palette PNGs give their indices. Returns (array, mode)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.array(im)
    except FileNotFoundError:
        raise InputError(f"{what} '{path}' does not exist.") from None
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise InputError(f"{what} '{path}' could not be decoded as an image ({err}); re-extract the file.") from err
    return arr, mode


def read_class_png(path: str | Path, what: str = "label PNG") -> np.ndarray:
    """A single-channel class-id PNG (grey or palette: the palette indices) as an ``HxW`` integer array.

    Raises:
        InputError: unreadable, or a colour image (class ids must be stored as grey values or palette indices).
    """
    path = Path(path)
    arr, mode = _pil_array(path, what)
    if arr.ndim != 2:
        raise InputError(
            f"{what} '{path}' is a {mode} image with {arr.shape[2] if arr.ndim == 3 else '?'} channels; class labels "
            "must be single-channel PNGs (grey values or palette indices = class ids)."
        )
    return arr.astype(np.int64)


def _check_classes(arr: np.ndarray, path: Path, what: str, lo: int, hi: int, allow_ignore: bool) -> None:
    bad = (arr < lo) | (arr > hi)
    if allow_ignore:
        bad &= arr != IGNORE_INDEX
    if bad.any():
        values = np.unique(arr[bad])
        shown = ", ".join(str(int(v)) for v in values[:5]) + (", ..." if len(values) > 5 else "")
        valid = f"{lo}..{hi}" + (f" and {IGNORE_INDEX} (ignore)" if allow_ignore else "")
        raise InputError(
            f"{what} '{path}' contains value(s) {shown} outside the valid range {valid} ({int(bad.sum())} pixels). "
            "The file does not follow the official encoding; check that it belongs to this dataset and was not "
            "re-encoded (e.g. saved as a colour image)."
        )


def read_labelmap(path: str | Path) -> np.ndarray:
    """The pascal-context ``LabelMap`` (459-class ids) of a ``pascal-context/trainval/<id>.mat`` file, ``HxW`` int64.

    Raises:
        InputError: unreadable, not a MATLAB file, no ``LabelMap`` key, or not a 2-D map.
        DependencyError: scipy (``train`` extra) is not installed.
    """
    path = Path(path)
    data = _loadmat(path, "pascal-context LabelMap file")
    if "LabelMap" not in data:
        keys = ", ".join(k for k in data if not k.startswith("__")) or "none"
        raise InputError(
            f"pascal-context file '{path}' has no 'LabelMap' variable (it has: {keys}). Expected the PASCAL-Context "
            "trainval .mat files (one 'LabelMap' of class ids per image)."
        )
    lm = np.asarray(data["LabelMap"])
    if lm.ndim != 2 or not np.issubdtype(lm.dtype, np.number):
        raise InputError(f"'LabelMap' in '{path}' has shape {lm.shape} ({lm.dtype}); expected a 2-D map of class ids.")
    return lm.astype(np.int64)


def _loadmat(path: Path, what: str) -> dict[str, Any]:
    from invpt.lazy import require

    sio = require("scipy.io", "train", "reading .mat label files")
    try:
        return sio.loadmat(str(path))
    except FileNotFoundError:
        raise InputError(f"{what} '{path}' does not exist.") from None
    except Exception as err:  # scipy raises ValueError, TypeError, MatReadError... on a broken file
        raise InputError(
            f"{what} '{path}' could not be read as a MATLAB .mat file ({type(err).__name__}: {err})."
        ) from err


def edges_from_labelmap(labelmap: np.ndarray) -> np.ndarray:
    """Upstream's PASCAL edges: ``thin(|Laplacian(LabelMap)| > 0)`` as float32 {0, 1}.

    The Laplacian is OpenCV's default 3x3 one (``ksize=1``, reflect-101 border), so every pixel with a differently
    labelled 4-neighbour is marked; scikit-image's ``thin`` then reduces those two-pixel bands to one-pixel lines.

    Raises:
        DependencyError: scikit-image (``train`` extra) is not installed.
    """
    from invpt.lazy import require

    morphology = require("skimage.morphology", "train", "thinning the PASCAL edge maps")
    lap = cv2.Laplacian(np.asarray(labelmap, dtype=np.float64), cv2.CV_64F)
    return morphology.thin(np.abs(lap) > 0).astype(np.float32)


def decode_normals_png(rgb: np.ndarray) -> np.ndarray:
    """Upstream's normals decoding of an 8-bit RGB PNG: ``2·v/255 − 1`` per channel, float32 ``HxWx3``."""
    return (2.0 * np.asarray(rgb, dtype=np.float32) / 255.0 - 1.0).astype(np.float32)


def read_normals_png(path: str | Path) -> np.ndarray:
    """A normals PNG (RGB, 8 bit) decoded to float32 ``HxWx3`` in [-1, 1].

    Raises:
        InputError: unreadable or not a 3-channel 8-bit image.
    """
    path = Path(path)
    arr, mode = _pil_array(path, "normals PNG")
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise InputError(
            f"normals PNG '{path}' is a {mode} image of shape {arr.shape} ({arr.dtype}); expected an 8-bit RGB PNG "
            "encoding each normal as (n + 1) * 255 / 2."
        )
    return decode_normals_png(arr)


def read_saliency_png(path: str | Path) -> np.ndarray:
    """Upstream's saliency target: grey PNG ``/255 > 0.5`` as float32 {0, 1} (a colour PNG is converted to grey).

    Raises:
        InputError: unreadable or not 8-bit.
    """
    from PIL import Image

    path = Path(path)
    arr, mode = _pil_array(path, "saliency PNG")
    if arr.ndim == 3:
        with Image.open(path) as im:
            arr = np.array(im.convert("L"))
    if arr.max(initial=0) > 255 or arr.min(initial=0) < 0:
        raise InputError(f"saliency PNG '{path}' has values outside 0..255 ({mode}); expected an 8-bit grey PNG.")
    return (arr.astype(np.float32) / 255.0 > 0.5).astype(np.float32)


def _field(record: Any, name: str, position: int) -> Any:
    """Field ``name`` of a MATLAB struct record read by scipy (by name, else by position as upstream indexes it)."""
    names = getattr(getattr(record, "dtype", None), "names", None)
    if names and name in names:
        return record[name]
    return record[position]


def _records(value: Any) -> list[Any]:
    """The elements of a MATLAB struct array (empty for ``[]``)."""
    arr = np.asarray(value)
    if arr.size == 0 or arr.dtype.names is None:
        return []
    return list(arr.ravel())


def _scalar(value: Any) -> Any:
    arr = np.asarray(value).ravel()
    return arr[0] if arr.size else None


def read_human_parts(path: str | Path, image_hw: Sequence[int]) -> np.ndarray:
    """Human parts target of a PASCAL-Part ``anno`` .mat file: float32 ``HxW``, 0 background, 1..6 parts.

    Every object of category :data:`PERSON_CATEGORY` that has parts contributes its part masks, mapped with
    :data:`HUMAN_PART_IDS` (later parts overwrite earlier ones where they overlap, as upstream). A file without such
    a person gives all zeros of ``image_hw`` (which :class:`~invpt.data.train_transforms.AddIgnoreRegions` then turns
    into all-ignore).

    Raises:
        InputError: unreadable, no ``anno`` struct, a part name outside the table, or a mask of another shape.
    """
    path = Path(path)
    data = _loadmat(path, "human parts file")
    if "anno" not in data:
        keys = ", ".join(k for k in data if not k.startswith("__")) or "none"
        raise InputError(
            f"human parts file '{path}' has no 'anno' struct (it has: {keys}). Expected the PASCAL-Part annotation "
            "layout: anno.objects(k).class_ind, .mask and .parts(j).part_name, .mask."
        )
    try:
        anno = np.asarray(data["anno"]).ravel()[0]
        objects = _records(_field(anno, "objects", 1))
    except (IndexError, ValueError, KeyError) as err:
        raise InputError(f"'anno' in human parts file '{path}' is not a PASCAL-Part struct ({err}).") from err
    target: np.ndarray | None = None
    for k, obj in enumerate(objects):
        try:
            category = int(_scalar(_field(obj, "class_ind", 1)))
            parts = _records(_field(obj, "parts", 3))
            mask = np.asarray(_field(obj, "mask", 2))
        except (IndexError, ValueError, TypeError, KeyError) as err:
            raise InputError(
                f"object {k + 1} in human parts file '{path}' is not a PASCAL-Part object ({err})."
            ) from err
        if category != PERSON_CATEGORY or not parts:
            continue
        if target is None:
            target = np.zeros(mask.shape, dtype=np.float32)
        for part in parts:
            name = str(_scalar(_field(part, "part_name", 0)))
            if name not in HUMAN_PART_IDS:
                raise InputError(
                    f"human parts file '{path}' has a person part named {name!r}, which is not a PASCAL-Part person "
                    f"part; known parts: {', '.join(sorted(HUMAN_PART_IDS))}."
                )
            pmask = np.asarray(_field(part, "mask", 1)).astype(bool)
            if pmask.shape != target.shape:
                raise InputError(
                    f"part {name!r} in human parts file '{path}' has a {pmask.shape} mask but the person mask is "
                    f"{target.shape}; the file is inconsistent."
                )
            target[pmask] = HUMAN_PART_IDS[name]
    if target is None:
        return np.zeros(tuple(int(v) for v in image_hw), dtype=np.float32)
    return target


def read_depth(path: str | Path) -> np.ndarray:
    """A NYUD depth map (``.npy``, metres, 0 = invalid) as float32 ``HxW``.

    Raises:
        InputError: unreadable, not 2-D, non-finite or negative values.
    """
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"depth file '{path}' does not exist.") from None
    except (OSError, ValueError) as err:
        raise InputError(f"depth file '{path}' could not be read as a .npy array ({err}).") from err
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"depth file '{path}' holds a {arr.dtype} array of shape {arr.shape}; expected HxW metres.")
    arr = arr.astype(np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        raise InputError(
            f"depth file '{path}' contains {int((~finite).sum())} non-finite values (NaN or inf). Mark invalid depth "
            "with 0, as the official NYUD-v2 files do."
        )
    if (arr < 0).any():
        raise InputError(
            f"depth file '{path}' contains negative depths (min {float(arr.min()):.4g}); expected metres >= 0 with 0 "
            "marking invalid pixels."
        )
    return arr


def _read_edge_png(path: Path) -> np.ndarray:
    """NYUD edge PNG / 255 as upstream reads it: any grey value is kept as a soft target (the released maps are
    binary 0/255; a soft map is logged, not refused, so a user's dataset is read exactly as upstream reads it)."""
    arr = read_class_png(path, "edge PNG")
    soft = (arr != 0) & (arr != 255)
    if soft.any():
        logger.debug("edge PNG '%s' is not binary (%d pixels between 0 and 255); kept as /255", path, int(soft.sum()))
    return (arr.astype(np.float32) / 255.0).astype(np.float32)


# ---- one sample ----------------------------------------------------------------------------------------------------
def _image_hw(reader: SplitReader, i: int) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    path = reader.image_path(i)
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, UnidentifiedImageError) as err:
        raise InputError(f"Image '{path}' could not be decoded ({err}).") from err
    return int(h), int(w)


def _fit(arr: np.ndarray, hw: tuple[int, int], path: Path, task: str) -> np.ndarray:
    """Resize a label to the image size as upstream's loaders do, with a warning (rare: bad data): bicubic for
    normals, nearest neighbour for every other label."""
    if tuple(arr.shape[:2]) == hw:
        return arr
    cubic = task == "normals"
    logger.warning(
        "%s label '%s' is %dx%d but its image is %dx%d; resized with %s as upstream does",
        task, path, arr.shape[0], arr.shape[1], hw[0], hw[1], "bicubic interpolation" if cubic else "nearest neighbour",
    )
    out = cv2.resize(arr, (hw[1], hw[0]), interpolation=cv2.INTER_CUBIC if cubic else cv2.INTER_NEAREST)
    return out.reshape(hw + arr.shape[2:])


def load_targets(
    reader: SplitReader,
    i: int,
    tasks: Sequence[str],
    *,
    image_hw: Sequence[int] | None = None,
    normals_valid_classes: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Every task label of sample ``i`` of an official split, in upstream's encodings (see the module table).

    Args:
        reader: a :class:`~invpt.data.datasets.PascalContextReader` or :class:`~invpt.data.datasets.NYUDReader`.
        i: sample index.
        tasks: task names (each must have labels in the dataset).
        image_hw: the image size if already known (else read from the image header). Labels of another size are
            resized to it with a warning, as upstream does: nearest neighbour, bicubic for normals (PASCAL edges
            and the normals mask are derived from the LabelMap at its own size first).
        normals_valid_classes: pascal-context classes at which PASCAL normals are kept (default
            :data:`NORMALS_VALID_CONTEXT_CLASSES`).

    Raises:
        InputError: a label file is missing (naming it and the expected layout), unreadable, or holds values outside
            its encoding (naming the file, the values and the valid range).
        ConfigError: a task without labels in this dataset, or a reader of another dataset.
        DependencyError: scipy / scikit-image (``train`` extra) are needed and missing.
    """
    key = getattr(reader, "KEY", "")
    if key not in ("pascal_context", "nyud_v2"):
        raise ConfigError(
            f"load_targets() needs a PascalContextReader or NYUDReader, got {type(reader).__name__}; labels exist only "
            "for the official splits."
        )
    for task in tasks:
        reader.label_groups(task)  # ConfigError for a task without labels
    hw = tuple(int(v) for v in image_hw) if image_hw is not None else _image_hw(reader, i)
    out: dict[str, np.ndarray] = {}
    labelmap: np.ndarray | None = None
    labelmap_path: Path | None = None

    def get_labelmap(task: str, group: int) -> tuple[np.ndarray, Path]:
        nonlocal labelmap, labelmap_path
        if labelmap is None:  # at its own size: upstream derives edges and the normals mask before any resize
            labelmap_path = reader.label_file(i, task, group)
            labelmap = read_labelmap(labelmap_path)
        assert labelmap_path is not None
        return labelmap, labelmap_path

    for task in tasks:
        path = reader.label_file(i, task)
        if key == "pascal_context":
            if task == "semseg":
                arr = read_class_png(path, "semseg PNG")
                _check_classes(arr, path, "semseg PNG", 0, PASCAL_SEMSEG_CLASSES - 1, allow_ignore=True)
                value = arr.astype(np.float32)
            elif task == "human_parts":
                value = read_human_parts(path, hw)
            elif task == "sal":
                value = read_saliency_png(path)
            elif task == "normals":
                value = read_normals_png(path)
                lm, lm_path = get_labelmap(task, 1)
                # upstream masks at the PNG's own size (then resizes to the image); a LabelMap of another size,
                # which would crash upstream's boolean indexing, is fitted to the PNG with nearest neighbour
                lm = _fit(lm, tuple(value.shape[:2]), lm_path, "pascal-context LabelMap")
                valid = np.isin(lm, np.asarray(
                    NORMALS_VALID_CONTEXT_CLASSES if normals_valid_classes is None else normals_valid_classes))
                value = np.where(valid[:, :, None], value, np.float32(0.0)).astype(np.float32)
            elif task == "edge":
                lm, _ = get_labelmap(task, 0)
                value = edges_from_labelmap(lm)
            else:  # pragma: no cover - label_groups() already refused it
                raise ConfigError(f"no PASCAL-Context labels for task {task!r}")
        else:
            if task == "semseg":
                arr = read_class_png(path, "semseg PNG")
                _check_classes(arr, path, "NYUD-v2 segmentation PNG", 0, NYUD_RAW_CLASSES, allow_ignore=False)
                value = np.where(arr == 0, IGNORE_INDEX, arr - 1).astype(np.float32)
            elif task == "depth":
                value = read_depth(path)
            elif task == "normals":
                value = read_normals_png(path)
            elif task == "edge":
                value = _read_edge_png(path)
            else:  # pragma: no cover
                raise ConfigError(f"no NYUD-v2 labels for task {task!r}")
        out[task] = _fit(value, hw, path, task)
    return out
