"""The engine stage end to end: (checkpoint ->) ONNX (-> FP16/INT8 ONNX) -> checked network -> plan + manifest.

One code path serves TensorRT 10.3-11.x and TensorRT-RTX 1.x: precision lives in the ONNX (AutoCast casts or
Q/DQ nodes), the network is always created strongly typed, and capabilities are detected on the module. Before
building, the parsed network is checked against the manifest (:mod:`invpt.engines.precision`); after building,
on a machine whose GPU can load the engine, the engine inspector's per-layer precisions are recorded.

The plan is a plain serialized engine (no header: trtexec, ``tensorrt_rtx`` and C++ apps load it unchanged); its
manifest ``<plan>.json`` says what it is. Both are staged and published atomically, manifest before plan.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from invpt.artifacts import check_output, publish, staging_dir, verified_manifest
from invpt.engines.backend import Backend, load_backend
from invpt.errors import DependencyError, InputError, ManifestError, ToolError
from invpt.manifest import Manifest, manifest_path_for, now_iso, parent_record, sha256_file, tool_versions

_logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
_DISTRIBUTIONS = {"tensorrt": "tensorrt", "rtx": "tensorrt-rtx-cu13"}
HARDWARE_COMPAT = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}
RTX_DEFAULT_TARGETS = "Ampere+ RTX (the backend's default set: 8.0, 8.6, 8.9, 12.x)"


@dataclass
class BuildOptions:
    """Every build option; recorded (by name, never as a library enum integer) in the engine manifest."""

    batch: Optional[tuple[int, int, int]] = None  # min, opt, max for a dynamic-batch ONNX
    workspace_gib: Optional[float] = None
    opt_level: Optional[int] = None
    timing_cache: Optional[str] = None
    compute_capabilities: tuple[str, ...] = ()  # "86", "89", "120" (TensorRT-RTX)
    version_compatible: bool = False
    hardware_compat: Optional[str] = None  # none | ampere+ | same-cc (enterprise TensorRT)
    dla_core: Optional[int] = None
    refittable: bool = False
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch"] = list(self.batch) if self.batch else None
        d["compute_capabilities"] = list(self.compute_capabilities)
        return d


@dataclass
class BuildResult:
    plan_path: Path
    manifest_path: Path
    manifest: Manifest
    onnx_path: Path
    precision_report: dict
    timings: dict = field(default_factory=dict)


# ---- options ------------------------------------------------------------------------------------------------
def _cc_member(backend: Backend, text: str) -> str:
    t = text.strip().lower().replace("sm_", "").replace("sm", "").replace(".", "")
    name = f"SM{t}"
    if not t.isdigit() or not hasattr(backend.trt.ComputeCapability, name):
        known = sorted(int(n[2:]) for n in dir(backend.trt.ComputeCapability) if n.startswith("SM") and n[2:].isdigit())
        raise InputError(f"--compute-capability '{text}' is not a target {backend.describe()} can build for; it knows "
                         f"{','.join(str(k) for k in known)} (e.g. --compute-capability 86,89).")
    return name


def validate_options(backend: Backend, opts: BuildOptions) -> None:
    """Refuse, with a one-line reason, every option this backend or version lacks (never drop one silently)."""
    name = backend.describe()
    if opts.compute_capabilities:
        if not backend.has_compute_capability_targets:
            raise InputError(f"--compute-capability is not available with {name}: it builds for the GPU of the build "
                             "machine; for an engine that also runs on newer GPUs use --hardware-compat ampere+, or "
                             "build RTX-GPU engines with --backend rtx.")
        for cc in opts.compute_capabilities:
            _cc_member(backend, cc)
    if opts.hardware_compat and opts.hardware_compat != "none":
        member = HARDWARE_COMPAT.get(opts.hardware_compat)
        if not backend.has_hardware_compat:
            raise InputError(f"--hardware-compat is not available with {name}" + (
                ": TensorRT-RTX has no hardware-compatibility levels; it targets compute capabilities, choose them "
                "with --compute-capability (e.g. 80,86,89,120)." if backend.is_rtx else
                ": this TensorRT version has no IBuilderConfig.hardware_compatibility_level."))
        levels = [k for k, v in HARDWARE_COMPAT.items() if hasattr(backend.trt.HardwareCompatibilityLevel, v)]
        if member is None or opts.hardware_compat not in levels:
            raise InputError(f"--hardware-compat {opts.hardware_compat} is not a level {name} has "
                             f"(levels: {', '.join(levels)}).")
    if opts.version_compatible and not backend.has_version_compatible:
        raise InputError(f"--version-compatible is not available with {name}" + (
            ": TensorRT-RTX ships no lean runtime to embed in a version-compatible plan." if backend.is_rtx else
            ": this TensorRT version has no BuilderFlag.VERSION_COMPATIBLE."))
    if opts.timing_cache and not backend.has_timing_cache:
        raise InputError(f"--timing-cache is not available with {name}" + (
            ": TensorRT-RTX ignores timing caches (its timing-cache calls are no-ops); leave --timing-cache out."
            if backend.is_rtx else ": this TensorRT version has no timing-cache API."))
    if opts.refittable and not backend.has_refit:
        raise InputError(f"--refittable is not available with {name}: it has no BuilderFlag.REFIT.")
    if opts.refittable and backend.is_rtx and not _cuda_devices():
        raise InputError(f"--refittable needs a CUDA GPU with {name}: its refittable builds compile kernels on the "
                         "device (a CPU-only build fails inside TensorRT); build on the RTX machine, or leave "
                         "--refittable out.")
    if opts.dla_core is not None:
        if backend.is_rtx or not backend.has_dla:
            raise InputError(f"--dla-core is not available with {name}: DLA cores exist on Jetson AGX Orin/Xavier and "
                             "are driven by the enterprise TensorRT that JetPack installs; build there with "
                             "--backend tensorrt.")
        cores = backend.trt.Builder(backend.logger()).num_DLA_cores
        if opts.dla_core < 0 or opts.dla_core >= cores:
            raise InputError(f"--dla-core {opts.dla_core}: this machine's {name} reports {cores} DLA core(s)"
                             + (f" (valid: 0-{cores - 1})." if cores else "; DLA exists on Jetson AGX Orin/Xavier only."))
    if opts.opt_level is not None:
        if not backend.has("IBuilderConfig", "builder_optimization_level"):
            raise InputError(f"--opt-level is not available with {name}: it has no builder_optimization_level.")
        if not 0 <= opts.opt_level <= 5:
            raise InputError(f"--opt-level must be 0-5 (TensorRT's builder optimization level; default 3), got {opts.opt_level}.")
    if opts.workspace_gib is not None and not opts.workspace_gib > 0:
        raise InputError(f"--workspace must be a positive number of GiB, got {opts.workspace_gib}.")
    if opts.batch is not None:
        lo, opt, hi = opts.batch
        if not 1 <= lo <= opt <= hi:
            raise InputError(f"--batch MIN,OPT,MAX must satisfy 1 <= MIN <= OPT <= MAX, got {lo},{opt},{hi}.")


def parse_batch(text: Optional[str]) -> Optional[tuple[int, int, int]]:
    """``"1,4,8"`` -> (1, 4, 8); ``"4"`` -> (4, 4, 4)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise InputError(f"--batch expects MIN,OPT,MAX (e.g. 1,4,8) or one number, got '{text}'.") from None
    if len(vals) == 1:
        vals *= 3
    if len(vals) != 3:
        raise InputError(f"--batch expects MIN,OPT,MAX (e.g. 1,4,8) or one number, got '{text}'.")
    return vals[0], vals[1], vals[2]


# ---- the ONNX to build from -----------------------------------------------------------------------------------
def _default_policy_terms(precision: str) -> list[str]:
    from invpt.calib.policy import get_policy

    return list(get_policy(precision, "default").keep_terms)


def _reusable_precision_onnx(path: Path, src_sha: str, precision: str, calib_data: Optional[str],
                             calib_samples: int) -> tuple[Optional[Manifest], str]:
    """(manifest, "") when ``path`` is a verified precision ONNX made from ``src_sha`` with the default policy; else
    (None, why): a file there that is not one (no manifest, edited, a leftover) is never overwritten."""
    try:
        man = verified_manifest(path, InputError, what="Existing precision ONNX")
    except InputError as err:
        return None, str(err).rstrip(".")
    pol = man.precision_policy
    why = []
    if man.kind != "onnx" or man.precision != precision:
        why.append(f"it is a {man.precision} {man.kind}")
    if (man.parent or {}).get("sha256") != src_sha:
        why.append("it was made from another FP32 ONNX (parent sha256 differs)")
    if pol is None or pol.name != "default" or list(pol.keep_terms) != _default_policy_terms(precision):
        why.append(f"it uses policy '{pol and pol.name}' with terms {pol and list(pol.keep_terms)}, not the default "
                   "policy")
    if not man.verified:
        why.append("its parity verification did not run or did not pass")
    if precision == "int8" and calib_data is not None:
        cal = man.calibration
        if cal is None or os.path.abspath(cal.source) != os.path.abspath(calib_data) or cal.num_samples != calib_samples:
            why.append(f"it was calibrated on {cal and cal.source} ({cal and cal.num_samples} samples)")
    return (None, "; ".join(why)) if why else (man, "")


def _export_target(ckpt: Path, out: Optional[Path]) -> Path:
    from invpt.export.cli import default_out

    onnx = default_out(str(ckpt))
    return (out.parent / onnx.name) if out is not None else onnx


def precision_onnx_path(fp32_onnx: Path, precision: str) -> Path:
    """Where invpt-quantize puts the FP16/INT8 ONNX by default: ``model.onnx`` -> ``model.fp16.onnx``."""
    return fp32_onnx.with_name(f"{fp32_onnx.stem}.{precision}.onnx")


def planned_onnx(onnx: Optional[Path], ckpt: Optional[Path], out: Optional[Path], precision: Optional[str]) -> tuple[Path, Path]:
    """(source ONNX, ONNX the engine is built from) as paths, before anything is made."""
    src = onnx if onnx is not None else _export_target(ckpt, out)
    if precision in ("fp16", "int8") and (onnx is None or not src.is_file() or _quick_precision(src) == "fp32"):
        return src, precision_onnx_path(src, precision)
    return src, src


def _quick_precision(path: Path) -> Optional[str]:
    try:
        return json.loads(manifest_path_for(path).read_text()).get("precision")
    except (OSError, ValueError, AttributeError):
        return None


def prepare_onnx(onnx: Optional[Path], ckpt: Optional[Path], config: Optional[str], precision: Optional[str],
                 out: Optional[Path], calib_data: Optional[str], calib_samples: int,
                 command: str) -> tuple[Path, Manifest, str, dict]:
    """The verified ONNX to build from, its manifest, the precision, and what was reused or made (provenance)."""
    made: dict[str, Any] = {}
    if ckpt is not None:
        from invpt.export.pipeline import run_export

        target = _export_target(ckpt, out)
        ck_sha = sha256_file(ckpt)
        if target.exists():
            try:
                man = verified_manifest(target, InputError, what="Existing ONNX")
            except InputError as err:
                raise InputError(
                    f"'{target}' exists but cannot be reused for this build ({str(err).rstrip('.')}); invpt does not "
                    f"overwrite it. Move it away, or pass another --out folder.") from err
            same_cfg = config is None or _same_config(config, man)
            if (man.parent or {}).get("sha256") != ck_sha or not same_cfg or man.precision != "fp32":
                raise InputError(
                    f"'{target}' exists but was not exported from '{ckpt}'"
                    f"{'' if same_cfg else ' with this --config'}; invpt does not overwrite it. Move it away, or "
                    f"build it as it is with --onnx {target}.")
            _logger.info("reusing %s (exported from this checkpoint; sha256 verified)", target)
            made["export"] = {"reused": True, "onnx": str(target)}
        else:
            _logger.info("exporting %s -> %s", ckpt, target)
            run_export(ckpt, target, config=config, command=command)
            made["export"] = {"reused": False, "onnx": str(target)}
        onnx = target
    assert onnx is not None
    man = verified_manifest(onnx, InputError, what="ONNX file")
    if man.kind != "onnx":
        raise ManifestError(f"'{onnx}' is a {man.kind}, not an ONNX model; pass the ONNX written by invpt-export or "
                            "invpt-quantize.")
    precision = precision or man.precision
    if man.precision == precision:
        return onnx, man, precision, made
    if man.precision != "fp32":
        parent = (man.parent or {}).get("absolute_path") or (man.parent or {}).get("path")
        raise InputError(f"'{onnx}' is a {man.precision.upper()} ONNX; --{precision} needs the FP32 ONNX it was made "
                         f"from{f' ({parent})' if parent else ''}, or drop --{precision} to build it as "
                         f"{man.precision.upper()}.")
    target = precision_onnx_path(onnx, precision)
    if target.exists():
        reuse, why = _reusable_precision_onnx(target, man.sha256, precision, calib_data, calib_samples)
        if reuse is None:
            raise InputError(f"'{target}' exists but cannot be reused for this build ({why}); invpt does not "
                             f"overwrite it. Move it away, or build it as it is with --onnx {target}.")
        _logger.info("reusing %s (same parent and policy; sha256 verified)", target)
        made["quantize"] = {"reused": True, "onnx": str(target)}
        return target, reuse, precision, made
    if precision == "int8" and not calib_data:
        raise InputError("--int8 from an FP32 ONNX needs --calib-data (a PASCAL-Context/NYUD-v2 root, an image folder "
                         "or a video); invpt never calibrates on random data. Or pass an INT8 ONNX made by "
                         "invpt-quantize with --onnx.")
    _logger.info("making the %s ONNX with invpt-quantize's pipeline -> %s", precision.upper(), target)
    from invpt.calib.pipeline import run_quantize

    res = run_quantize(onnx, precision, target, calib_data=calib_data, calib_samples=calib_samples, command=command)
    made["quantize"] = {"reused": False, "onnx": str(res.onnx_path)}
    return res.onnx_path, verified_manifest(res.onnx_path, InputError, what="ONNX file"), precision, made


def _same_config(config: str, man: Manifest) -> bool:
    from invpt.config import load_config

    try:
        return load_config(config) == man.model_config
    except Exception:  # an invalid --config is reported by the export itself
        return False


# ---- TensorRT pieces -------------------------------------------------------------------------------------------
def _progress_monitor(backend: Backend) -> Any:
    """A builder progress monitor drawing the top-level build phases on a tqdm bar (stderr; off when not a tty)."""
    from tqdm import tqdm

    trt = backend.trt

    class _Progress(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.bar = None
            self.phases: dict[str, Optional[str]] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):  # noqa: ANN001
            self.phases[phase_name] = parent_phase
            if parent_phase is None and self.bar is None:
                self.bar = tqdm(total=num_steps, desc="building engine", unit="phase", leave=False, disable=None)
            elif self.bar is not None:
                self.bar.set_postfix_str(phase_name[:40], refresh=True)
            _logger.debug("build phase %s (%s steps, in %s)", phase_name, num_steps, parent_phase)

        def step_complete(self, phase_name, step):  # noqa: ANN001
            if self.bar is not None and self.phases.get(phase_name, "") is None:
                self.bar.update(1)
            return True

        def phase_finish(self, phase_name):  # noqa: ANN001
            if self.phases.get(phase_name, "") is None and self.bar is not None:
                self.bar.close()
                self.bar = None

    return _Progress()


def _profile_shapes(network: Any, opts: BuildOptions, manifest: Manifest) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shapes of every input: the batch from --batch for a dynamic batch, the static shape otherwise."""
    shapes = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = [int(d) for d in t.shape]
        dyn = [k for k, d in enumerate(dims) if d < 0]
        if not dyn:
            if opts.batch is not None and set(opts.batch) != {dims[0]}:
                raise InputError(f"--batch {','.join(map(str, opts.batch))}: input '{t.name}' of this ONNX has a static "
                                 f"batch of {dims[0]}. Re-export with invpt-export --dynamic-batch for a batch range, "
                                 "or leave --batch out.")
            shapes[t.name] = {"min": dims, "opt": dims, "max": dims}
            continue
        if dyn != [0]:
            raise InputError(f"Input '{t.name}' has dynamic dimensions {dyn} of shape {dims}; invpt engines take a "
                             "dynamic batch only (H and W are fixed). Re-export with invpt-export.")
        lo, opt, hi = opts.batch or (1, 1, 1)
        if opts.batch is None:
            _logger.info("dynamic batch: building for batch 1 (pass --batch MIN,OPT,MAX for a range)")
        shapes[t.name] = {k: [b] + dims[1:] for k, b in (("min", lo), ("opt", opt), ("max", hi))}
    return shapes


def _configure(backend: Backend, builder: Any, network: Any, opts: BuildOptions,
               shapes: dict[str, dict[str, list[int]]], keepalive: list) -> tuple[Any, dict]:
    trt = backend.trt
    config = builder.create_builder_config()
    targets: dict[str, Any] = {}
    if opts.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gib * (1 << 30)))
    if opts.opt_level is not None:
        config.builder_optimization_level = opts.opt_level
    if backend.has("IBuilderConfig", "profiling_verbosity"):
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the engine inspector needs it
    # A dynamic input needs a profile even when min == opt == max (the default batch 1,1,1 of a dynamic-batch ONNX).
    if any(d < 0 for i in range(network.num_inputs) for d in network.get_input(i).shape):
        profile = builder.create_optimization_profile()
        for name, s in shapes.items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)
    if opts.compute_capabilities:
        members = [_cc_member(backend, c) for c in opts.compute_capabilities]
        config.num_compute_capabilities = len(members)
        for i, m in enumerate(members):
            config.set_compute_capability(getattr(trt.ComputeCapability, m), i)
        targets["compute_capabilities"] = [m[2:] for m in members]
    elif backend.is_rtx:
        targets["compute_capabilities"] = RTX_DEFAULT_TARGETS
    if opts.hardware_compat and opts.hardware_compat != "none":
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, HARDWARE_COMPAT[opts.hardware_compat])
        targets["hardware_compatibility"] = opts.hardware_compat
    if not backend.is_rtx and not opts.hardware_compat:
        targets["gpu"] = "the build machine's GPU (same model and compute capability only)"
    if opts.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if opts.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if opts.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = opts.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        targets["dla_core"] = opts.dla_core
    if opts.timing_cache:
        blob = Path(opts.timing_cache).read_bytes() if Path(opts.timing_cache).is_file() else b""
        cache = config.create_timing_cache(blob)
        if cache is None or not config.set_timing_cache(cache, False):
            raise InputError(f"Timing cache '{opts.timing_cache}' does not match this {backend.describe()} or GPU "
                             "(TensorRT refused it). Delete it, or pass another --timing-cache file.")
    if opts.progress and backend.has_progress_monitor:
        monitor = _progress_monitor(backend)
        config.progress_monitor = monitor
        keepalive.append(monitor)  # the Python object must outlive the build
    return config, targets


def _cuda_devices() -> Optional[list[dict]]:
    """The CUDA devices the driver reports (name, compute capability), or None without a driver."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1" if sys.platform != "win32" else "nvcuda.dll")
    except OSError:
        return None
    if cuda.cuInit(0) != 0:
        return None
    n = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(n)) != 0:
        return None
    out = []
    for i in range(n.value):
        dev, name, ma, mi = ctypes.c_int(), ctypes.create_string_buffer(256), ctypes.c_int(), ctypes.c_int()
        cuda.cuDeviceGet(ctypes.byref(dev), i)
        cuda.cuDeviceGetName(name, 256, dev)
        cuda.cuDeviceGetAttribute(ctypes.byref(ma), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        cuda.cuDeviceGetAttribute(ctypes.byref(mi), 76, dev)
        out.append({"name": name.value.decode(errors="replace"), "compute_capability": f"{ma.value}.{mi.value}"})
    return out


def inspect_engine(backend: Backend, plan_path: Path) -> dict[str, Any]:
    """The engine inspector's per-layer precision histogram (needs a GPU that can load the engine)."""
    devices = _cuda_devices()
    if not devices:
        return {"ran": False, "reason": "no CUDA GPU on the build machine: loading an engine (and so the engine "
                "inspector) needs one; the pre-build network precision check did run"}
    trt = backend.trt
    try:
        engine = trt.Runtime(backend.logger()).deserialize_cuda_engine(plan_path.read_bytes())
    except Exception as err:  # the build itself succeeded; the record says why this step did not run
        engine, failure = None, f"{type(err).__name__}: {str(err).strip()[:200]}"
    else:
        failure = "; ".join(backend.logged_errors()[-1:])
    if engine is None:
        return {"ran": False, "gpus": devices, "reason": f"{backend.describe()} could not load the engine on this GPU "
                f"(TensorRT-RTX engines run on RTX-class GPUs only, not Hopper or Jetson){': ' + failure if failure else ''}"}
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    hist: collections.Counter = collections.Counter()
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):
            continue
        outs = layer.get("Outputs") or []
        fmt = str(outs[0].get("Format/Datatype", "")) if outs and isinstance(outs[0], dict) else ""
        low = fmt.lower()
        dtype = next((n for k, n in (("int8", "int8"), ("fp8", "fp8"), ("bf16", "bf16"), ("half", "fp16"),
                                      ("fp16", "fp16"), ("float", "fp32"), ("fp32", "fp32"), ("int32", "int32"),
                                      ("int64", "int64"), ("bool", "bool")) if k in low), low or "unknown")
        hist[dtype] += 1
    io_key = "I/O Tensors" if "I/O Tensors" in info else "Bindings"
    return {"ran": True, "gpus": devices, "layers": len(info.get("Layers", [])),
            "layer_precision_histogram": dict(sorted(hist.items())), "io_tensors": info.get(io_key)}


def engine_build_info(manifest: Manifest) -> dict[str, Any]:
    """The ``build`` section of an engine manifest as its JSON dict (empty when the manifest has none)."""
    return manifest.build.to_dict() if manifest.build is not None else {}


def _peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM on Linux (fresh after exec, unlike getrusage's maxrss, which inherits the
    parent's RSS at fork), else getrusage."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)


# ---- the stage -----------------------------------------------------------------------------------------------
def default_plan_path(onnx: Path) -> Path:
    """``model.fp16.onnx`` -> ``model.fp16.plan`` (its manifest: ``model.fp16.plan.json``)."""
    return onnx.with_suffix(".plan")


def run_build(
    onnx: Optional[str | os.PathLike] = None,
    *,
    ckpt: Optional[str | os.PathLike] = None,
    config: Optional[str] = None,
    precision: Optional[str] = None,
    out: Optional[str | os.PathLike] = None,
    backend: str = "auto",
    options: Optional[BuildOptions] = None,
    calib_data: Optional[str | os.PathLike] = None,
    calib_samples: int = 32,
    command: Optional[str] = None,
) -> BuildResult:
    """Build a TensorRT engine plus manifest. See ``invpt-trt-build --help``.

    Raises InputError/ManifestError (bad input, refused option), DependencyError (no TensorRT module; the message
    names the prepared ONNX), ExportError (the ONNX does not parse), VerificationError (the precision check failed:
    nothing is written), ToolError (TensorRT's builder failed).
    """
    opts = options or BuildOptions()
    if (onnx is None) == (ckpt is None):
        raise InputError("Pass exactly one of --onnx (an ONNX written by invpt-export/invpt-quantize) or --ckpt.")
    if config is not None and ckpt is None:
        raise InputError("--config applies to --ckpt only: an ONNX file's manifest already records its config. Leave "
                         "--config out, or pass the checkpoint with --ckpt.")
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'.")
    from invpt.paths import require_file

    onnx_p = require_file(onnx, "ONNX file", "Pass the ONNX written by invpt-export or invpt-quantize (its .json "
                          "manifest beside it).") if onnx is not None else None
    ckpt_p = require_file(ckpt, "Checkpoint", "Pass an InvPT checkpoint (.pth/.pth.tar).") if ckpt is not None else None
    calib = str(calib_data) if calib_data is not None else None
    if calib is not None and not Path(calib).exists():
        raise InputError(f"Calibration data '{calib}' does not exist. Pass a PASCAL-Context or NYUD-v2 root, a folder "
                         "of images, or a video file.")
    out_p = Path(out) if out is not None else None
    src, built_from = planned_onnx(onnx_p, ckpt_p, out_p, precision)
    out_p = out_p or default_plan_path(built_from)
    tc = Path(opts.timing_cache) if opts.timing_cache else None
    calib_file = Path(calib) if calib and Path(calib).is_file() else None
    check_output(out_p, [src, built_from, ckpt_p, calib_file, tc], InputError)
    if tc is not None:
        if tc.exists() and not tc.is_file():
            raise InputError(f"--timing-cache '{tc}' is not a regular file. Pass a file path (it is created if missing).")
        if tc.resolve() in (out_p.resolve(), manifest_path_for(out_p).resolve(), src.resolve(), built_from.resolve()):
            raise InputError(f"--timing-cache '{tc}' is the plan, its manifest or the ONNX. Pass another file.")
    command = command or " ".join(sys.argv)

    try:
        be: Optional[Backend] = load_backend(backend)
        missing: Optional[DependencyError] = None
    except DependencyError as err:
        be, missing = None, err
    if be is not None:
        validate_options(be, opts)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    onnx_path, man, precision, made = prepare_onnx(onnx_p, ckpt_p, config, precision, out_p if out is not None else None,
                                                   calib, calib_samples, command)
    timings["prepare_onnx_s"] = round(time.perf_counter() - t0, 3)
    if be is None:
        assert missing is not None
        raise DependencyError(f"{missing} The prepared {precision.upper()} ONNX is '{onnx_path}' (manifest "
                              f"'{manifest_path_for(onnx_path)}'): build it on a machine with TensorRT with "
                              f"invpt-trt-build --onnx {onnx_path}. No engine was built.")
    if onnx_path.resolve() != built_from.resolve():  # e.g. an INT8 ONNX given with --onnx and no precision flag
        check_output(out_p, [onnx_path], InputError)

    from invpt.engines.network import parse_onnx, summarize_network
    from invpt.engines.precision import check_precision

    cfg = man.model_config
    parsed = parse_onnx(be, onnx_path, man.tasks, cfg.backbone.depth)
    timings["parse_s"] = round(parsed.parse_s, 3)
    shapes = _profile_shapes(parsed.network, opts, man)
    t0 = time.perf_counter()
    opt_batch = next(iter(shapes.values()))["opt"][0] if shapes else 1
    report = check_precision(summarize_network(parsed, opt_batch), man, onnx_path, precision)
    timings["precision_check_s"] = round(time.perf_counter() - t0, 3)
    if precision == "fp16":
        _logger.info("precision check ok: %.1f %% of MatMul/Conv work in FP16 (policy '%s': %.1f %%); kept layers FP32",
                     100 * report["fp16_share"], report["policy"], 100 * report["policy_fp16_share"])
    elif precision == "int8":
        _logger.info("precision check ok: %d Q/DQ-fed MatMul/Conv layers (%.1f %% of the work); every Q/DQ node of "
                     "the ONNX is in the network", report["quantized_gemm_layers"], 100 * report["int8_share"])
    else:
        _logger.info("precision check ok: every MatMul/Conv computes in FP32")

    rss_before = _peak_rss_bytes()
    keepalive: list = []
    config_obj, targets = _configure(be, parsed.builder, parsed.network, opts, shapes, keepalive)
    with staging_dir(out_p, InputError) as staging:
        _logger.info("building %s engine with %s (strongly typed network, %d layers)...", precision.upper(),
                     be.describe(), parsed.network.num_layers)
        t0 = time.perf_counter()
        try:
            plan = parsed.builder.build_serialized_network(parsed.network, config_obj)
        except Exception as err:  # a failure inside TensorRT's Python bindings
            raise ToolError.from_exception(be.title, f"building '{onnx_path}'", err,
                                           distribution=_DISTRIBUTIONS.get(be.key)) from err
        timings["build_s"] = round(time.perf_counter() - t0, 3)
        if plan is None:
            errors = be.logged_errors()
            raise ToolError(f"{be.describe()} failed to build the engine from '{onnx_path}'"
                            f"{': ' + ' | '.join(errors[-3:]) if errors else ''}. The network parsed and passed the "
                            "precision check, so this is a failure inside TensorRT: run with -v for its log, try "
                            "--opt-level 2 or a larger --workspace, and report it with the command line.",
                            library=be.module_name, version=be.version)
        peak = _peak_rss_bytes()
        tmp_plan = staging / out_p.name
        with open(tmp_plan, "wb") as f:
            f.write(plan)
        if opts.timing_cache:
            tc_blob = bytes(config_obj.get_timing_cache().serialize())
        del plan
        with open(tmp_plan, "rb") as f:
            magic = f.read(4).decode("latin-1")
        plan_sha = sha256_file(tmp_plan)
        plan_size = tmp_plan.stat().st_size
        t0 = time.perf_counter()
        inspector = inspect_engine(be, tmp_plan)
        timings["inspect_s"] = round(time.perf_counter() - t0, 3)
        if not inspector["ran"]:
            _logger.info("engine inspector not run: %s", inspector["reason"])
        else:
            hist = inspector["layer_precision_histogram"]
            inspector["consistent"] = precision == "fp32" or hist.get(precision, 0) > 0
            if not inspector["consistent"]:
                _logger.warning("the engine inspector reports no %s layer (histogram %s); check the engine before "
                                "deploying it", precision.upper(), hist)
        build = {
            "backend": be.module_name,
            "backend_name": be.title,
            "backend_version": be.version,
            "strongly_typed": True,
            "targets": targets,
            "profile_shapes": shapes,
            "options": opts.to_dict(),
            "source_onnx": {"path": str(onnx_path), "sha256": man.sha256, "precision": man.precision},
            "prepared": made,
            "plan": {"format": "plain serialized TensorRT plan (no header)", "sha256": plan_sha,
                     "size_bytes": plan_size, "magic": magic},
            "timings_s": dict(timings),
            "peak_rss_bytes": peak,
            "peak_rss_before_build_bytes": rss_before,
            "peak_rss_note": "peak RSS of the invpt-trt-build process (VmHWM); includes export/quantize when this "
                             "command ran them",
        }
        verification = {"precision_check": report, "engine_inspector": inspector,
                        "onnx_verification_passed": man.verified}
        extra = {"build": build}
        engine_man = man.replace(
            artifact=out_p.name, kind="engine", precision=precision, sha256=plan_sha, size_bytes=plan_size,
            external_data=(), parent=parent_record("onnx", onnx_path, out_p.parent, man.sha256),
            verification=verification, versions={**tool_versions("onnx"), be.module_name: be.version},
            command=command, created=now_iso(), **extra)
        engine_man.save(manifest_path_for(tmp_plan))
        publish(staging, out_p, error_cls=InputError)
    if opts.timing_cache:
        from invpt.atomic import atomic_path

        with atomic_path(opts.timing_cache) as tmp:
            tmp.write_bytes(tc_blob)
    _logger.info("engine ok: %s (%.1f MB, %s, built in %.1fs, peak RSS %.2f GB); manifest %s", out_p,
                 plan_size / 1e6, precision.upper(), timings["build_s"], peak / 1e9, manifest_path_for(out_p))
    return BuildResult(out_p, manifest_path_for(out_p), engine_man, onnx_path, report, timings)
