"""Image sources: the official dataset splits (spec §14), image folders and videos, behind one small interface.

Calibration needs images only; training and evaluation will reuse the same readers for labels, so the split
readers already report which label files exist for a sample (:meth:`SplitReader.sample`).

Every source implements :class:`ImageSource`: ``len(src)``, ``src.ids()`` (stable string ids),
``src.load(i)`` (``HxWx3`` uint8 RGB), ``src.strata(i)`` (a group name for stratified sampling) and
``src.describe()``. :func:`open_source` picks the right reader for a path.
"""
from __future__ import annotations

import abc
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import numpy as np

from invpt.data.transforms import IMAGE_EXTENSIONS, read_image
from invpt.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


class ImageSource(abc.ABC):
    """A finite, indexable collection of RGB images with stable ids."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of images."""

    @abc.abstractmethod
    def ids(self) -> list[str]:
        """Stable string ids, one per image, in index order (used for output file names and manifests)."""

    @abc.abstractmethod
    def load(self, i: int) -> np.ndarray:
        """Image ``i`` as ``HxWx3`` uint8 RGB."""

    @abc.abstractmethod
    def strata(self, i: int) -> str:
        """Group of image ``i`` for stratified sampling (year prefix, subdirectory, video segment...)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line saying what this source is, for logs and manifests."""

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(id, image)`` for every image in order."""
        for i, sid in enumerate(self.ids()):
            yield sid, self.load(i)


class FileListSource(ImageSource):
    """An :class:`ImageSource` backed by one image file per id (subclasses fill ``_paths`` and ``_ids``)."""

    _paths: list[Path]
    _ids: list[str]

    def __len__(self) -> int:
        return len(self._paths)

    def ids(self) -> list[str]:
        return list(self._ids)

    def image_path(self, i: int) -> Path:
        """Path of image ``i``."""
        return self._paths[i]

    def load(self, i: int) -> np.ndarray:
        return read_image(self._paths[i])


def unique_ids(preferred: Sequence[str], fallback: Sequence[str]) -> list[str]:
    """Make ids unique: ``preferred[i]`` where it is unique, else ``fallback[i]``, else a ``-2``, ``-3`` suffix.

    Used for image ids (preferred: the path without extension; fallback: with it), so ``a.jpg`` and ``a.png``
    become ``a.jpg`` and ``a.png`` while a lone ``b.jpg`` stays ``b``; entries whose fallbacks collide too (two
    ``x.jpg`` from different folders) are numbered in order: ``x``, ``x-2``. Uniqueness is case-insensitive, since
    ids name output folders that may live on a case-insensitive file system.
    """
    if len(preferred) != len(fallback):
        raise ValueError("unique_ids(): preferred and fallback differ in length")
    ids = [str(s) for s in preferred]
    changed = True
    while changed:  # each pass moves at least one id to its fallback, which never changes again
        changed = False
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(ids):
            groups.setdefault(s.casefold(), []).append(i)
        for members in groups.values():
            if len(members) < 2:
                continue
            counts = Counter(str(fallback[i]).casefold() for i in members)
            for i in members:
                if ids[i] != fallback[i] and counts[str(fallback[i]).casefold()] == 1:
                    ids[i] = str(fallback[i])
                    changed = True
    taken = {s.casefold() for s in ids}
    seen: set[str] = set()
    for i, s in enumerate(ids):
        if s.casefold() in seen:
            k = 2
            while f"{s}-{k}".casefold() in taken:
                k += 1
            ids[i] = f"{s}-{k}"
            taken.add(ids[i].casefold())
        seen.add(ids[i].casefold())
    return ids


def check_ids(ids: Sequence[str], where: str = "image source") -> None:
    """Raise ValueError (a bug, not a user error) if ids are not unique (case-insensitively) relative paths."""
    seen: dict[str, str] = {}
    for s in ids:
        parts = s.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"{where}: id {s!r} is not a clean relative path")
        key = s.casefold()
        if key in seen:
            raise ValueError(f"{where}: duplicate image id {s!r} (and {seen[key]!r}); ids must be unique")
        seen[key] = s


class ImageListReader(FileListSource):
    """An explicit list of image files with unique ids.

    Ids are paths relative to ``root`` without extension (the file name when there is no root or a file lies
    outside it); where two files would get the same id (``a.jpg`` and ``a.png``) both keep their extension, and
    remaining clashes (``x.jpg`` from two folders without a root) are numbered ``x``, ``x-2`` (see
    :func:`unique_ids`). ``ids`` gives them explicitly instead (see :func:`collect_images`). Duplicate ids are
    refused with ``ValueError``: every consumer (output folders, manifests) relies on them being unique.
    """

    def __init__(
        self, paths: Sequence[str | Path], root: str | Path | None = None, ids: Sequence[str] | None = None
    ) -> None:
        self._paths = [Path(p) for p in paths]
        self.root = Path(root) if root is not None else None
        if ids is None:
            rel = [self._relative(p) for p in self._paths]
            self._ids = unique_ids([r.with_suffix("").as_posix() for r in rel], [r.as_posix() for r in rel])
        else:
            if len(ids) != len(self._paths):
                raise ValueError(f"ImageListReader: {len(ids)} ids for {len(self._paths)} paths")
            self._ids = [str(s) for s in ids]
            rel = [Path(s) for s in self._ids]
        check_ids(self._ids, "ImageListReader")
        self._rel = rel

    def _relative(self, p: Path) -> Path:
        if self.root is not None:
            try:
                return p.relative_to(self.root)
            except ValueError:
                pass
        return Path(p.name)

    def strata(self, i: int) -> str:
        """The immediate subdirectory below ``root`` (or the first id component; "." for files directly in it)."""
        parts = self._rel[i].parts
        return parts[0] if len(parts) > 1 else "."

    def describe(self) -> str:
        where = f" under {self.root}" if self.root is not None else ""
        return f"image list{where}: {len(self)} images"


def collect_images(inputs: Sequence[str | Path]) -> ImageListReader:
    """Expand image files and folders (searched recursively) into one :class:`ImageListReader` with unique ids.

    Ids, which name each image's output folder:

    * one folder: paths relative to it without extension (``a/x.jpg`` and ``b/x.jpg`` -> ``a/x``, ``b/x``; the
      extension is kept only where two files differ by it alone: ``x.jpg``, ``x.png``);
    * one file: its stem;
    * several inputs: a folder's ids are prefixed with the folder's name, a file's id is its stem; names shared
      by several inputs are made unique the same way (extension kept where that suffices, else ``photos``,
      ``photos-2`` in input order).

    A file reached twice (the same input twice, or a file also inside a given folder) is processed once.

    Raises:
        InputError: an input does not exist, is not a regular file or folder, or is a folder without images.
    """
    from invpt.paths import describe_path_problem

    tops: list[tuple[Path, list[Path], list[str] | None]] = []  # (input, files, ids relative to it or None)
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            folder = ImageFolderReader(p)
            tops.append((p, list(folder._paths), folder.ids()))
        else:
            problem = describe_path_problem(p)
            if problem:
                raise InputError(f"Input '{p}' {problem}. Pass image files or folders of images.")
            tops.append((p, [p], None))
    if not tops:
        raise InputError("No input given. Pass image files or folders of images.")

    def _name(p: Path) -> str:  # a folder's name, also for "." and ".." (lexically, symlinks kept)
        return Path(os.path.abspath(p)).name or "root"

    def _stem(p: Path) -> str:
        return p.stem if p.stem not in ("", ".", "..") else p.name

    if len(tops) == 1:
        p, files, rel_ids = tops[0]
        ids = rel_ids if rel_ids is not None else [_stem(p)]
        return ImageListReader(files, p if rel_ids is not None else None, ids)

    labels = unique_ids(
        [_name(p) if rel is not None else _stem(p) for p, _, rel in tops],
        [_name(p) if rel is not None else p.name for p, _, rel in tops],
    )
    paths: list[Path] = []
    ids: list[str] = []
    seen: dict[Path, str] = {}
    for (p, files, rel_ids), label in zip(tops, labels):
        for k, f in enumerate(files):
            sid = label if rel_ids is None else f"{label}/{rel_ids[k]}"
            key = f.resolve()
            if key in seen:
                logger.warning("'%s' was given more than once (also as id '%s'); processing it once", f, seen[key])
                continue
            seen[key] = sid
            paths.append(f)
            ids.append(sid)
        if rel_ids is not None and label != _name(p):
            logger.info("input folder '%s' -> ids '%s/...' (another input has the name '%s')", p, label, _name(p))
    return ImageListReader(paths, None, ids)


def _list_images(root: Path) -> list[Path]:
    """Image files below ``root`` (recursive, case-insensitive extension, hidden entries skipped), sorted."""
    found = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            found.append(p)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


class ImageFolderReader(ImageListReader):
    """All ``jpg/jpeg/png/bmp`` images below a directory, recursively, sorted by relative path.

    Raises:
        InputError: the directory does not exist or holds no images.
    """

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if not root.is_dir():
            raise InputError(
                f"Image folder '{root}' does not exist or is not a directory. Pass a directory containing "
                f"{', '.join(IMAGE_EXTENSIONS)} images (searched recursively)."
            )
        paths = _list_images(root)
        if not paths:
            raise InputError(
                f"Image folder '{root}' contains no images. Expected files with extensions "
                f"{', '.join(IMAGE_EXTENSIONS)} (case-insensitive, searched recursively; hidden files are skipped)."
            )
        super().__init__(paths, root)

    def describe(self) -> str:
        return f"image folder {self.root}: {len(self)} images"


def _has_text(path: Path) -> bool:
    """Whether a (small) split file holds anything but whitespace."""
    try:
        return bool(path.read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):
        return False


def _id_stratum(sample_id: str) -> str:
    """Group for an official sample id: the part before '_' or '-' (PASCAL: the year, '2008_000123' -> '2008');
    purely numeric ids (NYUD) are grouped in blocks of 100 consecutive ids, which roughly follow the scenes."""
    for sep in ("_", "-"):
        if sep in sample_id:
            return sample_id.split(sep, 1)[0]
    if sample_id.isdigit():
        block = int(sample_id) // 100
        return f"{block * 100:0{len(sample_id)}d}+"
    return sample_id[:1]


class SplitReader(FileListSource):
    """Base of the official split readers: ids from a split file, one image file per id, optional labels.

    Subclasses set the layout as class attributes. ``root`` may be the dataset directory itself or its parent
    (the official ``db_root``), in which case ``root/<DIR_NAME>`` is used.
    """

    DATASET: str = ""
    DIR_NAME: str = ""
    IMAGE_DIR: str = ""
    IMAGE_EXT: str = ""
    SPLIT_DIR: str = ""
    #: task name -> candidate label paths relative to the root (first existing one wins), ``{id}`` substituted.
    LABELS: dict[str, tuple[str, ...]] = {}
    #: task name -> further label files the task needs besides its own ``LABELS`` entry, each a tuple of candidates
    #: (PASCAL-Context normals are masked with the pascal-context ``LabelMap``).
    EXTRA_LABELS: dict[str, tuple[tuple[str, ...], ...]] = {}
    #: the :data:`invpt.tasks.DATASETS` name of this dataset ("" for the base class).
    KEY: str = ""

    def __init__(self, root: str | Path, split: str = "val") -> None:
        root = Path(root)
        if not root.is_dir():
            raise InputError(
                f"{self.DATASET} root '{root}' does not exist or is not a directory. Expected {self._layout()}."
            )
        if not self.matches(root) and (self.matches(root / self.DIR_NAME) or (root / self.DIR_NAME).is_dir()):
            # the parent of the dataset folder (the official db_root); an incomplete dataset folder is still the one
            # meant, so its problems are reported with its own paths
            root = root / self.DIR_NAME
        if not split or any(c in split for c in "/\\") or split.startswith("."):
            raise ConfigError(f"Invalid {self.DATASET} split name {split!r}; use a plain name such as 'train' or 'val'.")
        self.root = root
        self.split = split
        split_file = root / self.SPLIT_DIR / f"{split}.txt"
        if not split_file.is_file():
            avail = sorted(p.stem for p in (root / self.SPLIT_DIR).glob("*.txt")) if (root / self.SPLIT_DIR).is_dir() else []
            hint = f"Available splits there: {', '.join(avail)}." if avail else "No split files were found there."
            raise InputError(
                f"{self.DATASET} split file '{split_file}' does not exist. Expected {self._layout()}. {hint}"
            )
        try:
            lines = split_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{self.DATASET} split file '{split_file}' could not be read ({err}).") from err
        self._ids = [line.split()[0] for line in lines if line.strip()]
        if not self._ids:
            others = sorted(p.stem for p in split_file.parent.glob("*.txt") if p != split_file and _has_text(p))
            raise InputError(
                f"{self.DATASET} split file '{split_file}' exists but is empty: it lists no sample ids (expected one id "
                f"per line, each naming <root>/{self.IMAGE_DIR}/<id>{self.IMAGE_EXT}). Write the split's ids into it, "
                f"or choose a split that has samples"
                + (f" (splits with ids there: {', '.join(others)})." if others else ".")
            )
        self._paths = [self.image_path_for(s) for s in self._ids]
        missing = [p for p in self._paths if not p.is_file()]
        if missing:
            raise InputError(
                f"{len(missing)} of {len(self._paths)} images listed in '{split_file}' are missing, the first is "
                f"'{missing[0]}'. Expected {self._layout()}; check that the dataset was extracted completely."
            )
        logger.debug("%s", self.describe())

    @classmethod
    def _layout(cls) -> str:
        return (
            f"the {cls.DATASET} layout <root>/{cls.IMAGE_DIR}/<id>{cls.IMAGE_EXT} with split files "
            f"<root>/{cls.SPLIT_DIR}/<split>.txt (one id per line), where <root> is the {cls.DIR_NAME} directory"
        )

    @classmethod
    def matches(cls, root: str | Path) -> bool:
        """Whether ``root`` looks like this dataset's directory (image dir and split dir both present)."""
        root = Path(root)
        return (root / cls.IMAGE_DIR).is_dir() and (root / cls.SPLIT_DIR).is_dir()

    def image_path_for(self, sample_id: str) -> Path:
        """Image path of an id according to the layout."""
        return self.root / self.IMAGE_DIR / f"{sample_id}{self.IMAGE_EXT}"

    def label_paths(self, i: int) -> dict[str, Path]:
        """The label files of sample ``i`` that exist, keyed by task name (absent tasks are left out)."""
        sid = self._ids[i]
        found: dict[str, Path] = {}
        for task, candidates in self.LABELS.items():
            for rel in candidates:
                p = self.root / rel.format(id=sid)
                if p.is_file():
                    found[task] = p
                    break
        return found

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` in its stored pixel orientation (EXIF orientation ignored, as upstream's PIL reader does), so
        it stays aligned with its label maps."""
        return read_image(self._paths[i], exif_orientation=False)

    def sample(self, i: int) -> dict[str, Any]:
        """``{'id', 'image_path', 'labels': {task: path}}`` for sample ``i`` (only existing label files)."""
        return {"id": self._ids[i], "image_path": self._paths[i], "labels": self.label_paths(i)}

    # ---- label files (training and evaluation) ---------------------------------------------------------------
    @classmethod
    def label_groups(cls, task: str) -> tuple[tuple[str, ...], ...]:
        """Every file ``task`` needs for one sample: a tuple of candidate groups (first existing candidate wins).

        Group 0 is the task's own file (``LABELS``); further groups are shared files it also reads
        (``EXTRA_LABELS``).

        Raises:
            ConfigError: ``task`` has no labels in this dataset.
        """
        if task not in cls.LABELS:
            raise ConfigError(
                f"{cls.DATASET} has no labels for task {task!r}; its label tasks are {', '.join(cls.LABELS)}."
            )
        return (cls.LABELS[task],) + tuple(cls.EXTRA_LABELS.get(task, ()))

    @classmethod
    def label_layout(cls, tasks: Sequence[str] | None = None) -> str:
        """The expected label layout of ``tasks`` (default: all) as one line for error messages."""
        parts = []
        for task in tasks if tasks is not None else list(cls.LABELS):
            files = [
                " or ".join(f"<root>/{c.replace('{id}', '<id>')}" for c in group) for group in cls.label_groups(task)
            ]
            parts.append(f"{task}: {' and '.join(files)}")
        return f"{cls.DATASET} labels ({'; '.join(parts)}), where <root> is the {cls.DIR_NAME} directory"

    def resolve_label(self, sample_id: str, candidates: Sequence[str]) -> Path | None:
        """The first existing file of ``candidates`` for ``sample_id``, or None if none exists."""
        for rel in candidates:
            p = self.root / rel.format(id=sample_id)
            if p.is_file():
                return p
        return None

    def label_file(self, i: int, task: str, group: int = 0) -> Path:
        """The existing file of label group ``group`` (see :meth:`label_groups`) of ``task`` for sample ``i``.

        Raises:
            InputError: no candidate of that group exists (names the file and the expected layout).
            ConfigError: ``task`` has no labels in this dataset.
        """
        candidates = self.label_groups(task)[group]
        found = self.resolve_label(self._ids[i], candidates)
        if found is None:
            expected = self.root / candidates[0].format(id=self._ids[i])
            also = "" if len(candidates) == 1 else f" (nor its alternatives {', '.join(candidates[1:])})"
            raise InputError(
                f"{task} label file '{expected}'{also} of sample '{self._ids[i]}' does not exist. Expected "
                f"{self.label_layout([task])}; check that the {self.DATASET} labels were extracted completely, or "
                f"leave the task '{task}' out."
            )
        return found

    def missing_label_files(self, tasks: Sequence[str]) -> list[Path]:
        """For every sample and every file ``tasks`` need, the expected path of each one that does not exist."""
        groups = {task: self.label_groups(task) for task in tasks}
        missing: list[Path] = []
        seen: set[Path] = set()
        for sid in self._ids:
            for task in tasks:
                for candidates in groups[task]:
                    if self.resolve_label(sid, candidates) is None:
                        p = self.root / candidates[0].format(id=sid)
                        if p not in seen:
                            seen.add(p)
                            missing.append(p)
        return missing

    def strata(self, i: int) -> str:
        return _id_stratum(self._ids[i])

    def describe(self) -> str:
        return f"{self.DATASET} '{self.split}' split at {self.root}: {len(self)} images"


class PascalContextReader(SplitReader):
    """PASCAL-Context (``PASCALContext/``): ``JPEGImages/<id>.jpg``, ids in ``ImageSets/Context/<split>.txt``.

    Label files (spec §14): ``semseg`` (VOC12, else pascal-context PNG), ``human_parts`` (.mat), ``sal`` and
    ``normals`` (distilled PNGs), ``edge`` (the pascal-context ``LabelMap`` .mat the edges are derived from). The
    normals also need that ``LabelMap``, which masks them to the valid classes (``EXTRA_LABELS``).
    """

    DATASET = "PASCAL-Context"
    KEY = "pascal_context"
    DIR_NAME = "PASCALContext"
    IMAGE_DIR = "JPEGImages"
    IMAGE_EXT = ".jpg"
    SPLIT_DIR = "ImageSets/Context"
    LABELS = {
        "semseg": ("semseg/VOC12/{id}.png", "semseg/pascal-context/{id}.png"),
        "human_parts": ("human_parts/{id}.mat",),
        "sal": ("sal_distill/{id}.png",),
        "normals": ("normals_distill/{id}.png",),
        "edge": ("pascal-context/trainval/{id}.mat",),
    }
    EXTRA_LABELS = {"normals": (("pascal-context/trainval/{id}.mat",),)}


class NYUDReader(SplitReader):
    """NYUD-v2 (``NYUDv2/``): ``images/<id>.png``, ids in ``gt_sets/<split>.txt``.

    Label files (spec §14): ``semseg`` (segmentation PNG, 0..40 shifted by -1), ``depth`` (.npy metres),
    ``normals`` (PNG) and ``edge`` (PNG).
    """

    DATASET = "NYUD-v2"
    KEY = "nyud_v2"
    DIR_NAME = "NYUDv2"
    IMAGE_DIR = "images"
    IMAGE_EXT = ".png"
    SPLIT_DIR = "gt_sets"
    LABELS = {
        "semseg": ("segmentation/{id}.png",),
        "depth": ("depth/{id}.npy",),
        "normals": ("normals/{id}.png",),
        "edge": ("edge/{id}.png",),
    }


class VideoReader(ImageSource):
    """Every ``every_n``-th frame of a video file, decoded with ``cv2.VideoCapture`` as uint8 RGB.

    Iterating decodes sequentially (fast); :meth:`load` seeks only when the requested frame is not the next one.
    Ids are ``frame_<index>`` with the index of the frame in the file. Strata are ten equal time segments.
    Use it as a context manager or call :meth:`close` to release the file.

    Raises:
        InputError: the file does not exist, cannot be opened, or has no frames.
        ConfigError: ``every_n`` is smaller than 1.
    """

    def __init__(self, path: str | Path, every_n: int = 1) -> None:
        self.path = Path(path)
        if int(every_n) < 1:
            raise ConfigError(f"every_n must be at least 1 (keep every n-th frame), got {every_n}.")
        self.every_n = int(every_n)
        if not self.path.is_file():
            raise InputError(
                f"Video '{self.path}' does not exist or is not a file. Pass a video file "
                f"({', '.join(VIDEO_EXTENSIONS)})."
            )
        self._cap = cv2.VideoCapture(str(self.path))
        if not self._cap.isOpened():
            raise InputError(
                f"Video '{self.path}' could not be opened by OpenCV. Check that it is a video "
                f"({', '.join(VIDEO_EXTENSIONS)}) in a codec this OpenCV build supports, or extract the frames "
                "to an image folder first."
            )
        self.fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        if count <= 0:
            count = self._count_frames()
        self.frame_count = count
        self._next = 0
        if count <= 0:
            self.close()
            raise InputError(f"Video '{self.path}' contains no decodable frames; check that the file is not truncated.")

    def _count_frames(self) -> int:
        """Count frames by grabbing them all (only when the container does not report a frame count)."""
        n = 0
        while self._cap.grab():
            n += 1
        self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
        return n

    def close(self) -> None:
        """Release the video file."""
        cap = getattr(self, "_cap", None)
        if cap is not None:
            cap.release()
            self._cap = None

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def _capture(self) -> cv2.VideoCapture:
        if self._cap is None:
            self._cap = cv2.VideoCapture(str(self.path))
            self._next = 0
        return self._cap

    def __len__(self) -> int:
        return math.ceil(self.frame_count / self.every_n)

    def frame_index(self, i: int) -> int:
        """Index in the file of the ``i``-th kept frame."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"frame {i} out of range for {len(self)} kept frames")
        return (i % len(self)) * self.every_n

    def ids(self) -> list[str]:
        width = max(6, len(str(self.frame_count)))
        return [f"frame_{k * self.every_n:0{width}d}" for k in range(len(self))]

    def load(self, i: int) -> np.ndarray:
        f = self.frame_index(i)
        cap = self._capture()
        if f != self._next:
            cap.set(cv2.CAP_PROP_POS_FRAMES, f)
        ok, bgr = cap.read()
        if not ok or bgr is None:
            self._next = -1
            raise InputError(
                f"Frame {f} of video '{self.path}' (reported {self.frame_count} frames) could not be decoded; the "
                "file may be truncated or its frame count wrong. Re-encode it or extract the frames to a folder."
            )
        self._next = f + 1
        return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        """Decode sequentially from the start, yielding every ``every_n``-th frame; stops at the real end."""
        cap = self._capture()
        cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
        ids = self.ids()
        f = 0
        for k, sid in enumerate(ids):
            while f < k * self.every_n:
                if not cap.grab():
                    self._next = -1
                    return
                f += 1
            ok, bgr = cap.read()
            if not ok or bgr is None:
                self._next = -1
                return
            f += 1
            self._next = f
            yield sid, np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def strata(self, i: int) -> str:
        """Time segment ``t0``..``t9`` of kept frame ``i``."""
        n = len(self)
        return f"t{(i % n) * 10 // n}"

    def describe(self) -> str:
        fps = f" at {self.fps:.2f} fps" if self.fps > 0 else ""
        return f"video {self.path}: {self.frame_count} frames{fps}, every {self.every_n} -> {len(self)} images"


_HINTS = ("pascal_context", "nyud_v2", "folder", "video", "image")


def open_source(
    path: str | Path,
    dataset_hint: str | None = None,
    *,
    split: str = "val",
    every_n: int = 1,
) -> ImageSource:
    """Open ``path`` with the reader that fits it and return it as an :class:`ImageSource`.

    Detection (unless ``dataset_hint`` forces one of ``pascal_context``, ``nyud_v2``, ``folder``, ``video``,
    ``image``): a directory with ``JPEGImages`` and ``ImageSets/Context`` (or containing ``PASCALContext/`` with
    them) is PASCAL-Context; one with ``images`` and ``gt_sets`` (or ``NYUDv2/``) is NYUD-v2; any other directory
    is an image folder (a ``db_root`` holding both datasets needs the hint); a file with a video extension is a video; an image file is a one-image source.

    Args:
        path: dataset root, directory, video or image file.
        dataset_hint: force a reader (the dataset names match :data:`invpt.tasks.DATASETS`).
        split: split for the dataset readers.
        every_n: frame step for videos.

    Raises:
        InputError: the path does not exist or is of an unsupported kind.
        ConfigError: unknown ``dataset_hint``, or a directory holding both official datasets without a hint.
    """
    p = Path(path)
    if dataset_hint is not None and dataset_hint not in _HINTS:
        raise ConfigError(f"Unknown dataset hint {dataset_hint!r}; use one of {', '.join(_HINTS)} or leave it unset.")
    if not p.exists():
        raise InputError(
            f"Input '{p}' does not exist. Pass a PASCAL-Context or NYUD-v2 root, an image folder, a video "
            f"({', '.join(VIDEO_EXTENSIONS)}) or an image ({', '.join(IMAGE_EXTENSIONS)})."
        )
    hint = dataset_hint
    if hint is None:
        if p.is_file():
            hint = "video" if p.suffix.lower() in VIDEO_EXTENSIONS else "image"
        else:
            found = [
                name
                for name, reader in (("pascal_context", PascalContextReader), ("nyud_v2", NYUDReader))
                if reader.matches(p) or reader.matches(p / reader.DIR_NAME)
            ]
            if len(found) > 1:
                raise ConfigError(
                    f"'{p}' holds both the PASCAL-Context and the NYUD-v2 layouts; choose one with --dataset "
                    "pascal_context or --dataset nyud_v2 (dataset_hint in Python), or pass the dataset's own directory."
                )
            hint = found[0] if found else "folder"
    src: ImageSource
    if hint == "pascal_context":
        src = PascalContextReader(p, split)
    elif hint == "nyud_v2":
        src = NYUDReader(p, split)
    elif hint == "video":
        src = VideoReader(p, every_n)
    elif hint == "folder":
        src = ImageFolderReader(p)
    else:
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
            raise InputError(
                f"Input '{p}' is neither a directory, a video ({', '.join(VIDEO_EXTENSIONS)}) nor an image "
                f"({', '.join(IMAGE_EXTENSIONS)}). Convert it or pass a directory of images."
            )
        src = ImageListReader([p], p.parent)
    logger.info("input: %s", src.describe())
    return src
