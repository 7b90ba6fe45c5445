"""Plain helpers shared by the tests (no fixtures here: see conftest.py)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"


def artifact_files(artifact: Path) -> list[Path]:
    """An artifact, its manifest and its external-data files (what moves with it)."""
    from invpt.manifest import Manifest, manifest_path_for

    man_file = manifest_path_for(artifact)
    files = [Path(artifact)]
    if man_file.is_file():
        files.append(man_file)
        files += [Path(artifact).parent / name for name in Manifest.load(man_file).external_data]
    return files


def copy_artifact(artifact: Path, folder: Path, with_manifest: bool = True) -> Path:
    """Copy an artifact (with its manifest and external data unless ``with_manifest`` is False) into ``folder``.

    Shared session artifacts are read-only for every test: a test that edits, truncates or writes beside an
    artifact works on such a copy (new inodes, so the original cannot change through it)."""
    from invpt.manifest import manifest_path_for

    artifact = Path(artifact)
    folder.mkdir(parents=True, exist_ok=True)
    for f in artifact_files(artifact):
        if f == manifest_path_for(artifact) and not with_manifest:
            continue
        shutil.copyfile(f, folder / f.name)
    return folder / artifact.name


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (hidden ones too), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def photo_crops(root: Path, per_folder: int = 6, subfolders: tuple[str, ...] = ("a", "b"), size: int = 120,
                seed: int = 0) -> Path:
    """Crops of assets/chelsea.jpg (smaller than the tiny models' inputs, so a 'pad' manifest applies as is), in
    ``subfolders`` (strata for the stratified draw; ``()`` for a flat folder)."""
    import cv2
    import numpy as np

    img = cv2.imread(str(ASSETS / "chelsea.jpg"))
    rng = np.random.default_rng(seed)
    for sub in subfolders or ("",):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(per_folder):
            y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
            assert cv2.imwrite(str(root / sub / f"crop{i}.png"), img[y:y + size, x:x + size])
    return root


def write_test_image(path: Path, value: int = 90, h: int = 40, w: int = 56) -> Path:
    """A small two-tone RGB image (red channel ``value``, green in the top half) written as ``path`` (its format from
    the suffix); folders are created."""
    import cv2
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = value
    rgb[: h // 2, :, 1] = 255 - value
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path
