"""The multi-task training / evaluation dataset over the official PASCAL-Context and NYUD-v2 splits.

:class:`MultiTaskDataset` joins an official split reader (:mod:`invpt.data.datasets`), the label decoding of
:mod:`invpt.data.labels` and the transforms of :mod:`invpt.data.train_transforms`. Each item is::

    {"image": FloatTensor[3, H, W],
     <task>: FloatTensor[1 | 3, H, W],          # 255 = ignore
     "meta": {"id": str, "size": (h, w), "pad": (top, left), "pad_info": PadInfo, ...}}

Randomness is explicit: item ``i`` of epoch ``e`` is transformed with ``np.random.default_rng([seed, e, i])``, so the
same seed, epoch and index give identical tensors whatever the number of DataLoader workers or the order items are
fetched in. Call :meth:`MultiTaskDataset.set_epoch` before iterating each epoch (with ``persistent_workers=False``,
the default, so the workers see the new epoch).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch

from invpt.config import ConfigLike, InvPTConfig, load_config
from invpt.data.datasets import NYUDReader, PascalContextReader, SplitReader
from invpt.data.labels import load_targets
from invpt.data.train_transforms import build_eval_transforms, build_train_transforms
from invpt.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

#: dataset name -> its split reader.
READERS: dict[str, type[SplitReader]] = {"pascal_context": PascalContextReader, "nyud_v2": NYUDReader}

TransformSpec = Union[str, Callable[[dict, np.random.Generator], dict], None]


def open_split(root: str | Path, dataset: str, split: str) -> SplitReader:
    """The split reader of ``dataset`` (``pascal_context`` / ``nyud_v2``) at ``root`` (the dataset dir or its parent).

    Raises:
        ConfigError: unknown dataset.
        InputError: the root, split file or an image is missing.
    """
    try:
        reader_cls = READERS[dataset]
    except KeyError:
        raise ConfigError(f"No official split reader for dataset {dataset!r}; known: {', '.join(READERS)}.") from None
    try:
        return reader_cls(root, split)
    except InputError as err:
        # The commonest cause: the data of the other dataset (a NYUD-v2 checkpoint evaluated on PASCAL-Context data).
        p = Path(root)
        other = [cls for name, cls in READERS.items()
                 if name != dataset and (cls.matches(p) or cls.matches(p / cls.DIR_NAME))]
        if not other:
            raise
        raise InputError(
            f"'{root}' holds {other[0].DATASET} data, but the model is a {reader_cls.DATASET} model (its config's "
            f"dataset is '{dataset}'), so its {reader_cls.DATASET} split '{split}' is not there. Pass a "
            f"{reader_cls.DATASET} root (the {reader_cls.DIR_NAME} folder or its parent) with --data, or a checkpoint "
            f"/ --config of a {other[0].DATASET} model."
        ) from err


class MultiTaskDataset(torch.utils.data.Dataset):
    """Images and every task label of an official split, transformed with upstream's train or eval pipeline.

    Args:
        root: the ``PASCALContext`` / ``NYUDv2`` directory or its parent (the official ``db_root``).
        config: the model config (InvPTConfig, preset name, YAML path or dict); gives the dataset, default tasks
            and the input size.
        split: split name (``train``, ``val``: a file of the dataset's split directory).
        transforms: ``"train"`` (:func:`~invpt.data.train_transforms.build_train_transforms`), ``"eval"``
            (:func:`~invpt.data.train_transforms.build_eval_transforms`), a callable ``t(sample, rng) -> sample``,
            or None for the raw numpy sample (image ``HxWx3`` float32 0..255, labels as
            :func:`~invpt.data.labels.load_targets` returns them).
        seed: base seed of every sample's generator.
        tasks: the tasks to load (default: the config's tasks).

    Raises:
        InputError: a missing root, split file, image or label file (one error naming the first missing label file,
            how many are missing and the expected layout; upstream asserts that every label exists).
        ConfigError: unknown transforms name, or a task the dataset has no labels for.
    """

    def __init__(
        self,
        root: str | Path,
        config: ConfigLike,
        split: str = "train",
        transforms: TransformSpec = "train",
        seed: int = 0,
        tasks: Sequence[str] | None = None,
    ) -> None:
        self.config: InvPTConfig = load_config(config)
        self.tasks: tuple[str, ...] = tuple(tasks) if tasks is not None else tuple(self.config.tasks)
        spec = self.config.dataset_spec
        unknown = [t for t in self.tasks if t not in spec.task_names]
        if unknown or not self.tasks:
            raise ConfigError(
                f"Task(s) {unknown or '(none)'} cannot be loaded for dataset '{self.config.dataset}'; its tasks are "
                f"{', '.join(spec.task_names)}."
            )
        self.reader = open_split(root, self.config.dataset, split)
        self.split = split
        self.seed = int(seed)
        self.epoch = 0
        if transforms == "train":
            self.transforms: Callable[[dict, np.random.Generator], dict] | None = build_train_transforms(self.config)
        elif transforms == "eval":
            self.transforms = build_eval_transforms(self.config)
        elif transforms is None or callable(transforms):
            self.transforms = transforms
        else:
            raise ConfigError(f"transforms must be 'train', 'eval', a callable or None, got {transforms!r}.")
        self._ids = self.reader.ids()
        self._check_labels()
        logger.info("%s: %s, tasks %s", type(self).__name__, self.reader.describe(), ", ".join(self.tasks))

    def _check_labels(self) -> None:
        missing = self.reader.missing_label_files(self.tasks)
        if missing:
            raise InputError(
                f"{len(missing)} label file(s) of the {self.reader.DATASET} '{self.split}' split are missing; the "
                f"first is '{missing[0]}'. Expected {self.reader.label_layout(self.tasks)}. Extract the complete dataset "
                f"(the official loader requires every label of every task), or train fewer tasks."
            )

    def __len__(self) -> int:
        return len(self.reader)

    def ids(self) -> list[str]:
        """Sample ids in index order."""
        return list(self._ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random transforms :meth:`__getitem__` draws (see the module docstring)."""
        self.epoch = int(epoch)

    def rng(self, i: int) -> np.random.Generator:
        """The generator of item ``i`` in the current epoch: ``default_rng([seed, epoch, i])``."""
        return np.random.default_rng([self.seed, self.epoch, int(i)])

    def load_sample(self, i: int) -> dict[str, Any]:
        """The untransformed sample ``i``: image ``HxWx3`` float32 0..255, labels, ``meta`` (id, size)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        i = i % len(self)
        image = self.reader.load(i)  # stored pixel orientation, as the labels (see SplitReader.load)
        hw = (int(image.shape[0]), int(image.shape[1]))
        sample: dict[str, Any] = {"image": image.astype(np.float32)}
        sample.update(load_targets(self.reader, i, self.tasks, image_hw=hw))
        sample["meta"] = {"id": self._ids[i], "size": hw, "pad": (0, 0), "content": hw, "index": i}
        return sample

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.load_sample(i)
        if self.transforms is None:
            return sample
        return self.transforms(sample, self.rng(sample["meta"]["index"]))


def collate_multitask(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack every tensor (or array) entry of a list of samples along a new batch axis; ``meta`` becomes a list."""
    if not batch:
        raise ValueError("collate_multitask() got an empty batch")
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [s[key] for s in batch]
        if key == "meta":
            out[key] = values
        elif isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values, 0)
        else:
            out[key] = np.stack([np.asarray(v) for v in values], 0)
    return out
