"""INT8 explicit quantization (Q/DQ) calibrated on real samples.

``entropy`` and ``max`` end in NVIDIA ModelOpt's ONNX PTQ (the tool TensorRT 11 documents). By default invpt measures
the activation ranges itself with bounded memory and ModelOpt only inserts the Q/DQ nodes
(:mod:`invpt.calib.ranges`: the same ranges and the same graph as ModelOpt's own calibration, at a fraction of its
memory); ``per_node=True`` / ``False`` lets ModelOpt calibrate itself, node by node or the whole graph at once.
``percentile`` uses onnxruntime's ``quantize_static`` (ModelOpt has no percentile INT8 calibrator). All quantize
Conv/MatMul/Gemm with per-channel weight scales and leave the excluded nodes in FP32.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from invpt.artifacts import private_copy
from invpt.calib.policy import QUANTIZABLE_OPS, exact_name_regexes
from invpt.cli.common import onnxruntime_severity
from invpt.errors import DependencyError, InputError, ToolError, library_version

_logger = logging.getLogger(__name__)

CALIB_METHODS = ("entropy", "max", "percentile")
PER_NODE_CALIBRATION_BYTES = 256 * 2**20
MAX_CALIBRATION_BATCH = 16


def calibration_batch(onnx_path: str | os.PathLike, num_samples: int, input_name: str = "image",
                      max_batch: int = MAX_CALIBRATION_BATCH) -> tuple[int, bool]:
    """(samples per calibration step, whether the model's batch is dynamic).

    A static-batch model is fed in its own batch. A dynamic-batch model is fed the largest divisor of
    ``num_samples`` up to ``max_batch``, so that every step has the same shape. Batching matters
    for node-by-node calibration, which builds one ONNX Runtime session per node per step: a ViT-L step took about
    21 minutes at batch 1 and 34 at batch 8 on 2 cores, so 8 samples in one step instead of 8 saves over 2 hours.
    """
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    inp = next((i for i in proto.graph.input if i.name == input_name), None)
    if inp is None:
        raise InputError(f"'{onnx_path}' has no input named '{input_name}'; was it written by invpt-export?")
    dim = inp.type.tensor_type.shape.dim[0]
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return dim.dim_value, False
    return max(b for b in range(1, min(num_samples, max(max_batch, 1)) + 1) if num_samples % b == 0), True


def whole_graph_step_batch(onnx_path: str | os.PathLike, budget: int | None = None) -> int:
    """Samples per whole-graph calibration step whose intermediate tensors fit in ``budget`` bytes (1 to 16;
    default :data:`invpt.preflight.WHOLE_GRAPH_STEP_BYTES`).

    ModelOpt's calibrators (its patches of onnxruntime's ``collect_data``) merge each step's intermediate tensors
    into the ranges / histograms and free them before the next step, so memory follows the step's batch, not the
    number of samples: ViT-L at batch 2 in one step peaked at ~21 GiB and batch 8 ran out of 24 GB, one sample a
    step holds one sample's tensors. The tiny model still takes 16 samples a step, ViT-L one.
    """
    from invpt.preflight import WHOLE_GRAPH_STEP_BYTES, activation_bytes, step_batch

    return step_batch(activation_bytes(onnx_path, 1), WHOLE_GRAPH_STEP_BYTES if budget is None else budget,
                      MAX_CALIBRATION_BATCH)


ENGINE_RANGES = "bounded-ranges"         # invpt measures the ranges (bounded memory), ModelOpt inserts Q/DQ
ENGINE_MODELOPT_WHOLE = "modelopt-whole-graph"
ENGINE_MODELOPT_PER_NODE = "modelopt-per-node"
ENGINE_ORT = "onnxruntime"               # percentile: onnxruntime's quantize_static


def calibration_engine(onnx_path: str | os.PathLike, method: str, per_node: bool | None = None) -> str:
    """Who calibrates: onnxruntime for ``percentile``; for ``entropy``/``max``, invpt's bounded-memory ranges
    (:mod:`invpt.calib.ranges`) unless ``per_node`` asks for ModelOpt's own calibration (True: node by node, False:
    whole graph). Where the installed ModelOpt lacks a function the ranges path calls, or the model's opset is older
    than ModelOpt's INT8 output (ModelOpt converts it first), ModelOpt calibrates itself (by size, see
    :func:`calibrates_per_node`) and a warning says why."""
    if method == "percentile":
        return ENGINE_ORT
    if per_node is not None:
        return ENGINE_MODELOPT_PER_NODE if per_node else ENGINE_MODELOPT_WHOLE
    why = _ranges_unsupported(onnx_path)
    if why is None:
        return ENGINE_RANGES
    fallback = ENGINE_MODELOPT_PER_NODE if calibrates_per_node(onnx_path) else ENGINE_MODELOPT_WHOLE
    _logger.warning("INT8 ranges are measured by ModelOpt itself (%s) because %s.", fallback, why)
    return fallback


def _ranges_unsupported(onnx_path: str | os.PathLike) -> str | None:
    import onnx

    from invpt.calib.ranges import MIN_OPSET, lean_path_supported

    try:
        missing = lean_path_supported()
    except DependencyError:
        return None  # the quantizer reports the missing extra
    if missing:
        return f"nvidia-modelopt {library_version('nvidia-modelopt')} has no {missing}"
    proto = onnx.load(str(onnx_path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        return f"the model's opset is {opset} (ModelOpt converts models older than {MIN_OPSET} first)"
    return None


def calibrates_per_node(onnx_path: str | os.PathLike, per_node: bool | None = None) -> bool:
    """Whether ModelOpt, when it calibrates itself (see :func:`calibration_engine`), calibrates ``onnx_path`` node by
    node: ``per_node`` if given, else for models over 256 MB.

    Whole-graph calibration keeps every intermediate tensor of every sample until it builds the histograms
    (ViT-L: 229 s and ~21 GiB for 2 samples; 8 samples exceeded 24 GB); node-by-node calibration bounds memory
    but builds one ONNX Runtime session per node per step (about 1 s a node on 2 CPU cores: 21-34 min a step for
    ViT-L). Where RAM allows, whole-graph calibration of a few samples is much faster.
    """
    if per_node is not None:
        return bool(per_node)
    return Path(onnx_path).stat().st_size > PER_NODE_CALIBRATION_BYTES


def quantize_int8(onnx_path: str | os.PathLike, out_path: str | os.PathLike, calib: np.ndarray, method: str,
                  exclude_nodes: Sequence[str], input_name: str = "image", per_node: bool | None = None, *,
                  input_is_private: bool = False, samples_per_step: int | None = None,
                  report: dict | None = None, range_cache: "RangeCache | None" = None) -> Path:
    """Write a Q/DQ INT8 model of ``onnx_path`` calibrated on ``calib`` [N, 3, H, W].

    ``per_node`` None (default): invpt measures the ranges with bounded memory and ModelOpt inserts the Q/DQ nodes
    (see :func:`calibration_engine`); True / False: ModelOpt calibrates itself, node by node / the whole graph.
    ``samples_per_step`` caps the batch of one calibration step of a dynamic-batch model (None: as many as
    :func:`whole_graph_step_batch` allows (ViT-L: one), the steps whose ranges ModelOpt's whole-graph calibration
    folds in one at a time; node by node, where each step costs one session per node, up to
    ``MAX_CALIBRATION_BATCH``). The onnxruntime ``percentile`` path has no such mode and ignores it. When ``report``
    is a dict it receives the engine and, for invpt's ranges, what was measured and the time of each phase.

    The quantizer never sees ``onnx_path`` itself (ModelOpt rewrites its input in place, onnxruntime writes beside
    it): it gets a :func:`~invpt.artifacts.private_copy` in ``out_path``'s folder, removed afterwards. A caller that
    quantizes one model many times (the sensitivity sweep) makes that copy once and passes ``input_is_private=True``,
    and a :class:`RangeCache` (``range_cache``) so that the ranges are measured once for all those models (used by
    invpt's ranges engine; the other engines calibrate every time). A library failure raises
    :class:`~invpt.errors.ToolError`.
    """
    if method not in CALIB_METHODS:
        raise InputError(f"Unknown calibration method '{method}'; use one of {', '.join(CALIB_METHODS)}.")
    if calib is None or len(calib) == 0:
        raise InputError("INT8 needs calibration samples; invpt never calibrates on random data (pass --calib-data).")
    if range_cache is not None and not input_is_private:
        raise ValueError("range_cache serves the caller's one private copy of the model: pass input_is_private=True")
    out_path = Path(out_path)
    engine = calibration_engine(onnx_path, method, per_node)
    per_node = engine == ENGINE_MODELOPT_PER_NODE
    if samples_per_step is None:
        samples_per_step = (MAX_CALIBRATION_BATCH if per_node or method == "percentile"
                            else whole_graph_step_batch(onnx_path))
    batch, dynamic = calibration_batch(onnx_path, len(calib), input_name, samples_per_step)
    if len(calib) % batch:
        raise InputError(f"'{onnx_path}' has a static batch of {batch}; give a multiple of {batch} calibration "
                         f"samples (got {len(calib)}).")
    info: dict = {"engine": engine, "samples_per_step": batch}
    with _library_input(Path(onnx_path), out_path.parent, input_is_private) as src:
        if engine == ENGINE_ORT:
            _quantize_ort(src, out_path, calib, exclude_nodes, input_name, batch)
        elif engine == ENGINE_RANGES:
            info.update(_quantize_ranges(src, out_path, calib, method, exclude_nodes, input_name, batch, range_cache))
        else:
            _quantize_modelopt(src, out_path, calib, method, exclude_nodes, input_name, batch, dynamic, per_node)
    if report is not None:
        report.clear()
        report.update(info)
    return out_path


def _quantize_ranges(src: Path, out: Path, calib: np.ndarray, method: str, exclude: Sequence[str], input_name: str,
                     batch: int, cache: "RangeCache | None" = None) -> dict:
    """invpt's ranges, then ModelOpt's Q/DQ insertion (:mod:`invpt.calib.ranges`), in a work folder beside ``out``
    (the prepared model and its weights; removed afterwards), or in ``cache``'s folder, where the prepared model and
    the measured ranges serve the next call too. Returns what :func:`quantize_int8` reports."""
    import time

    from invpt.calib import ranges

    steps = len(calib) // batch
    _logger.info("INT8 %s calibration: %d sample(s) in %d step(s) of batch %d, ranges measured by invpt (bounded "
                 "memory), Q/DQ inserted by ModelOpt", method, len(calib), steps, batch)
    seconds: dict = {}
    patterns = exact_name_regexes(exclude)
    shape = {input_name: [batch, *calib.shape[1:]]}
    feeds = [{input_name: calib[i:i + batch]} for i in range(0, len(calib), batch)]
    with contextlib.ExitStack() as stack:
        level = stack.enter_context(modelopt_logging(cpu_only=True))
        if cache is not None:
            cache.claim(src, calib, method, batch)  # a ValueError (the caller's bug) for another model or samples
        t = time.perf_counter()
        try:
            if cache is None:
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=".invpt-int8.", dir=out.parent))
                prepared = ranges.prepare_model(src, Path(tmp) / "input.onnx")
            else:
                prepared = cache.prepared(src)
        except (DependencyError, ToolError, InputError):
            raise
        except Exception as err:
            raise ToolError.from_exception("ModelOpt", "preprocessing a copy of the model for INT8", err,
                                           "nvidia-modelopt") from err
        seconds["prepare"] = time.perf_counter() - t
        _logger.info("INT8: model prepared for ModelOpt (weights in one external file) in %.1f s", seconds["prepare"])
        t = time.perf_counter()
        plan = ranges.plan_quantization(prepared, QUANTIZABLE_OPS, patterns, shape)
        seconds["plan"] = time.perf_counter() - t
        _logger.info("INT8: %d nodes to quantize, %d activation tensors to measure (%.2f GiB a step)",
                     len(plan.nodes), len(plan.tensors), plan.step_bytes() / 2**30)

        def measure(p):
            try:
                return ranges.compute_ranges(prepared, p, feeds, method,
                                             progress=logging.getLogger("invpt").isEnabledFor(logging.WARNING))
            except (DependencyError, ToolError):
                raise
            except Exception as err:
                raise ToolError.from_exception("onnxruntime", f"measuring INT8 {method} ranges of a copy of the model",
                                               err) from err

        if cache is None:
            measured, rep = measure(plan)
            range_info = rep.to_dict()
            _logger.info("INT8 %s ranges of %d tensors: %d step(s), %d session(s), %.1f s", method, rep.tensors,
                         rep.steps, rep.sessions, rep.seconds)
        else:
            measured, range_info = cache.ranges_for(plan, measure, lambda: ranges.plan_quantization(
                prepared, QUANTIZABLE_OPS, exact_name_regexes(cache.warm_exclude), shape))
            range_info = {"method": method, "steps": len(feeds), "bytes_per_step": plan.step_bytes(), **range_info,
                          "seconds": round(range_info["seconds"], 2)}
        seconds["ranges"] = range_info["seconds"]
        t = time.perf_counter()
        ranges.quantize_with_ranges(prepared, out, plan, measured, method, patterns, QUANTIZABLE_OPS, shape, level)
        seconds["insert_qdq"] = time.perf_counter() - t
        _logger.info("INT8: Q/DQ nodes inserted by ModelOpt in %.1f s", seconds["insert_qdq"])
        del measured
    if not out.exists():
        raise ToolError(f"ModelOpt {library_version('nvidia-modelopt')} reported success but wrote no '{out}'; "
                        "re-run with -v and report it.", "ModelOpt", library_version("nvidia-modelopt"))
    return {"plan": plan.to_dict(), "ranges": range_info, "seconds": {k: round(v, 2) for k, v in seconds.items()}}


class RangeCache:
    """INT8 ranges measured once for many quantizations of one model with the same samples and method: the
    sensitivity sweep quantizes each block alone, then the kept set, and every one of those models needs ranges of
    tensors of the same FP32 graph over the same samples.

    An activation's range depends only on the FP32 model and the samples, except for tensors ModelOpt gives one
    shared scale (the inputs and output of a Concat whose nodes are all quantized): their range is that of the whole
    group, and the groups depend on which nodes are quantized. So a range is kept under (tensor, its group) and serves
    a later plan only where that plan groups the tensor the same way; the others are measured for that plan. The
    first request measures the plan of ``warm_exclude`` (the policy's exclusions alone: every tensor any block
    needs) in one pass, so each block costs its Q/DQ insertion only, not a forward pass per sample. Every model it
    serves is the one :func:`quantize_int8` writes without it (tests/test_int8_ranges.py).

    The prepared copy of the model (ModelOpt's input) lives in ``work_dir`` for the cache's life; it is checked by size
    and modification time before every reuse and prepared again if it changed. One cache serves one model, one set of
    samples and one method: anything else is a :class:`ValueError` (a caller's bug). ``close()`` removes ``work_dir``.
    """

    def __init__(self, work_dir: str | os.PathLike, warm_exclude: Sequence[str] = ()) -> None:
        self.work_dir = Path(work_dir)
        self.warm_exclude = list(warm_exclude)
        self._key: tuple | None = None
        self._prepared: Path | None = None
        self._stamp: tuple = ()
        self._ranges: dict[tuple[str, frozenset | None], object] = {}
        self._calibration_method = None
        self.sessions = 0  # forward passes over the samples (ONNX Runtime sessions) the cache has paid for
        self.measured = 0  # tensors measured
        self.served = 0    # tensors served from earlier measurements

    def __enter__(self) -> "RangeCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.work_dir, ignore_errors=True)
        self._prepared, self._ranges = None, {}

    def _files_stamp(self) -> tuple:
        folder = self._prepared.parent
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))

    def claim(self, src: Path, calib: np.ndarray, method: str, batch: int) -> None:
        """Bind the cache to its first model, samples, method and step batch; anything else is a ValueError."""
        import hashlib

        key = (str(Path(src).resolve()), method, int(batch), tuple(calib.shape), str(calib.dtype),
               hashlib.sha256(np.ascontiguousarray(calib).tobytes()).hexdigest())
        if self._key is None:
            self._key = key
        elif key != self._key:
            raise ValueError("a RangeCache serves one model, one set of calibration samples and one method; "
                             f"it holds {self._key[:3]}, asked for {key[:3]}")

    def prepared(self, src: Path) -> Path:
        """ModelOpt's input for ``src`` (the model :meth:`claim` bound), prepared once and checked before reuse."""
        from invpt.calib import ranges

        if self._prepared is not None and self._prepared.is_file() and self._files_stamp() == self._stamp:
            return self._prepared
        if self._prepared is not None:
            _logger.warning("INT8: the prepared copy of the model changed since it was made; preparing it again and "
                            "measuring its ranges anew")
            self._ranges.clear()
        folder = self.work_dir / "prepared"
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self._prepared = ranges.prepare_model(src, folder / "input.onnx")
        self._stamp = self._files_stamp()
        return self._prepared

    def ranges_for(self, plan, measure, warm_plan) -> tuple[object, dict]:
        """Ranges (onnxruntime ``TensorsData``) for every tensor of ``plan``: from earlier measurements where the
        tensor's group is the same, else measured now with ``measure(sub_plan)``; ``warm_plan()`` gives the plan
        measured on the first request. Returns them and what was measured, reused and how long it took."""
        import dataclasses
        import time

        from onnxruntime.quantization.calibrate import TensorsData

        t0 = time.perf_counter()
        sessions_before, measured_before = self.sessions, self.measured

        def key(p, t: str) -> tuple[str, frozenset | None]:
            return t, p.groups.get(t)

        def fill(p) -> None:
            missing = [t for t in p.tensors if key(p, t) not in self._ranges]
            if not missing:
                return
            sub = dataclasses.replace(p, tensors=missing, groups={t: g for t, g in p.groups.items() if t in missing})
            data, rep = measure(sub)
            self._calibration_method = data.calibration_method
            for t in missing:
                self._ranges[key(p, t)] = data.data[t]
            self.sessions += rep.sessions
            self.measured += len(missing)
            _logger.info("INT8 ranges of %d tensor(s) measured: %d step(s), %d session(s), %.1f s", len(missing),
                         rep.steps, rep.sessions, rep.seconds)

        if not self._ranges:
            fill(warm_plan())
        cached = set(self._ranges)  # after the warm-up: what this plan finds measured (now or before)
        fill(plan)
        served = sum(key(plan, t) in cached for t in plan.tensors) if measured_before else 0
        self.served += served
        if served:
            _logger.info("INT8 ranges of %d tensor(s) reused from this run's earlier measurement", served)
        data = TensorsData(self._calibration_method, {t: self._ranges[key(plan, t)] for t in plan.tensors})
        info = {"tensors": len(plan.tensors), "measured": self.measured - measured_before, "reused": served,
                "sessions": self.sessions - sessions_before, "seconds": time.perf_counter() - t0}
        return data, info


@contextmanager
def _library_input(onnx_path: Path, work_dir: Path, is_private: bool) -> Iterator[Path]:
    """``onnx_path`` if it is already the caller's private copy, else a private copy in ``work_dir`` (then removed)."""
    if is_private:
        yield onnx_path
        return
    with tempfile.TemporaryDirectory(prefix=".invpt-input.", dir=work_dir) as tmp:
        yield private_copy(onnx_path, tmp)


def modelopt_log_level() -> int:
    """The level for ModelOpt's log: that of the ``modelopt`` logger, which ``configure_logging`` sets from -q/-v
    (errors with -q, warnings by default, info with -v, debug with -vv); WARNING (the root default) otherwise."""
    return logging.getLogger("modelopt").getEffectiveLevel()


def _adopt_modelopt_loggers(level=None, log_file=None) -> None:  # signature of ModelOpt's configure_logging
    """Undo ModelOpt's logging setup: it installs a stdout handler at INFO on ``modelopt.onnx`` (and
    ``modelopt.onnx.autocast``) on import and on every ``quantize()`` call. Its loggers then inherit the level and
    handlers of the ``modelopt`` logger, i.e. invpt's stderr and --log-file, at :func:`modelopt_log_level`."""
    console_streams = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None}
    for name in [n for n in list(logging.root.manager.loggerDict) if n.startswith("modelopt.")]:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if type(h) is logging.StreamHandler and id(h.stream) in console_streams:
                lg.removeHandler(h)
        lg.setLevel(logging.NOTSET)
        lg.propagate = True


class _CpuNvmlProbeFilter(logging.Filter):
    """ModelOpt's calibrator asks NVML for the GPU count (to shrink GPU memory arenas) and logs an ERROR when there is
    no NVIDIA driver ("Failed to get GPU count: NVML Shared Library Not Found"). invpt calibrates on the CPU, so the
    count is irrelevant: the line is dropped, or shown as DEBUG with -vv."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Failed to get GPU count"):
            return True
        if not logging.getLogger("modelopt").isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg = f"{record.msg} (harmless: invpt calibrates on the CPU)"
        return True


@contextmanager
def modelopt_logging(cpu_only: bool = True) -> Iterator[str]:
    """Around a ModelOpt call: its log goes through invpt's handlers at :func:`modelopt_log_level` (yielded as the
    name ModelOpt's ``log_level`` argument takes) instead of its own stdout handler; on the CPU, the NVML probe's
    error line is dropped (see :class:`_CpuNvmlProbeFilter`).

    ModelOpt's entry points (``quantize``, its int8/fp8/int4 modules) call its ``configure_logging`` again, which
    would put the stdout handler back at their ``log_level``: inside the block, the modules' references to it point
    at :func:`_adopt_modelopt_loggers` instead (restored afterwards). The progress that onnxruntime's calibrators
    ``print()`` is info: it goes to stderr with -v and nowhere otherwise, so stdout stays clean for data.
    """
    import contextlib

    originals = []
    for name in ("modelopt.onnx.logging_config", "modelopt.onnx.autocast.logging_config"):
        module = sys.modules.get(name)
        if module is not None and callable(getattr(module, "configure_logging", None)):
            originals.append(module.configure_logging)
    level = modelopt_log_level()
    modules = [m for name, m in list(sys.modules.items()) if name.startswith("modelopt.") and m is not None]
    swapped = [(m, "configure_logging", m.configure_logging, _adopt_modelopt_loggers) for m in modules
               if any(getattr(m, "configure_logging", None) is f for f in originals)]
    swapped += [(m, "tqdm", m.tqdm, _tqdm_for(m.tqdm, level)) for m in modules if _is_tqdm(getattr(m, "tqdm", None))]
    _adopt_modelopt_loggers()
    nvml = _CpuNvmlProbeFilter()
    onnx_logger = logging.getLogger("modelopt.onnx")
    if cpu_only:
        onnx_logger.addFilter(nvml)
    try:
        for module, attr, _, replacement in swapped:
            setattr(module, attr, replacement)
        with open(os.devnull, "w") as devnull, \
                contextlib.redirect_stdout(sys.stderr if level <= logging.INFO else devnull):
            yield logging.getLevelName(level)
    finally:
        for module, attr, original, _ in swapped:
            setattr(module, attr, original)
        onnx_logger.removeFilter(nvml)


def _is_tqdm(obj) -> bool:
    try:
        from tqdm import tqdm
    except ImportError:
        return False
    return isinstance(obj, type) and issubclass(obj, tqdm)


def _tqdm_for(cls: type, level: int) -> type:
    """``cls`` whose bars are off with -q and otherwise shown only on a terminal (like invpt's own bars)."""
    disable = True if level > logging.WARNING else None

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("disable", disable)
        cls.__init__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__})


def _quantize_modelopt(src: Path, out: Path, calib: np.ndarray, method: str, exclude: Sequence[str], input_name: str,
                       batch: int, dynamic: bool, per_node: bool) -> None:
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as err:
        raise DependencyError("nvidia-modelopt is not installed; install the calib extra: pip install 'invpt[calib]'.") from err
    steps = len(calib) // batch
    _logger.info("INT8 %s calibration: %d sample(s) in %d step(s) of batch %d%s", method, len(calib), steps, batch,
                 ", node by node (bounded memory)" if per_node else ", whole graph")
    if per_node and not dynamic and steps > 1:
        _logger.warning(
            "'%s' has a static batch of %d, so node-by-node calibration walks the whole graph %d times (about 20 "
            "minutes each for ViT-L on 2 CPU cores). Export with --dynamic-batch to calibrate in batches of up to %d.",
            src, batch, steps, MAX_CALIBRATION_BATCH)
    shapes = f"{input_name}:" + "x".join(str(d) for d in (batch, *calib.shape[1:])) if dynamic else None
    with modelopt_logging(cpu_only=True) as level:
        try:
            quantize(
                str(src),
                quantize_mode="int8",
                calibration_data={input_name: calib},
                calibration_method=method,
                calibration_shapes=shapes,
                calibration_eps=["cpu"],
                op_types_to_quantize=list(QUANTIZABLE_OPS),
                nodes_to_exclude=exact_name_regexes(exclude),
                high_precision_dtype="fp32",
                output_path=str(out),
                log_level=level,
                use_external_data_format=src.stat().st_size > 1_800_000_000,
                calibrate_per_node=per_node,  # see calibrates_per_node
                # Weights stored as INT8 initializers + DequantizeLinear (TensorRT's offline-quantized weight form)
                # instead of FP32 weights + QuantizeLinear/DequantizeLinear: same numbers, ~4x smaller weights on disk.
                dq_only=True,
            )
        except Exception as err:  # any failure inside ModelOpt (invpt checked the model and the data before)
            raise ToolError.from_exception("ModelOpt", f"quantizing a copy of the model to INT8 ({method} calibration)",
                                           err, "nvidia-modelopt") from err
    if not out.exists():
        raise ToolError(f"ModelOpt {library_version('nvidia-modelopt')} reported success but wrote no '{out}'; "
                        "re-run with -v and report it.", "ModelOpt", library_version("nvidia-modelopt"))


class _ArrayReader:
    """onnxruntime CalibrationDataReader over an array, ``batch`` samples per call."""

    def __init__(self, name: str, data: np.ndarray, batch: int = 1) -> None:
        self._it = iter([{name: data[i:i + batch]} for i in range(0, len(data), batch)])

    def get_next(self):
        return next(self._it, None)


def _quantize_ort(src: Path, out: Path, calib: np.ndarray, exclude: Sequence[str], input_name: str, batch: int) -> None:
    """Percentile calibration with onnxruntime, in a fresh process.

    ModelOpt patches onnxruntime's calibrators process-wide when it runs, after which ``quantize_static``
    fails ("Histogram has not been collected"); a spawned process keeps the two tools apart. A failure in it (or
    its death, e.g. killed for memory) is a :class:`~invpt.errors.ToolError` chained to the worker's traceback.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    level = logging.getLogger("onnxruntime").getEffectiveLevel()
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        data = Path(tmp) / "calib.npy"
        np.save(data, calib)
        try:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                args = (str(src), str(out), str(data), list(exclude), input_name, batch, level)
                pool.submit(_ort_worker, *args).result()
        except BrokenProcessPool as err:
            raise ToolError(
                "The onnxruntime percentile-calibration worker process died (killed, most likely for lack of memory); "
                "free memory or use fewer --calib-samples, or calibrate with --calib-method entropy.",
                "onnxruntime", library_version("onnxruntime")) from err
        except Exception as err:  # raised in the worker: its traceback is chained
            raise ToolError.from_exception("onnxruntime", "quantizing a copy of the model to INT8 (percentile "
                                           "calibration, quantize_static)", err) from err
    detach_float_consumers(out, FLOAT_ONLY_OPS)


class _OrtAdviceFilter(logging.Filter):
    """``quantize_static`` advises its API user to pre-process the model ("Please consider ... pre-processing"); an
    invpt user cannot act on that, so it is shown as DEBUG (with -vv) instead of a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "consider" not in str(record.msg) or "pre-processing" not in str(record.msg):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def _ort_worker(src: str, out: str, data: str, exclude: list, input_name: str, batch: int, log_level: int) -> None:
    """Runs in the spawned process (invpt's own), whose log follows the parent's level for onnxruntime.

    ``quantize_static`` logs on the root logger and prints its calibration progress to stdout; here both go to
    stderr at ``log_level`` (the progress is info: shown with -v), keeping the parent's stdout for data.
    """
    import contextlib

    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(name)s] %(levelname)s %(message)s"))
    handler.addFilter(_OrtAdviceFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(log_level)
    onnxruntime.set_default_logger_severity(onnxruntime_severity(log_level))
    with open(os.devnull, "w") as devnull, \
            contextlib.redirect_stdout(sys.stderr if log_level <= logging.INFO else devnull):
        quantize_static(
            src, out, _ArrayReader(input_name, np.load(data), batch),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZABLE_OPS), per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
            calibrate_method=CalibrationMethod.Percentile,
            use_external_data_format=Path(src).stat().st_size > 1_800_000_000,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )


FLOAT_ONLY_OPS = ("LayerNormalization", "Softmax", "Resize")


def detach_float_consumers(path: Path, op_types: Sequence[str]) -> int:
    """Make ``op_types`` nodes read the float tensor instead of a DequantizeLinear output; drop orphaned Q/DQ.

    onnxruntime shares one Q/DQ pair among all consumers of a tensor, so a Resize that reads the same
    tensor as a quantized Conv would otherwise see INT8-rounded values. Returns the number of rewired inputs.
    """
    import onnx

    proto = onnx.load(str(path))
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    rewired = 0
    for node in g.node:
        if node.op_type not in op_types:
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]
                rewired += 1
    if rewired:
        changed = True
        while changed:  # remove Q/DQ nodes whose outputs nobody reads any more
            used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
            dead = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in used]
            changed = bool(dead)
            for n in dead:
                g.node.remove(n)
        onnx.save_model(proto, str(path), save_as_external_data=proto.ByteSize() > 1_800_000_000,
                        location=path.name + ".data")
        _logger.info("rewired %d Resize/LayerNorm/Softmax input(s) to float tensors", rewired)
    return rewired
