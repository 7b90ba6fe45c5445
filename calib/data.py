"""Calibration data: seeded, stratified samples from a dataset split, an image folder or a video,
preprocessed exactly as the manifest says, and cached.

Samples are split into a calibration set and a disjoint held-out set (parity is always measured on
images the calibrator never saw).

Geometry: each image is preprocessed as the manifest says, with one exception. When the manifest says ``pad``
and the source is an image folder, an image list or a video (not a PASCAL-Context/NYUD-v2 root, whose official
images fit the official input size), an image larger than the model input is *letterboxed* (scaled down to fit,
aspect ratio kept, then padded exactly like ``pad``) instead of refused; images that fit are padded as before
(letterbox equals pad for them). The provenance records the mode actually used (``preprocessing_mode``: ``pad``
when no image needed scaling, else ``letterbox``) and how many images were scaled (``scaled_images``). Held-out samples are images of real content: in ``pad`` mode an image much
smaller than the model input is mostly padding, so a held-out candidate with less than :data:`CONTENT_MIN` of
the input covered by image content is replaced (seeded, deterministic) by one that has enough, and data whose
calibration samples are mostly padding is refused.

Prepared tensors are cached in one NPZ per entry, keyed by (source files and their size/mtime, preprocessing,
the mode actually used, sample list). The NPZ also holds a metadata record (key, sample ids, shapes, dtype, sha256 of each tensor), and
a hit is used only after all of it checks out; anything else is reported, removed and rebuilt. Entries are
written to a temp file in the cache folder, fsynced and renamed into place, so a killed run never leaves a
half-written entry; temp files of dead runs are removed by the next run that writes there.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from invpt.data.datasets import ImageSource, SplitReader, VideoReader, open_source
from invpt.data.transforms import content_fraction, content_fraction_for, preprocess
from invpt.atomic import clean_stale_temps as _clean_stale_temps
from invpt.atomic import write_atomic
from invpt.errors import InputError, InvptError
from invpt.manifest import Preprocessing

_logger = logging.getLogger(__name__)

CACHE_ENV = "INVPT_CACHE_DIR"

#: A sample whose image content covers less than this fraction of the model input is "mostly padding".
CONTENT_MIN = 0.25
#: Version of the cache entry layout (arrays ``calib``, ``holdout``, ``meta``); part of the cache key.
CACHE_FORMAT = 3
#: Temp files of cache writes older than this are removed even if their writer's pid looks alive.
STALE_TMP_AGE_S = 3600.0

_TMP_GLOB = ".calib-*.tmp.npz"


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
              split: str = "val", mode: Optional[str] = None) -> str:
    """sha256 over everything the prepared tensors depend on.

    ``mode`` is the preprocessing mode actually used (see :func:`effective_mode`; default: the manifest's), so an
    entry prepared with letterboxing never serves a request for padded tensors, or the other way round.
    """
    blob = json.dumps(
        {"source": str(source_path.resolve()), "split": split, "files": fingerprint, "preprocessing": asdict(prep),
         "mode": mode if mode is not None else prep.mode, "n": n, "holdout": holdout, "seed": seed,
         "content_min": CONTENT_MIN, "version": CACHE_FORMAT},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def geometry_mode(source: ImageSource, prep: Preprocessing) -> str:
    """The transform applied to each image of ``source``: the manifest's mode, except 'pad' -> 'letterbox' for
    image folders, image lists and videos.

    Letterbox equals pad for an image that fits the model input, and scales a larger one down to fit (aspect ratio
    kept) instead of refusing it, so a folder of ordinary photos calibrates a 'pad' model. A PASCAL-Context/NYUD-v2
    root keeps strict 'pad' (its official images fit; one that does not is refused, as the evaluation would).
    """
    if prep.mode == "pad" and not isinstance(source, SplitReader):
        return "letterbox"
    return prep.mode


def _is_scaled(hw: list[int] | tuple[int, int], size: tuple[int, int], geometry: str) -> bool:
    """Whether an image of size ``hw`` is rescaled by ``geometry`` (letterbox: larger than the input)."""
    if geometry == "letterbox":
        return hw[0] > size[0] or hw[1] > size[1]
    if geometry == "resize":
        return tuple(hw) != tuple(size)
    return False


def effective_mode(prep: Preprocessing, geometry: str, image_hws: list) -> str:
    """The mode to record for images of sizes ``image_hws``: the manifest's mode, except that 'pad' applied as
    letterbox (see :func:`geometry_mode`) is 'pad' when no image needed scaling and 'letterbox' otherwise."""
    if prep.mode == "pad" and geometry == "letterbox":
        size = (int(prep.size[0]), int(prep.size[1]))
        return "letterbox" if any(_is_scaled(hw, size, geometry) for hw in image_hws) else "pad"
    return prep.mode


def _where(source: ImageSource, i: int, ids: list[str]) -> str:
    """The file of sample ``i`` (image sources) or its id in the source (videos), for messages."""
    name = getattr(source, "image_path", None)
    return str(name(i)) if name else f"{ids[i]} of {source.describe()}"


def _too_large_fix(prep: Preprocessing) -> str:
    """Advice for a dataset-root image larger than the model input in 'pad' mode, naming what invpt-quantize users
    can change (image folders and videos are letterboxed instead, see :func:`geometry_mode`)."""
    H, W = prep.size
    return (
        f"invpt-quantize uses the preprocessing recorded in the model's manifest ('pad' at {H}x{W}) and keeps it strict "
        "for a PASCAL-Context/NYUD-v2 root, as the official evaluation does (the official images fit 512x512, so this "
        "model's image_size is smaller than the dataset's images). Quantize a model exported with an image_size the "
        "dataset's images fit, pass the image folder itself as --calib-data (images of a folder that do not fit are "
        "letterboxed: scaled down to fit, aspect ratio kept, then padded), or re-export the model with invpt-export "
        "--preprocess letterbox (the same for every source) or invpt-export --preprocess resize (which stretches every "
        "image to the input size) and run invpt-quantize on that ONNX."
    )


def _prepare(source: ImageSource, indices: list[int], prep: Preprocessing, geometry: str,
             desc: str) -> tuple[np.ndarray, list[list[int]], list[float]]:
    """Preprocessed ``[n,3,H,W]`` float32 tensors, each sample's original ``[h, w]`` and its content fraction."""
    from tqdm import tqdm

    out = np.empty((len(indices), 3, *prep.size), dtype=np.float32)
    hws: list[list[int]] = []
    fractions: list[float] = []
    ids = source.ids()
    fix = _too_large_fix(prep)
    for k, i in enumerate(tqdm(indices, desc=desc, unit="img", disable=None)):
        where = _where(source, i, ids)
        img = source.load(i)
        x, info = preprocess(img, prep.size, geometry, prep.mean, prep.std, source=where, fix=fix)
        if not np.isfinite(x).all():
            raise InputError(f"Calibration sample '{where}' contains NaN or Inf after preprocessing; remove or fix it.")
        out[k] = x
        hws.append([int(v) for v in info.original_hw])
        fractions.append(content_fraction(info))
    return out, hws, fractions


class _SizeProbe:
    """Decoded size of source samples, memoised (a video's frames all share one size, so it decodes one)."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source
        self.uniform = isinstance(source, VideoReader)
        self.sizes: dict[int, tuple[int, int]] = {}

    def __call__(self, i: int) -> tuple[int, int]:
        key = 0 if self.uniform else i
        if key not in self.sizes:
            img = self.source.load(i)
            self.sizes[key] = (int(img.shape[0]), int(img.shape[1]))
        return self.sizes[key]


def _draw_holdout(source: ImageSource, drawn: list[int], taken: set[int], prep: Preprocessing, geometry: str,
                  seed: int) -> tuple[list[int], int]:
    """Replace held-out candidates that are mostly padding by images of real content (seeded, deterministic).

    ``drawn`` are the held-out picks of the stratified sample and ``taken`` every index of that sample; the
    replacements come from the other images, in a seeded order, preferring the stratum of the replaced sample.
    A candidate that cannot be read is skipped (with a warning). Returns the held-out indices and how many were
    replaced; when the source has too few images of real content some low-content picks stay (the caller warns,
    or refuses if none is left with real content).
    """
    if geometry not in ("pad", "letterbox") or not drawn:
        return list(drawn), 0
    probe = _SizeProbe(source)

    def real(i: int) -> bool:
        return content_fraction_for(probe(i), prep.size, geometry) >= CONTENT_MIN

    keep = [real(i) for i in drawn]
    if all(keep):
        return list(drawn), 0
    rng = np.random.default_rng([seed, 0x4F1D])  # a stream of its own: the stratified sample is unchanged
    pool = [int(j) for j in rng.permutation(len(source)) if int(j) not in taken]
    ids = source.ids()
    unreadable: set[int] = set()

    def eligible(j: int) -> bool:
        if j in unreadable:
            return False
        try:
            return real(j)
        except InputError as err:
            _logger.warning("skipping %s while drawing held-out images: %s", _where(source, j, ids), err)
            unreadable.add(j)
            return False

    out, used, replaced = [], set(), 0
    for i, ok in zip(drawn, keep):
        if ok:
            out.append(i)
            continue
        stratum = source.strata(i)
        pick = next((j for j in pool if j not in used and source.strata(j) == stratum and eligible(j)), None)
        if pick is None:
            pick = next((j for j in pool if j not in used and eligible(j)), None)
        if pick is None:
            out.append(i)
        else:
            out.append(pick)
            used.add(pick)
            replaced += 1
    if replaced:
        _logger.info("%d held-out candidate(s) were mostly padding; replaced by images with at least %d%% content",
                     replaced, round(CONTENT_MIN * 100))
    return out, replaced


def _examples(source: ImageSource, picks: list[tuple[int, list[int], float]], ids: list[str]) -> str:
    """A few samples as 'file' (HxW, n% content); ids for videos (the message names the video already)."""
    name = getattr(source, "image_path", None)
    shown = [f"'{name(i) if name else ids[i]}' ({hw[0]}x{hw[1]}, {frac:.1%} content)" for i, hw, frac in picks[:3]]
    more = f" and {len(picks) - 3} more" if len(picks) > 3 else ""
    return ", ".join(shown) + more


def _check_content(path: Path, source: ImageSource, prep: Preprocessing, geometry: str, calib_idx: list[int],
                   calib_hw: list[list[int]], calib_frac: list[float], hold_idx: list[int],
                   hold_hw: list[list[int]], hold_frac: list[float], calibrating: bool = True) -> None:
    """Refuse calibration data that is mostly padding, or held-out data without real content; warn on some."""
    ids = source.ids()
    H, W = prep.size
    low_c = [(i, hw, f) for i, hw, f in zip(calib_idx, calib_hw, calib_frac) if f < CONTENT_MIN]
    low_h = [(i, hw, f) for i, hw, f in zip(hold_idx, hold_hw, hold_frac) if f < CONTENT_MIN]
    pct = round(CONTENT_MIN * 100)
    min_hw = f"{math.ceil(H / 2)}x{math.ceil(W / 2)}"
    if geometry == "letterbox":
        how = ("which centres each image in a zero canvas and scales down only images larger than the input "
               "(small images are never enlarged, and a very elongated image fills only a strip of it)")
        if prep.mode == "pad":
            how = "applied as letterbox to this source, " + how
    else:
        how = "which centres each image unscaled in a zero canvas"
    setting = f"the model input is {H}x{W} and its manifest records '{prep.mode}' preprocessing, {how}"
    fix = (f"Calibrate on images of at least {min_hw} pixels (a folder of such images, a video, or a "
           "PASCAL-Context/NYUD-v2 root as --calib-data), or re-export the model with invpt-export --preprocess resize "
           "(which stretches every image to the input size) and run invpt-quantize on that ONNX.")
    if calibrating and len(low_c) * 2 > len(calib_idx):
        raise InputError(
            f"Calibration data '{path}' is mostly padding: {len(low_c)} of {len(calib_idx)} calibration samples have "
            f"less than {pct}% image content, e.g. {_examples(source, low_c, ids)}; {setting}. An INT8 model "
            "calibrated on padding gets activation ranges for padding, passes a check on padding and is wrong on "
            f"real images. {fix}"
        )
    if hold_idx and len(low_h) == len(hold_idx):
        raise InputError(
            f"Calibration data '{path}' has no held-out image with real content: all {len(hold_idx)} held-out samples "
            f"have less than {pct}% image content, e.g. {_examples(source, low_h, ids)}, and no image outside the "
            f"calibration set has more; {setting}. A parity check on padding would pass a model that is wrong on "
            f"real images. {fix}"
        )
    if low_c:
        _logger.warning(
            "%d of %d calibration samples of '%s' have less than %d%% image content (mostly padding in the %dx%d "
            "input), e.g. %s; calibration ranges are set mostly by the others. Larger images calibrate better.",
            len(low_c), len(calib_idx), path, pct, H, W, _examples(source, low_c, ids))
    if low_h:
        _logger.warning(
            "%d of %d held-out samples of '%s' have less than %d%% image content, e.g. %s: the source has too few "
            "other images of at least %s pixels, so the parity check rests on the other %d.",
            len(low_h), len(hold_idx), path, pct, _examples(source, low_h, ids), min_hw, len(hold_idx) - len(low_h))


def _summary(fractions: list[float]) -> Optional[dict]:
    if not fractions:
        return None
    return {"min": float(min(fractions)), "mean": float(np.mean(fractions))}


# ---------------------------------------------------------------------------------------------- cache


class _InvalidCache(Exception):
    """A cache entry that must not be used; the message is the reason."""


def _tensor_sha256(a: np.ndarray) -> str:
    """sha256 of the tensor's bytes (C order), hashed in place."""
    return hashlib.sha256(np.ascontiguousarray(a).data).hexdigest()


def _is_hw_list(v: object, n: int) -> bool:
    return (isinstance(v, list) and len(v) == n
            and all(isinstance(hw, list) and len(hw) == 2 and all(type(x) is int and x > 0 for x in hw) for hw in v))


def _is_fraction_list(v: object, n: int) -> bool:
    return (isinstance(v, list) and len(v) == n
            and all(type(x) in (int, float) and math.isfinite(x) and 0.0 <= x <= 1.0 for x in v))


def _read_cache(file: Path, key: str, calib_ids: list[str], hold_ids: list[str],
                size: tuple[int, int], mode: Optional[str] = None,
                mode_of: Optional[Callable[[list], str]] = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read and validate one entry; raises :class:`_InvalidCache` with the reason if anything is off.

    ``mode``: the preprocessing mode the entry must record (it is part of the key); ``mode_of``: maps the recorded
    image sizes to the mode they imply, which must be the same.
    """
    try:
        with np.load(file, allow_pickle=False) as z:
            missing = sorted({"calib", "holdout", "meta"} - set(z.files))
            if missing:
                raise _InvalidCache(f"missing array(s) {', '.join(missing)}")
            raw, calib, hold = z["meta"], z["calib"], z["holdout"]
    except _InvalidCache:
        raise
    except Exception as err:  # noqa: BLE001 - every way a damaged file fails to read (zip, zlib, npy, pickle refusal)
        raise _InvalidCache(f"unreadable as an NPZ cache entry ({type(err).__name__}: {err})") from None
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _InvalidCache("metadata record has the wrong type")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _InvalidCache("metadata record is not valid JSON") from None
    if not isinstance(meta, dict):
        raise _InvalidCache("metadata record is not a JSON object")
    if meta.get("format") != CACHE_FORMAT:
        raise _InvalidCache(f"entry format {meta.get('format')!r}, expected {CACHE_FORMAT}")
    if meta.get("key") != key:
        raise _InvalidCache("its recorded cache key does not match its name and inputs")
    for name, arr, ids in (("calib", calib, calib_ids), ("holdout", hold, hold_ids)):
        want = (len(ids), 3, *size)
        if meta.get(f"{name}_ids") != ids:
            got = meta.get(f"{name}_ids")
            count = len(got) if isinstance(got, list) else "no"
            raise _InvalidCache(f"its {name} sample ids ({count} recorded) are not the {len(ids)} asked for")
        if arr.dtype != np.float32:
            raise _InvalidCache(f"{name} tensor has dtype {arr.dtype}, expected float32")
        if arr.shape != want:
            raise _InvalidCache(f"{name} tensor has shape {list(arr.shape)}, expected {list(want)}")
        if meta.get("shapes", {}).get(name) != list(want) or meta.get("dtype") != "float32":
            raise _InvalidCache(f"recorded {name} shape/dtype do not match")
        if not np.isfinite(arr).all():
            raise _InvalidCache(f"{name} tensor contains NaN or Inf")
        if _tensor_sha256(arr) != meta.get("sha256", {}).get(name):
            raise _InvalidCache(f"{name} tensor does not match its recorded sha256")
        if not _is_hw_list(meta.get("image_hw", {}).get(name), len(ids)):
            raise _InvalidCache(f"recorded {name} image sizes are malformed")
        if not _is_fraction_list(meta.get("content_fraction", {}).get(name), len(ids)):
            raise _InvalidCache(f"recorded {name} content fractions are malformed")
    if mode is not None:
        if meta.get("mode") != mode:
            raise _InvalidCache(f"recorded preprocessing mode {meta.get('mode')!r}, expected {mode!r}")
        if mode_of is not None:
            implied = mode_of(meta["image_hw"]["calib"] + meta["image_hw"]["holdout"])
            if implied != mode:
                raise _InvalidCache(f"its recorded image sizes imply preprocessing mode {implied!r}, not {mode!r}")
    return calib, hold, meta


def _load_cache(file: Path, key: str, calib_ids: list[str], hold_ids: list[str],
                size: tuple[int, int], mode: Optional[str] = None,
                mode_of: Optional[Callable[[list], str]] = None) -> Optional[tuple[np.ndarray, np.ndarray, dict]]:
    """A validated hit, or None (no entry; or an invalid one, which is reported and removed)."""
    if not file.exists() and not file.is_symlink():
        return None
    try:
        if not file.is_file():
            raise _InvalidCache("it is not a regular file")
        return _read_cache(file, key, calib_ids, hold_ids, size, mode, mode_of)
    except _InvalidCache as err:
        if file.is_dir():
            _logger.warning("calibration cache entry %s is invalid (%s); leaving it, rebuilding from the source",
                            file, err)
            return None
        try:
            file.unlink()
            gone = "removed it"
        except OSError as rm_err:
            gone = f"could not remove it: {rm_err}"
        _logger.warning("calibration cache entry %s is invalid (%s); %s, rebuilding from the source", file, err, gone)
        return None


def clean_stale_temps(cache: Path) -> list[Path]:
    """Remove ``.calib-*.tmp.npz`` files of killed writers: their pid is not alive, or they are over an hour old."""
    removed = _clean_stale_temps(cache, _TMP_GLOB, STALE_TMP_AGE_S)
    if removed:
        _logger.info("removed %d temp file(s) of interrupted calibration cache writes in %s", len(removed), cache)
    return removed


def _write_cache(cache: Path, file: Path, key: str, calib: np.ndarray, hold: np.ndarray, meta: dict) -> None:
    """Write one entry atomically and durably (invpt.atomic: temp file named with our pid, fsync, rename); failures
    only warn. Temp files of killed writers are removed first."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(cache)
        record = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)
        write_atomic(file, lambda f: np.savez(f, calib=calib, holdout=hold, meta=record), "Calibration cache",
                     durable=True, base=file.stem, suffix=".tmp.npz")
        _logger.info("calibration cache written: %s", file)
    except (OSError, InvptError) as err:
        _logger.warning("could not write calibration cache %s (%s); continuing without", file, err)


def load_calibration_data(
    path: str | os.PathLike,
    prep: Preprocessing,
    num_samples: int,
    holdout: int = 4,
    seed: int = 0,
    cache_dir: Optional[str | os.PathLike] = None,
    dataset_hint: Optional[str] = None,
    split: str = "val",
    calibrating: bool = True,
    video_step: int = 1,
) -> CalibrationData:
    """Sample, preprocess and cache calibration (``num_samples``) and held-out (``holdout``) images from ``path``.

    ``calibrating=False`` (FP16: only the held-out samples are used) turns the refusal of calibration samples
    that are mostly padding into a warning; held-out samples must still have real content.

    A cache entry is used only after its metadata (key, sample ids, shapes, dtype, finiteness, sha256 of each
    tensor) checks out; an invalid entry is reported as a warning, removed, and rebuilt from the source.

    With a 'pad' manifest, an image folder or video is preprocessed as letterbox (see :func:`geometry_mode`):
    images that fit are padded, larger ones are scaled down to fit; ``provenance['preprocessing_mode']`` is
    ``'letterbox'`` when any image was scaled (else ``'pad'``) and ``provenance['scaled_images']`` counts them
    per set.

    Raises:
        InputError: missing/empty source, fewer images than asked, unreadable or non-finite samples, images of a
            dataset root larger than the model input in 'pad' mode, calibration samples that are mostly padding
            (more than half under :data:`CONTENT_MIN` content), or no held-out sample with real content.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(
            f"Calibration data '{path}' does not exist. Pass a PASCAL-Context or NYUD-v2 root (official layout), a "
            "folder of images, or a video file."
        )
    if num_samples < 1:
        raise InputError(f"--calib-samples must be >= 1, got {num_samples}.")
    if holdout < 0:
        raise InputError(f"--holdout-samples must be >= 0, got {holdout}.")
    source = open_source(path, dataset_hint, split=split, every_n=video_step)  # frame ids carry the step
    need = num_samples + holdout
    if len(source) < need:
        raise InputError(
            f"Calibration data '{path}' has {len(source)} image(s) ({source.describe()}), but {num_samples} calibration "
            f"+ {holdout} held-out samples were asked for. Add images, or lower --calib-samples/--holdout-samples."
        )
    order = stratified_sample(source, need, seed)
    calib_idx = order[:num_samples]
    geometry = geometry_mode(source, prep)
    hold_idx, redrawn = _draw_holdout(source, order[num_samples:], set(order), prep, geometry, seed)
    fp = _fingerprint(source, calib_idx + hold_idx)
    ids = source.ids()
    calib_ids, hold_ids = [ids[i] for i in calib_idx], [ids[i] for i in hold_idx]
    size = (int(prep.size[0]), int(prep.size[1]))
    cache = Path(cache_dir) if cache_dir else default_cache_dir()

    def mode_of(image_hws: list) -> str:
        return effective_mode(prep, geometry, image_hws)

    def entry(mode: str) -> tuple[str, Path]:
        k = cache_key(path, fp, prep, num_samples, holdout, seed, split, mode=mode)
        return k, cache / f"calib-{k[:24]}.npz"

    # The mode actually used is part of the key, but for 'pad' applied as letterbox it depends on the image sizes,
    # known only after decoding: look up both candidates (at most one can match these files), each validated.
    candidates = ["pad", "letterbox"] if (prep.mode == "pad" and geometry == "letterbox") else [prep.mode]
    hit = None
    for mode in candidates:
        key, cache_file = entry(mode)
        hit = _load_cache(cache_file, key, calib_ids, hold_ids, size, mode, mode_of)
        if hit is not None:
            break
    if hit is not None:
        calib, hold, meta = hit
        hws, fracs = meta["image_hw"], meta["content_fraction"]
        used = meta["mode"]
        _logger.info("calibration cache hit: %s", cache_file)
    else:
        calib, c_hw, c_frac = _prepare(source, calib_idx, prep, geometry, "calib")
        if hold_idx:
            hold, h_hw, h_frac = _prepare(source, hold_idx, prep, geometry, "holdout")
        else:
            hold, h_hw, h_frac = np.empty((0, 3, *size), np.float32), [], []
        hws, fracs = {"calib": c_hw, "holdout": h_hw}, {"calib": c_frac, "holdout": h_frac}
        used = mode_of(c_hw + h_hw)
        key, cache_file = entry(used)
        meta = None
    scaled = {name: sum(_is_scaled(hw, size, geometry) for hw in hws[name]) for name in ("calib", "holdout")}
    if prep.mode == "pad" and used == "letterbox":
        _logger.info(
            "%d calibration and %d held-out image(s) of '%s' are larger than the %dx%d model input; they were "
            "letterboxed (scaled down to fit, aspect ratio kept, then padded) instead of refused, the others padded "
            "as the manifest's 'pad' says", scaled["calib"], scaled["holdout"], path, *size)
    _check_content(path, source, prep, geometry, calib_idx, hws["calib"], fracs["calib"], hold_idx, hws["holdout"],
                   fracs["holdout"], calibrating)
    if meta is None:
        meta = {
            "format": CACHE_FORMAT, "key": key, "mode": used, "calib_ids": calib_ids, "holdout_ids": hold_ids,
            "shapes": {"calib": list(calib.shape), "holdout": list(hold.shape)}, "dtype": "float32",
            "sha256": {"calib": _tensor_sha256(calib), "holdout": _tensor_sha256(hold)},
            "image_hw": hws, "content_fraction": fracs,
        }
        _write_cache(cache, cache_file, key, calib, hold, meta)
    provenance = {
        "source": str(path),
        "source_kind": type(source).__name__,
        "split": split,
        "description": source.describe(),
        "seed": seed,
        "num_samples": num_samples,
        "holdout_samples": holdout,
        "sample_list_sha256": hashlib.sha256("\n".join(calib_ids).encode()).hexdigest(),
        "holdout_list_sha256": hashlib.sha256("\n".join(hold_ids).encode()).hexdigest(),
        "content_fraction": {"calib": _summary(fracs["calib"]), "holdout": _summary(fracs["holdout"]),
                             "threshold": CONTENT_MIN},
        "holdout_redrawn": redrawn,
        "preprocessing_mode": used,
        "scaled_images": scaled,
        "cache_key": key,
    }
    return CalibrationData(calib, hold, calib_ids, hold_ids, provenance, cache_hit=hit is not None)
