"""Data handling shared by inference, export verification and calibration.

- :mod:`invpt.data.transforms`: the official pre-processing (normalise, then pad, resize or letterbox) and its
  inverse.
- :mod:`invpt.data.decode`: raw outputs to per-task maps (numpy only, for torch, ORT and TensorRT alike).
- :mod:`invpt.data.visualize`: colour visuals, the side-by-side overview and atomic PNG writing.
- :mod:`invpt.data.datasets`: the official split readers, image folders and videos behind one interface.
- :mod:`invpt.data.labels`: every task's ground truth of the official splits in upstream's encodings (training,
  evaluation).
- :mod:`invpt.data.train_transforms`: upstream's seeded training and evaluation transforms of multi-task samples.
- :mod:`invpt.data.multitask`: the torch ``MultiTaskDataset`` over the official splits and its collate function.
- :mod:`invpt.data.synthetic`: small synthetic datasets in the official layouts (``invpt-synth-data``).

The last four are loaded on first use (they need torch or the ``train`` extra), so ``import invpt.data`` stays light.
"""
from invpt.data.datasets import (
    VIDEO_EXTENSIONS,
    ImageFolderReader,
    ImageListReader,
    ImageSource,
    NYUDReader,
    PascalContextReader,
    SplitReader,
    VideoReader,
    open_source,
)
from invpt.data.decode import (
    decode,
    decode_all,
    decode_boundary,
    decode_depth,
    decode_labels,
    decode_normals,
    decode_saliency,
    normals_to_uint8,
    probability_to_uint8,
    stable_sigmoid,
    stable_softmax,
)
from invpt.data.transforms import (
    GEOMETRY_MODES,
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PadInfo,
    content_fraction,
    content_fraction_for,
    letterbox_hw,
    letterbox_to,
    normalize,
    pad_to,
    preprocess,
    read_image,
    resize_to,
    restore_geometry,
    restore_labels,
)
from invpt.data.visualize import (
    colorize_depth,
    colorize_labels,
    colorize_normals,
    colorize_probability,
    overview,
    save_png,
    visualize,
    voc_palette,
)
from invpt.lazy import lazy_face as _lazy_face

#: Names loaded on first use (PEP 562), with the module that defines each.
_LAZY = {
    "IGNORE_INDEX": "invpt.data.labels",
    "load_targets": "invpt.data.labels",
    "edges_from_labelmap": "invpt.data.labels",
    "NORMALS_VALID_CONTEXT_CLASSES": "invpt.data.labels",
    "HUMAN_PART_IDS": "invpt.data.labels",
    "Compose": "invpt.data.train_transforms",
    "build_train_transforms": "invpt.data.train_transforms",
    "build_eval_transforms": "invpt.data.train_transforms",
    "MultiTaskDataset": "invpt.data.multitask",
    "collate_multitask": "invpt.data.multitask",
    "make_synthetic": "invpt.data.synthetic",
}
__getattr__, _lazy_dir = _lazy_face(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "GEOMETRY_MODES",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VIDEO_EXTENSIONS",
    "ImageFolderReader",
    "ImageListReader",
    "ImageSource",
    "NYUDReader",
    "PadInfo",
    "PascalContextReader",
    "SplitReader",
    "VideoReader",
    "colorize_depth",
    "colorize_labels",
    "colorize_normals",
    "colorize_probability",
    "content_fraction",
    "content_fraction_for",
    "decode",
    "decode_all",
    "decode_boundary",
    "decode_depth",
    "decode_labels",
    "decode_normals",
    "decode_saliency",
    "letterbox_hw",
    "letterbox_to",
    "normalize",
    "normals_to_uint8",
    "open_source",
    "overview",
    "pad_to",
    "preprocess",
    "probability_to_uint8",
    "read_image",
    "resize_to",
    "restore_geometry",
    "restore_labels",
    "save_png",
    "stable_sigmoid",
    "stable_softmax",
    "visualize",
    "voc_palette",
]
