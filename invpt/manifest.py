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
from collections.abc import Mapping
from typing import Any, ClassVar, Optional, Union, get_args, get_origin, get_type_hints

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


# ---- typed sections ------------------------------------------------------------------------------------------------
# Each stage writes one section. A section is a frozen dataclass whose fields are the keys that stage writes, typed
# and checked when a manifest is read (a string where a number belongs is refused, naming the section and field).
# Keys a newer invpt of the same schema version adds are kept in ``extra`` and written back unchanged. A section is
# also a read-only Mapping over its JSON form (``section["key"]``, ``section.get("key")``), so code and C++ readers
# that treat the JSON as a dict see exactly what is in the file. Only fields that differ from their default are
# written, so an empty section round-trips to ``{}``.


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against a simple annotation (str, int, float, bool, tuple[...], dict, Optional/Union)."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin is Union:
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ManifestError as err:
                errors.append(err)
        raise errors[0] if errors else ManifestError(f"{where} must not be null")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ManifestError(f"{where} must be a list, not {type(value).__name__} ({value!r:.60})")
        return tuple(value)
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ManifestError(f"{where} must be an object, not {type(value).__name__} ({value!r:.60})")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ManifestError(f"{where} must be true or false, not {value!r:.60}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ManifestError(f"{where} must be an integer, not {value!r:.60}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ManifestError(f"{where} must be a number, not {value!r:.60}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ManifestError(f"{where} must be a string, not {value!r:.60}")
        return value
    return value


class Section(Mapping):
    """Base of the typed manifest sections (see the comment above)."""

    NAME: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            checked = _check_type(value, hints[f.name], f"manifest section '{self.NAME}' field '{f.name}'")
            object.__setattr__(self, f.name, checked)
        if not isinstance(self.extra, Mapping):  # type: ignore[attr-defined]
            raise ManifestError(f"manifest section '{self.NAME}': extra keys must be an object")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | "Section") -> "Section":
        """A section from its JSON form; unknown keys go to ``extra``."""
        if isinstance(d, cls):
            return d
        if isinstance(d, Section) or not isinstance(d, Mapping):
            raise ManifestError(f"manifest section '{cls.NAME}' must be an object, not {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        extra.update(d.get("extra", {}) if isinstance(d.get("extra"), Mapping) else {})
        return cls(**known, extra=extra)  # type: ignore[call-arg]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if value != default:
                out[f.name] = value
        out.update(self.extra)  # type: ignore[attr-defined]
        return json.loads(json.dumps(out))

    # read-only Mapping over the JSON form
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self):
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    __hash__ = None  # type: ignore[assignment]  # dicts inside: not hashable


@dataclass(frozen=True, eq=True)
class ExportSection(Section):
    """How ``invpt-export`` made the ONNX file."""

    NAME: ClassVar[str] = "export"
    exporter: str = ""
    opset: Optional[int] = None
    batch: Union[int, str, None] = None  # an int, or "dynamic"
    tasks: tuple[str, ...] = ()
    simplified: Optional[dict[str, Any]] = None  # onnxslim: applied, nodes before/after; None when not run
    op_census: dict[str, int] = field(default_factory=dict)
    resize_nodes: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=True)
class PrecisionPolicySection(Section):
    """Which nodes ``invpt-quantize`` kept in FP32 and why (the policy, its terms, the graph audit)."""

    NAME: ClassVar[str] = "precision_policy"
    name: str = ""
    description: str = ""
    keep_terms: tuple[str, ...] = ()
    keep_op_types: tuple[str, ...] = ()
    kept_node_counts: dict[str, int] = field(default_factory=dict)
    kept_nodes: tuple[str, ...] = ()
    graph: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=True)
class CalibrationSection(Section):
    """Where the INT8 calibration samples came from: source, ids, seed, counts, padding share, cache key, method."""

    NAME: ClassVar[str] = "calibration"
    method: str = ""
    tool: str = ""
    per_node: Optional[bool] = None
    source: str = ""
    source_kind: str = ""
    split: Optional[str] = None
    description: str = ""
    seed: Optional[int] = None
    num_samples: Optional[int] = None
    holdout_samples: Optional[int] = None
    sample_ids: tuple[str, ...] = ()
    sample_list_sha256: str = ""
    holdout_list_sha256: str = ""
    content_fraction: dict[str, Any] = field(default_factory=dict)
    holdout_redrawn: Any = None
    preprocessing_mode: str = ""
    scaled_images: dict[str, int] = field(default_factory=dict)  # images scaled down (letterbox), per set
    cache_key: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=True)
class VerificationSection(Section):
    """Parity of the artifact against its reference (ONNX) or the pre-build precision check (engines)."""

    NAME: ClassVar[str] = "verification"
    passed: Optional[bool] = None
    reference: str = ""
    backend: str = ""
    samples: Optional[int] = None
    tolerance: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, Any] = field(default_factory=dict)
    task_agreement: Optional[dict[str, Any]] = None
    inputs: Any = None
    holdout_ids: tuple[str, ...] = ()
    precision_check: Optional[dict[str, Any]] = None  # engines: the pre-build network precision check
    engine_inspector: Optional[dict[str, Any]] = None
    onnx_verification_passed: Optional[bool] = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=True)
class BuildSection(Section):
    """How an engine was built: backend and version, targets, profile shapes, options, plan facts, timings."""

    NAME: ClassVar[str] = "build"
    backend: str = ""
    backend_name: str = ""
    backend_version: str = ""
    strongly_typed: Optional[bool] = None
    targets: dict[str, Any] = field(default_factory=dict)
    profile_shapes: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    source_onnx: dict[str, Any] = field(default_factory=dict)
    prepared: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    peak_rss_bytes: Optional[int] = None
    peak_rss_before_build_bytes: Optional[int] = None
    peak_rss_note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


SECTIONS: dict[str, type[Section]] = {
    cls.NAME: cls for cls in (ExportSection, PrecisionPolicySection, CalibrationSection, VerificationSection, BuildSection)
}


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
    # Typed sections (a plain dict given here is converted; see Section).
    export: ExportSection = field(default_factory=ExportSection)
    precision_policy: Optional[PrecisionPolicySection] = None
    calibration: Optional[CalibrationSection] = None
    verification: Optional[VerificationSection] = None
    build: Optional[BuildSection] = None  # engines
    timings: Optional[dict[str, Any]] = None  # the stage's PhaseTimer: seconds and peak RSS per phase
    versions: dict[str, str] = field(default_factory=dict)
    command: str = ""
    created: str = ""
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if value is None and name != "export":
                continue
            object.__setattr__(self, name, cls.from_dict(value if value is not None else {}))

    # ---- convenience -------------------------------------------------------------------------
    @property
    def model_config(self) -> InvPTConfig:
        return load_config(self.config)

    @property
    def verified(self) -> bool:
        """True only when the artifact's verification ran and passed."""
        return self.verification is not None and self.verification.passed is True

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
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Section):
                value = value.to_dict()
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            elif isinstance(value, tuple):
                value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
            out[f.name] = value
        return json.loads(json.dumps(out))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "manifest") -> "Manifest":
        if not isinstance(d, dict):  # valid JSON, but a list, a string, a number or null
            raise ManifestError(f"{source} is not an invpt manifest (a JSON {type(d).__name__}, not an object with "
                                f"schema {SCHEMA!r}); regenerate it with the stage that wrote it.")
        if d.get("schema") != SCHEMA:
            raise ManifestError(f"{source} is not an invpt manifest (schema {d.get('schema')!r}, expected {SCHEMA!r}).")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ManifestError(
                f"{source} has manifest schema_version {d.get('schema_version')}; this invpt reads version "
                f"{SCHEMA_VERSION}. Re-export with this invpt version (invpt-export)."
            )
        if "config" in d and not isinstance(d["config"], dict):
            raise ManifestError(f"{source} has a malformed field 'config' (a JSON {type(d['config']).__name__}, not the "
                                "model config object); regenerate it with the stage that wrote it.")
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
        except ManifestError as err:
            raise ManifestError(f"{source}: {err}; regenerate it with the stage that wrote it.") from err

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
