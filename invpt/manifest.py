"""The manifest: one JSON file next to every artifact, read by every later stage and by C++ apps.

``model.onnx`` gets ``model.json``; ``model.fp16.onnx`` gets ``model.fp16.json``; any other artifact gets its
full name plus ``.json`` (``model.fp16.plan`` -> ``model.fp16.plan.json``), so manifests of different artifact
kinds never collide. A manifest records what the artifact is (I/O names, shapes, dtypes), how to feed it
(preprocessing), how to read its outputs (per-task decoding, class names), which config built it, where it
came from (sha256 of the artifact and its parent, calibration provenance), the tool versions, and the
verification results. Later stages read it instead of re-guessing from flags.

The schema is versioned: a reader meets an unknown ``schema_version`` with an error, never a guess.
Enum-like values are stored as names (``"fp16"``), never as library enum integers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from invpt.config import InvPTConfig, load_config
from invpt.errors import ManifestError

SCHEMA = "invpt.manifest"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output. ``shape`` uses a string (e.g. ``"batch"``) for a dynamic dimension."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    task: Optional[str] = None
    decode: Optional[str] = None  # TaskSpec.kind: label | saliency | boundary | normals | depth
    class_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB uint8 image becomes the ``image`` input: x/255, (x-mean)/std, then pad or resize to size."""

    size: tuple[int, int]
    mode: str = "pad"  # pad: centred zero pad (official eval); resize: stretch (inference.py); letterbox: shrink to fit, pad
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    color: str = "RGB"
    scale: float = 1.0 / 255.0
    layout: str = "NCHW"
    pad_value: float = 0.0  # after normalisation (= the mean colour)


@dataclass(frozen=True)
class Manifest:
    """Description of one artifact (an ONNX file or an engine). Written as JSON next to it."""

    artifact: str  # file name, relative to the manifest's folder
    kind: str  # "onnx" | "engine"
    precision: str  # "fp32" | "fp16" | "int8"
    config: dict[str, Any]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    preprocessing: Preprocessing
    sha256: str = ""
    size_bytes: int = 0
    external_data: tuple[str, ...] = ()
    parent: Optional[dict[str, str]] = None  # {"path": ..., "sha256": ..., "kind": "checkpoint"|"onnx"}
    export: dict[str, Any] = field(default_factory=dict)
    precision_policy: Optional[dict[str, Any]] = None
    calibration: Optional[dict[str, Any]] = None
    verification: Optional[dict[str, Any]] = None
    build: Optional[dict[str, Any]] = None  # engines: backend and version, targets, profile shapes, options, timings
    timings: Optional[dict[str, Any]] = None  # the stage's PhaseTimer: seconds and peak RSS per phase
    versions: dict[str, str] = field(default_factory=dict)
    command: str = ""
    created: str = ""
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    # ---- convenience -------------------------------------------------------------------------
    @property
    def model_config(self) -> InvPTConfig:
        return load_config(self.config)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(o.task for o in self.outputs if o.task)

    def replace(self, **changes: Any) -> "Manifest":
        return dataclasses.replace(self, **changes)

    def parent_path(self, manifest_file: str | os.PathLike) -> Optional[Path]:
        """Where the parent artifact (checkpoint or ONNX) should be, or None if none is recorded.

        ``parent.path`` is relative to the folder of ``manifest_file`` (the manifest's own location, never the
        working directory), so a folder moved as a whole still resolves. When that file is missing and the
        manifest also records ``absolute_path`` (where the parent was at build time), that is used if it exists.
        The caller still compares ``parent.sha256``, which is what identifies the parent.
        """
        parent = self.parent or {}
        rel = parent.get("path")
        if not rel:
            return None
        here = Path(manifest_file).parent / rel if not Path(rel).is_absolute() else Path(rel)
        absolute = parent.get("absolute_path")
        if not here.exists() and absolute and Path(absolute).exists():
            return Path(absolute)
        return here

    # ---- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "manifest") -> "Manifest":
        if d.get("schema") != SCHEMA:
            raise ManifestError(f"{source} is not an invpt manifest (schema {d.get('schema')!r}, expected {SCHEMA!r}).")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ManifestError(
                f"{source} has manifest schema_version {d.get('schema_version')}; this invpt reads version "
                f"{SCHEMA_VERSION}. Re-export with this invpt version (invpt-export)."
            )
        try:
            d = dict(d)
            d["inputs"] = tuple(_tensor_info(t) for t in d["inputs"])
            d["outputs"] = tuple(_tensor_info(t) for t in d["outputs"])
            p = dict(d["preprocessing"])
            for k in ("size", "mean", "std"):
                p[k] = tuple(p[k])
            d["preprocessing"] = Preprocessing(**p)
            d["external_data"] = tuple(d.get("external_data", ()))
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in d.items() if k in known})
        except (KeyError, TypeError) as err:
            raise ManifestError(f"{source} is missing or has malformed field {err}; regenerate it with invpt-export.") from err

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file, then rename)."""
        from invpt.atomic import write_atomic

        return write_atomic(path, lambda f: f.write((self.to_json() + "\n").encode()), "Manifest", ManifestError)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        path = Path(path)
        if not path.is_file():
            raise ManifestError(
                f"Manifest '{path}' does not exist. Every invpt artifact has a JSON manifest next to it; export the "
                "model with invpt-export (which writes model.onnx and model.json) instead of using a bare ONNX file."
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ManifestError(f"Manifest '{path}' is not readable JSON ({err}); regenerate it with invpt-export.") from err
        return cls.from_dict(data, source=f"Manifest '{path}'")


def _tensor_info(d: dict[str, Any]) -> TensorInfo:
    d = dict(d)
    d["shape"] = tuple(d["shape"])
    d["class_names"] = tuple(d.get("class_names", ()))
    return TensorInfo(**d)


def manifest_path_for(artifact: str | os.PathLike) -> Path:
    """The manifest beside ``artifact``.

    An ONNX file drops its ``.onnx``: ``dir/model.onnx`` -> ``dir/model.json``, ``dir/model.fp16.onnx`` ->
    ``dir/model.fp16.json``. Every other artifact keeps its full name: ``dir/model.fp16.plan`` ->
    ``dir/model.fp16.plan.json``, ``ckpt.pth`` -> ``ckpt.pth.json``. So the manifest of an engine built from
    ``model.fp16.onnx`` can never be the ONNX file's manifest (``model.fp16.json``).
    """
    p = Path(artifact)
    if p.suffix == ".onnx":
        return p.with_suffix(".json")
    return p.with_name(p.name + ".json")


def parent_record(kind: str, parent: str | os.PathLike, manifest_dir: str | os.PathLike, sha256: str) -> dict[str, str]:
    """The ``parent`` entry of a manifest written into ``manifest_dir``: ``path`` relative to that folder (so the
    folder can be moved as a whole), ``absolute_path`` where it is now, and its ``sha256`` (what identifies it)."""
    absolute = Path(os.path.abspath(parent))
    try:
        rel = os.path.relpath(absolute, os.path.abspath(manifest_dir))
    except ValueError:  # another drive (Windows)
        rel = str(absolute)
    return {"kind": kind, "path": rel, "absolute_path": str(absolute), "sha256": sha256}


def load_manifest_for(artifact: str | os.PathLike) -> Manifest:
    """Read the manifest that sits next to ``artifact``; a clear error if there is none."""
    return Manifest.load(manifest_path_for(artifact))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed (works for multi-GB checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tool_versions(*extra: str) -> dict[str, str]:
    """Versions of python, invpt, torch, timm, numpy and any importable ``extra`` packages."""
    from importlib import metadata

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("invpt", "torch", "timm", "numpy", *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def io_for_config(cfg: InvPTConfig, batch: int | str = 1, tasks: Optional[tuple[str, ...]] = None) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """Inputs and outputs of an exported model: ``image`` in, one raw map per task out (named by the task)."""
    h, w = cfg.image_size
    inputs = (TensorInfo("image", "float32", (batch, 3, h, w)),)
    outputs = tuple(
        TensorInfo(t.name, "float32", (batch, t.channels, h, w), task=t.name, decode=t.kind, class_names=t.class_names)
        for t in cfg.task_specs
        if tasks is None or t.name in tasks
    )
    return inputs, outputs
