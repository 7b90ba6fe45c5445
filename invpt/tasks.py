"""Task and dataset registry: the facts about each dense-prediction task and each official dataset.

Everything downstream (model heads, decoding, visuals, ONNX output names, manifests, metrics) reads
task facts from here, so a task's channel count or class list is defined exactly once.

Task order matters: InvPT concatenates task tokens and channels in this order inside the decoder, so
the order is fixed by the dataset (as in the official ``parse_task_dictionary``), not by the user.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TaskKind = Literal["label", "saliency", "boundary", "normals", "depth"]


@dataclass(frozen=True)
class TaskSpec:
    """One task: its output channels, how raw outputs are decoded, and (for label tasks) class names."""

    name: str
    channels: int
    kind: TaskKind
    description: str
    class_names: tuple[str, ...] = ()


PASCAL_CONTEXT_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
HUMAN_PARTS_CLASSES = ("background", "head", "torso", "upper arm", "lower arm", "upper leg", "lower leg")
NYUD_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
    "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat", "clothes",
    "ceiling", "books", "refrigerator", "television", "paper", "towel", "shower curtain", "box", "whiteboard",
    "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure", "otherfurniture",
    "otherprop",
)


@dataclass(frozen=True)
class DatasetSpec:
    """An official dataset: its tasks in decoder order, their specs, and the official input size (H, W)."""

    name: str
    tasks: tuple[TaskSpec, ...]
    image_size: tuple[int, int]
    ignore_index: int = 255

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)


_SAL = TaskSpec("sal", 2, "saliency", "salient object probability (softmax channel 1)")
_EDGE = TaskSpec("edge", 1, "boundary", "object boundary probability (sigmoid)")
_NORMALS = TaskSpec("normals", 3, "normals", "surface normal vector (L2-normalised xyz)")

DATASETS: dict[str, DatasetSpec] = {
    "pascal_context": DatasetSpec(
        name="pascal_context",
        tasks=(
            TaskSpec("semseg", 21, "label", "semantic segmentation (21 PASCAL classes)", PASCAL_CONTEXT_CLASSES),
            TaskSpec("human_parts", 7, "label", "human part segmentation (7 classes)", HUMAN_PARTS_CLASSES),
            _SAL,
            _NORMALS,
            _EDGE,
        ),
        image_size=(512, 512),
    ),
    "nyud_v2": DatasetSpec(
        name="nyud_v2",
        tasks=(
            TaskSpec("semseg", 40, "label", "semantic segmentation (40 NYUD classes)", NYUD_CLASSES),
            TaskSpec("depth", 1, "depth", "metric depth in metres (clamped at 0)"),
            _NORMALS,
            _EDGE,
        ),
        image_size=(448, 576),
    ),
}


def get_dataset(name: str) -> DatasetSpec:
    """Return the :class:`DatasetSpec` called ``name``; a clear error lists the known datasets."""
    from invpt.errors import ConfigError

    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(
            f"Unknown dataset '{name}'. Known datasets: {', '.join(sorted(DATASETS))}. "
            "Set 'dataset:' in the config to one of them."
        ) from None
