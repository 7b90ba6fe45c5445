"""Calibration data: seeded, stratified samples from a dataset split, an image folder or a video,
preprocessed exactly as the manifest says, and cached.

Samples are split into a calibration set and a disjoint held-out set (parity is always measured on
images the calibrator never saw). Prepared tensors are cached in an NPZ keyed by (source files and their
size/mtime, preprocessing, sample list), so a second run with the same inputs reads the cache, and any
change to the data or the preprocessing builds a new one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from invpt.data.datasets import ImageSource, open_source
from invpt.data.transforms import preprocess
from invpt.errors import InputError
from invpt.manifest import Preprocessing

_logger = logging.getLogger(__name__)

CACHE_ENV = "INVPT_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$INVPT_CACHE_DIR`` or ``~/.cache/invpt``, plus ``/calib``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "invpt"
    return Path(root) / "calib"


@dataclass
class CalibrationData:
    """Prepared calibration and held-out inputs plus where they came from."""

    calib: np.ndarray  # [N, 3, H, W] float32
    holdout: np.ndarray  # [M, 3, H, W] float32
    calib_ids: list[str]
    holdout_ids: list[str]
    provenance: dict
    cache_hit: bool = False

    def save_npz(self, path: str | os.PathLike, input_name: str = "image") -> Path:
        """Calibration tensors as an NPZ keyed by ONNX input name (what ModelOpt reads)."""
        path = Path(path)
        np.savez(path, **{input_name: self.calib})
        return path


def stratified_sample(source: ImageSource, n: int, seed: int) -> list[int]:
    """``n`` distinct indices, spread over the source's strata in proportion to their sizes, seeded."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i in range(len(source)):
        groups.setdefault(source.strata(i), []).append(i)
    total = len(source)
    names = sorted(groups)
    quota = {g: n * len(groups[g]) / total for g in names}
    take = {g: int(quota[g]) for g in names}
    # Largest remainders get the leftover samples (ties broken by the seeded rng).
    left = n - sum(take.values())
    order = sorted(names, key=lambda g: (-(quota[g] - take[g]), rng.random()))
    for g in order[:left]:
        take[g] += 1
    picked = []
    for g in names:
        members = groups[g]
        picked += [members[j] for j in rng.choice(len(members), size=min(take[g], len(members)), replace=False)]
    rng.shuffle(picked)
    return [int(i) for i in picked]


def _fingerprint(source: ImageSource, indices: list[int]) -> list:
    """Per selected sample: id plus the file's size and mtime where the source has files (videos: the video)."""
    out = []
    ids = source.ids()  # one copy, not one per sample
    path = getattr(source, "image_path", None)
    for i in indices:
        p = Path(path(i)) if path else Path(getattr(source, "path", ""))
        st = p.stat() if p and p.exists() else None
        out.append([ids[i], str(p), st.st_size if st else None, st.st_mtime_ns if st else None])
    return out


def cache_key(source_path: Path, fingerprint: list, prep: Preprocessing, n: int, holdout: int, seed: int,
              split: str = "val") -> str:
    """sha256 over everything the prepared tensors depend on."""
    blob = json.dumps(
        {"source": str(source_path.resolve()), "split": split, "files": fingerprint, "preprocessing": asdict(prep),
         "n": n, "holdout": holdout, "seed": seed, "version": 1},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _prepare(source: ImageSource, indices: list[int], prep: Preprocessing, desc: str) -> np.ndarray:
    from tqdm import tqdm

    out = np.empty((len(indices), 3, *prep.size), dtype=np.float32)
    ids = source.ids()
    for k, i in enumerate(tqdm(indices, desc=desc, unit="img", disable=None)):
        name = getattr(source, "image_path", None)
        where = name(i) if name else f"{ids[i]} of {source.describe()}"
        img = source.load(i)
        x, _ = preprocess(img, prep.size, prep.mode, prep.mean, prep.std, source=where)
        if not np.isfinite(x).all():
            raise InputError(f"Calibration sample '{where}' contains NaN or Inf after preprocessing; remove or fix it.")
        out[k] = x
    return out


def load_calibration_data(
    path: str | os.PathLike,
    prep: Preprocessing,
    num_samples: int,
    holdout: int = 4,
    seed: int = 0,
    cache_dir: Optional[str | os.PathLike] = None,
    dataset_hint: Optional[str] = None,
    split: str = "val",
) -> CalibrationData:
    """Sample, preprocess and cache calibration (``num_samples``) and held-out (``holdout``) images from ``path``.

    Raises:
        InputError: missing/empty source, fewer images than asked, unreadable or non-finite samples.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(
            f"Calibration data '{path}' does not exist. Pass a PASCAL-Context or NYUD-v2 root (official layout), a "
            "folder of images, or a video file."
        )
    if num_samples < 1:
        raise InputError(f"--calib-samples must be >= 1, got {num_samples}.")
    source = open_source(path, dataset_hint, split=split)
    need = num_samples + holdout
    if len(source) < need:
        raise InputError(
            f"Calibration data '{path}' has {len(source)} image(s) ({source.describe()}), but {num_samples} calibration "
            f"+ {holdout} held-out samples were asked for. Add images, or lower --calib-samples/--holdout-samples."
        )
    order = stratified_sample(source, need, seed)
    calib_idx, hold_idx = order[:num_samples], order[num_samples:]
    fp = _fingerprint(source, order)
    key = cache_key(path, fp, prep, num_samples, holdout, seed, split)
    ids = source.ids()
    provenance = {
        "source": str(path),
        "source_kind": type(source).__name__,
        "split": split,
        "description": source.describe(),
        "seed": seed,
        "num_samples": num_samples,
        "holdout_samples": holdout,
        "sample_list_sha256": hashlib.sha256("\n".join(ids[i] for i in calib_idx).encode()).hexdigest(),
        "holdout_list_sha256": hashlib.sha256("\n".join(ids[i] for i in hold_idx).encode()).hexdigest(),
        "cache_key": key,
    }
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_file = cache / f"calib-{key[:24]}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                data = CalibrationData(z["calib"], z["holdout"], [ids[i] for i in calib_idx], [ids[i] for i in hold_idx],
                                       provenance, cache_hit=True)
            _logger.info("calibration cache hit: %s", cache_file)
            return data
        except (OSError, KeyError, ValueError) as err:
            _logger.warning("calibration cache %s unreadable (%s); rebuilding", cache_file, err)
    calib = _prepare(source, calib_idx, prep, "calib")
    hold = _prepare(source, hold_idx, prep, "holdout") if hold_idx else np.empty((0, 3, *prep.size), np.float32)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, calib=calib, holdout=hold)
        os.replace(tmp, cache_file)
        _logger.info("calibration cache written: %s", cache_file)
    except OSError as err:
        _logger.warning("could not write calibration cache %s (%s); continuing without", cache_file, err)
    return CalibrationData(calib, hold, [ids[i] for i in calib_idx], [ids[i] for i in hold_idx], provenance)
