"""The TensorRT runner: a plan built by ``invpt-trt-build`` (enterprise TensorRT or TensorRT-RTX) on a CUDA GPU.

Same interface as the core runners (:class:`invpt.runners.Runner`): ``infer({"image": array}) -> {task: array}``,
host numpy arrays in and out, feeds checked against the engine manifest's inputs. Inside: name-based I/O
(``set_input_shape`` / ``set_tensor_address``), ``execute_async_v3`` on one CUDA stream, pinned host staging
buffers, device buffers allocated with torch (kept per input shape), and optionally a CUDA graph captured per input
shape (``cuda_graph=True``; replayed on later calls of that shape). With ``profile_phases=True`` each call records
host-to-device, compute and device-to-host times measured with CUDA events (``last_phases_ms``), which
``invpt-bench`` reports as the GPU split.

Loading an engine needs a CUDA GPU the engine was built for; :func:`tensorrt_unavailable_reason` says in one line
why this machine cannot (no TensorRT module, no CUDA GPU visible to torch). This module is not exercised on the
CPU-only development machine: its tests skip with that reason.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from invpt.errors import InputError, ManifestError, ToolError
from invpt.manifest import Manifest
from invpt.runners import Runner

_logger = logging.getLogger(__name__)

# build.backend (the module name recorded in an engine manifest) -> engines.backend key
_BACKEND_KEYS = {"tensorrt": "tensorrt", "tensorrt_rtx": "rtx"}
# the equivalent command-line tool of each backend module
CLI_TOOLS = {"tensorrt": "trtexec", "tensorrt_rtx": "tensorrt_rtx"}


def engine_backend_module(manifest: Manifest) -> str:
    """The TensorRT module an engine was built with (``tensorrt`` or ``tensorrt_rtx``), from its manifest."""
    return (manifest.build.backend if manifest.build is not None else "") or "tensorrt"


def engine_batch_range(manifest: Manifest) -> Optional[tuple[int, int]]:
    """(min, max) batch of the engine's optimisation profile (first input), or None when the manifest has none."""
    shapes = manifest.build.profile_shapes if manifest.build is not None else {}
    if not shapes:
        return None
    first = next(iter(shapes.values()))
    try:
        return int(first["min"][0]), int(first["max"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def tensorrt_unavailable_reason(manifest: Optional[Manifest] = None) -> Optional[str]:
    """None when this machine can load engines of ``manifest``'s backend, else one line saying why not."""
    import importlib

    module = engine_backend_module(manifest) if manifest is not None else "tensorrt"
    try:
        importlib.import_module(module)
    except Exception as err:  # ImportError, or a broken install (missing shared library)
        return (f"the engine needs the '{module}' Python module, which does not import here ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:120] if str(err) else ''})")
    try:
        import torch
    except ImportError:
        return "the TensorRT runner allocates its device buffers with torch, which is not installed"
    if not torch.cuda.is_available():
        return ("no CUDA GPU is visible (torch.cuda.is_available() is False): loading and running a TensorRT engine "
                "needs the GPU it was built for")
    return None


def trtexec_command(plan: str | os.PathLike, manifest: Manifest, batch: int = 1, iters: int = 100, warmup: int = 10,
                    cuda_graph: bool = False) -> str:
    """The equivalent ``trtexec`` (enterprise TensorRT) or ``tensorrt_rtx`` (TensorRT-RTX) timing command."""
    import shlex

    tool = CLI_TOOLS.get(engine_backend_module(manifest), "trtexec")
    parts = [tool, f"--loadEngine={plan}"]
    shapes = []
    for t in manifest.inputs:
        dims = [batch if not isinstance(d, int) or d <= 0 else d for d in t.shape]
        shapes.append(f"{t.name}:{'x'.join(str(d) for d in dims)}")
    if any(not isinstance(d, int) for t in manifest.inputs for d in t.shape):
        parts.append("--shapes=" + ",".join(shapes))
    parts += [f"--warmUp={max(warmup, 0) * 10}", f"--iterations={iters}", "--avgRuns=10", "--percentile=50,90,95,99"]
    if cuda_graph:
        parts.append("--useCudaGraph")
    return shlex.join(parts)


class TensorRTRunner(Runner):
    """A TensorRT plan on a CUDA GPU. Build it with :func:`invpt.runtime.load_runner` (checks the manifest first)."""

    backend = "tensorrt"

    def __init__(self, path: str | os.PathLike, manifest: Manifest, *, device: str = "cuda", cuda_graph: bool = False,
                 profile_phases: bool = False, name: Optional[str] = None) -> None:
        if manifest.kind != "engine":
            raise ManifestError(f"'{path}' is a {manifest.kind} according to its manifest; the TensorRT runner runs "
                                "engines built by invpt-trt-build.")
        if not str(device).startswith("cuda"):
            raise InputError(f"TensorRT runner for '{path}': device '{device}' is not a CUDA device; use cuda or cuda:N.")
        why = tensorrt_unavailable_reason(manifest)
        if why:
            raise InputError(f"TensorRT runner for '{path}': {why}.")
        self.path = Path(path)
        self.manifest = manifest
        self.module = engine_backend_module(manifest)
        self.cuda_graph = bool(cuda_graph)
        self.profile_phases = bool(profile_phases)
        self.batch_range = engine_batch_range(manifest)
        super().__init__(device, manifest.precision, manifest.tasks, name)
        self.backend = "tensorrt-rtx" if self.module == "tensorrt_rtx" else "tensorrt"
        self._inputs = tuple(manifest.inputs)
        self.last_phases_ms: Optional[dict[str, float]] = None
        self.peak_device_bytes = 0
        self._reset()

    def _reset(self) -> None:
        self._engine = self._context = self._stream = self._trt = None
        self._buffers: dict[tuple, dict[str, Any]] = {}
        self._graphs: dict[tuple, Any] = {}

    def describe(self) -> str:
        return f"{self.name} ('{self.path}')"

    # ---- lifetime -----------------------------------------------------------------------------------------
    def _activate(self) -> None:
        import torch

        from invpt.engines.backend import load_backend

        be = load_backend(_BACKEND_KEYS.get(self.module, "auto"))
        self._trt = be.trt
        self._torch_device = torch.device(self.device)
        if self._torch_device.index is not None:
            torch.cuda.set_device(self._torch_device)
        runtime = be.trt.Runtime(be.logger())
        try:
            engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        except Exception as err:
            raise ToolError.from_exception(be.title, f"loading '{self.path}'", err) from err
        if engine is None:
            errors = be.logged_errors()
            raise InputError(
                f"{be.describe()} could not load '{self.path}' on {torch.cuda.get_device_name(self._torch_device)}"
                f"{': ' + errors[-1] if errors else ''}. An engine runs only on the GPUs (and TensorRT version) it was "
                "built for (TensorRT-RTX engines: RTX GPUs, not Hopper or Jetson); rebuild it on this machine with "
                f"invpt-trt-build.")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode_in = be.trt.TensorIOMode.INPUT
        self._input_names = [n for n in names if engine.get_tensor_mode(n) == mode_in]
        self._output_names = [n for n in names if engine.get_tensor_mode(n) != mode_in]
        want_in = [t.name for t in self.manifest.inputs]
        if sorted(self._input_names) != sorted(want_in):
            raise ManifestError(f"'{self.path}' takes inputs {self._input_names} but its manifest records {want_in}; "
                                "the manifest does not describe this engine. Rebuild both with invpt-trt-build.")
        missing = [t for t in (self.tasks or ()) if t not in self._output_names]
        if missing:
            raise ManifestError(f"'{self.path}' has no output(s) {missing} (outputs {self._output_names}); rebuild it "
                                "with invpt-trt-build.")
        self._dtypes = {n: self._torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = torch.cuda.Stream(device=self._torch_device)

    def _deactivate(self) -> None:
        import torch

        self._reset()
        torch.cuda.empty_cache()

    def _torch_dtype(self, trt_dtype: Any) -> Any:
        import torch

        trt = self._trt
        table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
                 "int32": torch.int32, "int64": torch.int64, "bool": torch.bool, "uint8": torch.uint8}
        for name, td in table.items():
            if getattr(trt, name, None) is not None and trt_dtype == getattr(trt, name):
                return td
        raise ManifestError(f"'{self.path}' has an I/O tensor of type {trt_dtype}, which the TensorRT runner does not "
                            "handle; rebuild it with invpt-trt-build.")

    # ---- inference ----------------------------------------------------------------------------------------
    def _check_profile(self, name: str, shape: tuple[int, ...]) -> None:
        lo, _opt, hi = (tuple(s) for s in self._engine.get_tensor_profile_shape(name, 0))
        if any(not (a <= d <= b) for a, d, b in zip(lo, shape, hi)):
            raise InputError(f"{self.describe()}: input '{name}' of shape {list(shape)} is outside the engine's "
                             f"optimisation profile (min {list(lo)}, max {list(hi)}). Feed a batch in that range, or "
                             "rebuild the engine with invpt-trt-build --batch MIN,OPT,MAX.")

    def _buffers_for(self, key: tuple, feed: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        if key in self._buffers:
            return self._buffers[key]
        ctx = self._context
        bufs: dict[str, Any] = {"in": {}, "out": {}, "host_in": {}, "host_out": {}}
        for name in self._input_names:
            shape = tuple(feed[name].shape)
            self._check_profile(name, shape)
            ctx.set_input_shape(name, shape)
            bufs["in"][name] = torch.empty(shape, dtype=self._dtypes[name], device=self._torch_device)
            bufs["host_in"][name] = torch.empty(shape, dtype=self._dtypes[name], pin_memory=True)
        if not getattr(ctx, "all_binding_shapes_specified", True):
            raise InputError(f"{self.describe()}: TensorRT could not infer the output shapes for inputs "
                             f"{ {n: list(feed[n].shape) for n in self._input_names} }.")
        for name in self._output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            bufs["out"][name] = torch.empty(shape, dtype=self._dtypes[name], device=self._torch_device)
            bufs["host_out"][name] = torch.empty(shape, dtype=self._dtypes[name], pin_memory=True)
        self._buffers = {key: bufs}  # one shape at a time: a new shape frees the previous buffers
        self._graphs = {}
        return bufs

    def _bind(self, bufs: dict[str, Any]) -> None:
        ctx = self._context
        for name, t in bufs["in"].items():
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        for name, t in bufs["out"].items():
            ctx.set_tensor_address(name, t.data_ptr())

    def _execute(self) -> None:
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise ToolError(f"TensorRT execute_async_v3 failed for '{self.path}'; run with -v for TensorRT's log.",
                            library=self.module)

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        key = tuple((n, tuple(feed[n].shape)) for n in self._input_names)
        bufs = self._buffers_for(key, feed)
        stream = self._stream
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if self.profile_phases else None
        for name in self._input_names:
            bufs["host_in"][name].numpy()[...] = feed[name]
        with torch.cuda.stream(stream):
            if events:
                events[0].record(stream)
            for name in self._input_names:
                bufs["in"][name].copy_(bufs["host_in"][name], non_blocking=True)
            if events:
                events[1].record(stream)
            if self.cuda_graph:
                graph = self._graphs.get(key)
                if graph is None:
                    self._bind(bufs)
                    self._execute()  # one plain run first: TensorRT allocates lazily, which capture does not allow
                    stream.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=stream):
                        self._execute()
                    self._graphs[key] = graph
                graph.replay()
            else:
                self._bind(bufs)
                self._execute()
            if events:
                events[2].record(stream)
            for name in self._output_names:
                bufs["host_out"][name].copy_(bufs["out"][name], non_blocking=True)
            if events:
                events[3].record(stream)
        stream.synchronize()
        if events:
            self.last_phases_ms = {"h2d_ms": events[0].elapsed_time(events[1]),
                                   "compute_ms": events[1].elapsed_time(events[2]),
                                   "d2h_ms": events[2].elapsed_time(events[3])}
        self.peak_device_bytes = max(self.peak_device_bytes, int(torch.cuda.max_memory_allocated(self._torch_device))
                                     + int(getattr(self._engine, "device_memory_size_v2", 0)
                                           or getattr(self._engine, "device_memory_size", 0) or 0))
        wanted = self.tasks if self.tasks is not None else tuple(self._output_names)
        return {t: bufs["host_out"][t].float().numpy().copy() for t in wanted}
