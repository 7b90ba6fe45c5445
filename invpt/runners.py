"""Runners: one interface over every backend that can run an InvPT model (Polygraphy's runner idea).

A runner is a context manager. Entering it (:meth:`Runner.activate`) loads what the backend needs (the model on its
device, an ONNX Runtime session); leaving it (:meth:`Runner.deactivate`) releases that, so the memory of one phase is
free before the next starts. While active, :meth:`Runner.infer` takes ``{"image": array}`` and returns
``{task: array}`` (host numpy arrays in, host numpy arrays out); :meth:`Runner.run_batches` feeds a whole
``[N, 3, H, W]`` array in batches and concatenates the outputs per task.

Every feed is checked against the runner's inputs (a manifest's ``inputs``: name, dtype, shape with a symbolic
batch) before it reaches the backend, so a wrong shape or dtype is one line naming the input, not a backend trace;
non-finite inputs are refused too.

Implementations here: :class:`PyTorchRunner` (the reference) and :class:`OnnxRuntimeRunner`; :func:`from_manifest`
builds an ONNX Runtime runner for an ONNX artifact after checking it against its manifest. The runtime stage adds
TensorRT runners on the same interface. torch and onnxruntime are imported only when a runner is built.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Type

import numpy as np

from invpt.errors import InputError, InvptError, ManifestError, ToolError
from invpt.lazy import require
from invpt.manifest import Manifest, TensorInfo

_logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]

# ONNX Runtime element types -> numpy dtype names (the names manifests use).
_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16", "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool",
}

# Short execution-provider names -> ONNX Runtime's names; the short name is the runner's ``device``.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


def _shape_text(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_feed(feed: Feed, specs: Sequence[TensorInfo], who: str) -> dict[str, np.ndarray]:
    """``feed`` as arrays, after checking names, dtypes, ranks, static dims and finiteness against ``specs``.

    A string dimension (``"batch"``) takes any size >= 1, the same size wherever the same name appears (``"?"``, an
    unnamed dynamic dimension, takes any size >= 1).
    Raises InputError (one line, naming the input, what it got and what the model takes).
    """
    if not isinstance(feed, Mapping):
        raise InputError(f"{who} takes a mapping of input name to array, e.g. {{'image': x}}, got "
                         f"{type(feed).__name__}.")
    want = {s.name: s for s in specs}
    missing = [n for n in want if n not in feed]
    extra = [n for n in feed if n not in want]
    if missing or extra:
        raise InputError(
            f"{who} takes input(s) {', '.join(repr(n) for n in want)}, got {', '.join(repr(n) for n in feed) or 'none'}"
            f"{' (missing ' + ', '.join(missing) + ')' if missing else ''}"
            f"{' (unexpected ' + ', '.join(extra) + ')' if extra else ''}."
        )
    out: dict[str, np.ndarray] = {}
    symbols: dict[str, int] = {}
    for name, spec in want.items():
        x = feed[name]
        if not isinstance(x, np.ndarray):
            raise InputError(f"{who}: input '{name}' must be a numpy array, got {type(x).__name__}.")
        takes = f"the model takes {spec.dtype} {_shape_text(spec.shape)}"
        if str(x.dtype) != spec.dtype:
            raise InputError(f"{who}: input '{name}' has dtype {x.dtype}; {takes}. Convert it, e.g. "
                             f"x.astype(np.{spec.dtype}).")
        if x.ndim != len(spec.shape):
            raise InputError(f"{who}: input '{name}' has shape {_shape_text(x.shape)} ({x.ndim} dims); {takes}.")
        for i, (got, dim) in enumerate(zip(x.shape, spec.shape)):
            if isinstance(dim, int) and dim > 0:
                if got != dim:
                    raise InputError(f"{who}: input '{name}' has shape {_shape_text(x.shape)}; {takes} (dimension {i} "
                                     f"must be {dim}).")
            else:
                if got < 1:
                    raise InputError(f"{who}: input '{name}' has shape {_shape_text(x.shape)}; dimension {i} "
                                     f"('{dim}') must be at least 1.")
                key = str(dim)
                if key != "?" and symbols.setdefault(key, got) != got:
                    raise InputError(f"{who}: dimension '{key}' is {symbols[key]} in one input and {got} in "
                                     f"'{name}'; feed the same size to every input.")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise InputError(f"{who}: input '{name}' contains NaN or infinite values; check the preprocessing "
                             "(a corrupt image, a division by a zero std).")
        out[name] = x
    return out


class Runner:
    """What every backend offers. Subclasses implement ``_activate``, ``_deactivate`` and ``_infer``.

    Attributes: ``name`` (a label for reports, e.g. ``onnxruntime-cpu-int8``), ``backend`` (``pytorch``,
    ``onnxruntime``...), ``device`` (``cpu``, ``cuda``...), ``precision`` (``fp32``, ``fp16``, ``int8``...),
    ``tasks`` (the outputs returned; None: every output).
    """

    backend: str = ""

    def __init__(self, device: str, precision: str, tasks: Optional[Sequence[str]], name: Optional[str]) -> None:
        self.device = device
        self.precision = precision
        self.tasks: Optional[tuple[str, ...]] = tuple(tasks) if tasks is not None else None
        self.name = name or f"{self.backend}-{device}" + (f"-{precision}" if precision else "")
        self._inputs: Optional[tuple[TensorInfo, ...]] = None
        self.is_active = False

    # ---- lifetime ---------------------------------------------------------------------------------
    def activate(self) -> "Runner":
        """Load what inference needs. Activating an active runner does nothing."""
        if not self.is_active:
            _logger.debug("activating %s", self.name)
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        """Release the backend's resources (model, session, device memory). Safe to call twice."""
        if self.is_active:
            _logger.debug("deactivating %s", self.name)
            try:
                self._deactivate()
            finally:
                self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    @contextlib.contextmanager
    def activated(self) -> Iterator["Runner"]:
        """Active for the block: activates when needed and then deactivates; an already active runner stays active."""
        if self.is_active:
            yield self
            return
        with self:
            yield self

    # ---- inputs -----------------------------------------------------------------------------------
    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        """The inputs the runner takes (known from its manifest or model, else once active)."""
        if self._inputs is None:
            raise RuntimeError(f"{self.name}: inputs are known once the runner is active (use `with runner:`).")
        return self._inputs

    @property
    def static_batch(self) -> Optional[int]:
        """The first input's fixed batch size, or None when the batch dimension is dynamic."""
        dim = self.inputs[0].shape[0] if self.inputs and self.inputs[0].shape else None
        return dim if isinstance(dim, int) and dim > 0 else None

    def describe(self) -> str:
        """How messages name the runner (ONNX Runtime adds the file)."""
        return self.name

    def check_inputs(self, feed: Feed) -> dict[str, np.ndarray]:
        """``feed`` checked against :attr:`inputs` (see :func:`check_feed`)."""
        return check_feed(feed, self.inputs, self.describe())

    # ---- inference --------------------------------------------------------------------------------
    def infer(self, feed: Feed, check: bool = True) -> dict[str, np.ndarray]:
        """Outputs ``{task: array}`` for ``feed`` (``{"image": array}``); the runner must be active.

        ``check=False`` skips the input checks (for timing loops that checked the feed once).
        """
        if not self.is_active:
            raise RuntimeError(f"{self.name} is not active: use `with runner:` or runner.activate() before infer().")
        arrays = self.check_inputs(feed) if check else dict(feed)
        return self._infer(arrays)

    def run_batches(self, images: np.ndarray, batch: Optional[int] = None) -> dict[str, np.ndarray]:
        """Outputs for ``images`` ([N, 3, H, W], fed to the single input in chunks of ``batch``), per task.

        ``batch`` defaults to the model's static batch (1 when the batch is dynamic). With a static batch the last
        chunk is padded by repeating its final sample, and the padding is dropped from the outputs. Activates the
        runner for the call when it is not active.
        """
        images = np.asarray(images)
        if images.ndim < 1 or len(images) == 0:
            raise InputError(f"{self.describe()}: run_batches needs at least one sample, got an array of shape "
                             f"{_shape_text(images.shape)}.")
        with self.activated():
            if len(self.inputs) != 1:
                raise InputError(f"{self.describe()} takes {len(self.inputs)} inputs; run_batches feeds a single input. "
                                 "Call infer() with every input instead.")
            static = self.static_batch
            if batch is None:
                batch = static or 1
            if batch < 1:
                raise InputError(f"{self.describe()}: batch must be >= 1, got {batch}.")
            if static and batch != static:
                raise InputError(f"{self.describe()} was built for batch {static}; it cannot take batches of {batch}. "
                                 f"Leave batch out (it defaults to {static}) or use a dynamic-batch model.")
            name = self.inputs[0].name
            outs: dict[str, list[np.ndarray]] = {}
            for i in range(0, len(images), batch):
                chunk = images[i:i + batch]
                n = len(chunk)
                if static and n < static:
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], static - n, axis=0)])
                for task, arr in self.infer({name: chunk}).items():
                    outs.setdefault(task, []).append(arr[:n])
        return {t: np.concatenate(v) for t, v in outs.items()}

    # ---- backend ----------------------------------------------------------------------------------
    def _activate(self) -> None:
        raise NotImplementedError

    def _deactivate(self) -> None:
        raise NotImplementedError

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, device={self.device!r}, precision={self.precision!r}, "
                f"active={self.is_active})")


# ----------------------------------------------------------------------------------------------- PyTorch

_AUTOCAST = {"fp16": "float16", "float16": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}


class PyTorchRunner(Runner):
    """An InvPT ``torch.nn.Module`` (the reference). Inference under ``torch.no_grad()`` in eval mode.

    ``autocast`` (``"fp16"`` or ``"bf16"``) runs under ``torch.autocast`` and is allowed on CUDA only; outputs are
    returned as float32 numpy arrays. Activation moves the model to ``device`` (``model.to``) and sets eval mode.
    """

    backend = "pytorch"

    def __init__(self, model: Any, tasks: Optional[Sequence[str]] = None, device: str = "cpu",
                 autocast: Optional[str] = None, name: Optional[str] = None) -> None:
        torch = require("torch", purpose="the PyTorch runner")
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise InputError(f"PyTorch runner: '{device}' is not a device name; use cpu, cuda or cuda:N.") from err
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise InputError(f"PyTorch runner: device '{device}' requested but this torch "
                                 f"({torch.__version__}) sees no CUDA GPU; use device='cpu'.")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise InputError(f"PyTorch runner: device '{device}' requested but only {torch.cuda.device_count()} "
                                 "CUDA GPU(s) are visible.")
        elif dev.type != "cpu":
            raise InputError(f"PyTorch runner: device '{device}' is not supported; use cpu, cuda or cuda:N.")
        if autocast is not None:
            if str(autocast) not in _AUTOCAST:
                raise InputError(f"PyTorch runner: autocast must be fp16 or bf16, got '{autocast}'.")
            if dev.type != "cuda":
                raise InputError(f"PyTorch runner: autocast {autocast} runs on CUDA only; on {device} the reference is "
                                 "FP32 (leave autocast out).")
        cfg = getattr(model, "cfg", None)
        if cfg is None or not hasattr(model, "resolve_tasks"):
            raise InputError(f"PyTorch runner takes an InvPT model (invpt.load_model), got {type(model).__name__}.")
        resolved = tuple(model.resolve_tasks(tasks))  # ConfigError naming the model's tasks for an unknown one
        precision = "fp32" if autocast is None else ("fp16" if _AUTOCAST[str(autocast)] == "float16" else "bf16")
        super().__init__(str(dev), precision, resolved, name)
        self.model = model
        self._torch_device = dev
        self._autocast = None if autocast is None else getattr(torch, _AUTOCAST[str(autocast)])
        from invpt.manifest import io_for_config

        self._inputs = io_for_config(cfg, "batch", resolved)[0]

    def _activate(self) -> None:
        self.model.to(self._torch_device)
        self.model.eval()

    def _deactivate(self) -> None:
        if self._torch_device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(feed[self._inputs[0].name])).to(self._torch_device)
        with torch.no_grad():
            if self._autocast is not None:
                with torch.autocast(self._torch_device.type, dtype=self._autocast):
                    out = self.model(x, tasks=self.tasks)
            else:
                out = self.model(x, tasks=self.tasks)
        return {t: out[t].detach().float().cpu().numpy() for t in self.tasks}


# ----------------------------------------------------------------------------------------------- ONNX Runtime

def resolve_providers(providers: str | Sequence[str]) -> list[str]:
    """ONNX Runtime provider names for short names (``cpu``, ``cuda``, ``tensorrt``...) or full names; each must be
    available in the installed onnxruntime, else InputError (ONNX Runtime itself would silently fall back to CPU)."""
    ort = require("onnxruntime", purpose="the ONNX Runtime runner")
    names = [providers] if isinstance(providers, str) else list(providers)
    if not names:
        raise InputError("ONNX Runtime runner: no execution provider given; use providers=('cpu',).")
    available = list(ort.get_available_providers())
    out = []
    for p in names:
        full = PROVIDER_ALIASES.get(str(p).lower(), str(p))
        if full not in available:
            raise InputError(
                f"ONNX Runtime execution provider '{p}' is not available in this onnxruntime ({ort.__version__}; "
                f"available: {', '.join(available)}). Use one of those (--provider cpu on the command line, "
                f"providers=('cpu',) from Python), or install the "
                "onnxruntime build that provides it (onnxruntime-gpu for CUDA and TensorRT)."
            )
        out.append(full)
    return out


def _device_of(provider: str) -> str:
    for short, full in PROVIDER_ALIASES.items():
        if full == provider:
            return short
    return provider.replace("ExecutionProvider", "").lower()


def _session_inputs(session) -> tuple[TensorInfo, ...]:
    return tuple(
        TensorInfo(i.name, _ORT_DTYPES.get(i.type, i.type),
                   tuple(d if isinstance(d, int) and d > 0 else (d if isinstance(d, str) and d else "?")
                         for d in i.shape))
        for i in session.get_inputs()
    )


def _same_io(manifest_io: Sequence[TensorInfo], session_io: Sequence[TensorInfo]) -> bool:
    if [t.name for t in manifest_io] != [t.name for t in session_io]:
        return False
    for m, s in zip(manifest_io, session_io):
        if m.dtype != s.dtype or len(m.shape) != len(s.shape):
            return False
        for a, b in zip(m.shape, s.shape):
            if isinstance(a, int) != isinstance(b, int) or (isinstance(a, int) and a != b):
                return False
    return True


class OnnxRuntimeRunner(Runner):
    """An ONNX file in ONNX Runtime (CPU by default). One session, created on activate and released on deactivate.

    ``tasks`` names the outputs to return (default: every output). ``manifest`` (see :func:`from_manifest`) gives
    the inputs to check feeds against, the precision and the tasks; the session's inputs must match it.
    ``error_cls`` is raised when ONNX Runtime cannot load the file (default InputError; a stage that produced the
    file itself passes its own error class).
    """

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, providers: str | Sequence[str] = ("cpu",), threads: Optional[int] = None,
                 *, tasks: Optional[Sequence[str]] = None, manifest: Optional[Manifest] = None,
                 precision: Optional[str] = None, name: Optional[str] = None,
                 error_cls: Type[InvptError] = InputError, session_config: Optional[Mapping[str, str]] = None) -> None:
        from invpt.paths import require_file

        # SessionOptions config entries, e.g. {"session.intra_op.allow_spinning": "0"} so that idle threads do not
        # busy-wait between runs (for timing several runners interleaved on few cores).
        self.session_config = dict(session_config or {})

        self.providers = resolve_providers(providers)
        self.path = require_file(path, "ONNX file", "Pass the .onnx file written by invpt-export or invpt-quantize.",
                                 InputError)
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise InputError(f"ONNX Runtime runner: threads must be an integer >= 1 (or None for ONNX Runtime's "
                             f"default), got {threads!r}.")
        self.threads = threads
        self.manifest = manifest
        if tasks is None and manifest is not None:
            tasks = manifest.tasks
        if manifest is not None and tasks is not None:
            unknown = [t for t in tasks if t not in manifest.tasks]
            if unknown:
                raise InputError(f"ONNX Runtime runner: task(s) {unknown} requested; '{self.path.name}' predicts "
                                 f"{list(manifest.tasks)}.")
        precision = precision or (manifest.precision if manifest is not None else "")
        super().__init__(_device_of(self.providers[0]), precision, tasks, name)
        self.error_cls = error_cls
        self._inputs = tuple(manifest.inputs) if manifest is not None else None
        self._session = None
        self._output_names: list[str] = []

    def _activate(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        for key, value in self.session_config.items():
            opts.add_session_config_entry(key, str(value))
        try:
            session = ort.InferenceSession(str(self.path), sess_options=opts, providers=self.providers)
        except Exception as err:
            raise self.error_cls(
                f"ONNX Runtime cannot load '{self.path}' ({type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}). "
                "The file is corrupt, incomplete (missing .data file?), or uses an op ONNX Runtime lacks; re-export it."
            ) from err
        got = session.get_providers()
        if self.providers[0] not in got:
            raise InputError(f"ONNX Runtime could not use {self.providers[0]} for '{self.path}' (session providers: "
                             f"{', '.join(got)}); its libraries (CUDA, cuDNN, TensorRT) are missing or do not match "
                             "this onnxruntime. Fix the installation or use providers=('cpu',).")
        found = _session_inputs(session)
        if self.manifest is not None:
            if not _same_io(self.manifest.inputs, found):
                raise ManifestError(
                    f"'{self.path}' takes inputs {[(t.name, t.dtype, list(t.shape)) for t in found]} but its manifest "
                    f"records {[(t.name, t.dtype, list(t.shape)) for t in self.manifest.inputs]}; the manifest does not "
                    "describe this file. Regenerate both with the invpt stage that wrote them."
                )
        else:
            self._inputs = found
        outputs = [o.name for o in session.get_outputs()]
        if self.tasks is not None:
            missing = [t for t in self.tasks if t not in outputs]
            if missing:
                raise InputError(f"'{self.path}' has no output(s) {missing} (outputs: {', '.join(outputs)}); "
                                 "request tasks the model was exported with.")
        self._output_names = list(self.tasks) if self.tasks is not None else outputs
        self._session = session

    def describe(self) -> str:
        return f"{self.name} ('{self.path}')"

    def _deactivate(self) -> None:
        self._session = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            res = self._session.run(self._output_names, feed)
        except Exception as err:  # inputs were checked: a failure here is ONNX Runtime's
            raise ToolError.from_exception("ONNX Runtime", f"running '{self.path}'", err,
                                           distribution="onnxruntime") from err
        return dict(zip(self._output_names, res))


def from_manifest(path: str | os.PathLike, providers: str | Sequence[str] = ("cpu",), threads: Optional[int] = None,
                  *, tasks: Optional[Sequence[str]] = None, name: Optional[str] = None) -> OnnxRuntimeRunner:
    """An ONNX Runtime runner for the ONNX artifact ``path``, checked against its manifest first.

    The file must match the sha256 (and external data) its manifest records; feeds are then checked against the
    manifest's inputs, and on activation the session's inputs must match them. Raises ManifestError for a missing,
    stale or non-ONNX manifest.
    """
    from invpt.artifacts import verified_manifest

    path = Path(path)
    man = verified_manifest(path, what="ONNX file")
    if man.kind != "onnx":
        raise ManifestError(f"'{path}' is a {man.precision} {man.kind} according to its manifest; the ONNX Runtime "
                            "runner runs ONNX files (engines run with the TensorRT runner of invpt.runtime).")
    return OnnxRuntimeRunner(path, providers, threads, tasks=tasks, manifest=man, name=name)
