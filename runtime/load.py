"""Runners from artifacts: every model the runtime reports on is an invpt artifact checked against its manifest.

:func:`load_artifact` reads and verifies an artifact's manifest (sha256, external data; exit 2 on any mismatch),
:func:`load_runner` turns it into the runner that runs it here (ONNX Runtime for an ONNX file, the TensorRT runner
for an engine), or says in one line why this machine cannot (:attr:`Artifact.unavailable`).
:func:`check_against_model` refuses a candidate whose outputs differ in names or shapes from the checkpoint's model.
:func:`reference_runner` is the FP32 PyTorch reference from the checkpoint.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from invpt.errors import InputError, ManifestError
from invpt.manifest import Manifest

_logger = logging.getLogger(__name__)


@dataclass
class Artifact:
    """A verified model artifact: its path, manifest, a unique report label, and why it cannot run here (or None)."""

    path: Path
    manifest: Manifest
    label: str
    unavailable: Optional[str] = None

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def precision(self) -> str:
        return self.manifest.precision

    @property
    def static_batch(self) -> Optional[int]:
        dim = self.manifest.inputs[0].shape[0] if self.manifest.inputs and self.manifest.inputs[0].shape else None
        return dim if isinstance(dim, int) and dim > 0 else None

    def batch_range(self) -> tuple[int, Optional[int]]:
        """(min, max) batch this artifact takes (max None: any)."""
        if self.kind == "engine":
            from invpt.runtime.tensorrt_runner import engine_batch_range

            rng = engine_batch_range(self.manifest)
            if rng is not None:
                return rng
        if self.static_batch:
            return self.static_batch, self.static_batch
        return 1, None

    def check_batch(self, batch: int) -> None:
        """InputError when ``batch`` is outside what the artifact takes (an engine's profile, a static batch)."""
        lo, hi = self.batch_range()
        if lo <= batch and (hi is None or batch <= hi):
            return
        if self.kind == "engine":
            raise InputError(
                f"--batch {batch} is outside the optimisation profile of engine '{self.path}' (batch {lo}..{hi}). "
                f"Choose batches in {lo}..{hi}, or rebuild the engine with a wider profile: invpt-trt-build --onnx "
                f"<its ONNX> --batch {min(lo, batch)},{batch},{max(hi or batch, batch)}."
            )
        raise InputError(
            f"--batch {batch}: '{self.path}' was exported with a static batch of {lo}. Use --batch {lo}, or re-export "
            "with invpt-export --dynamic-batch to time other batch sizes."
        )


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def load_artifact(path: str | os.PathLike, taken: Sequence[str] = ()) -> Artifact:
    """The artifact at ``path`` after checking it against its manifest (ManifestError, exit 2, when the manifest is
    missing, unreadable, or records another sha256). ``taken``: labels already used (the label is made unique)."""
    from invpt.artifacts import verified_manifest

    path = Path(path)
    man = verified_manifest(path, ManifestError, what="Model artifact")
    if man.kind not in ("onnx", "engine"):
        raise ManifestError(f"'{path}' is a {man.kind} according to its manifest; invpt-parity and invpt-bench take "
                            "ONNX files (invpt-export, invpt-quantize) and engines (invpt-trt-build).")
    label = _safe(path.name)
    n = 2
    while label in taken:
        label = f"{_safe(path.name)}-{n}"
        n += 1
    unavailable = None
    if man.kind == "engine":
        from invpt.runtime.tensorrt_runner import tensorrt_unavailable_reason

        unavailable = tensorrt_unavailable_reason(man)
    return Artifact(path, man, label, unavailable)


def load_artifacts(paths: Sequence[str | os.PathLike]) -> list[Artifact]:
    """:func:`load_artifact` for each path; the same file twice is an InputError."""
    if not paths:
        raise InputError("No model given: pass at least one --model ARTIFACT (an ONNX file or engine written by invpt, "
                         "its JSON manifest beside it).")
    out: list[Artifact] = []
    for p in paths:
        for a in out:
            try:
                same = os.path.samefile(a.path, p)
            except OSError:
                same = False
            if same:
                raise InputError(f"--model '{p}' is given twice (also as '{a.path}'); pass each artifact once.")
        out.append(load_artifact(p, [a.label for a in out]))
    return out


def load_runner(artifact: Artifact, *, providers: Sequence[str] = ("cpu",), threads: Optional[int] = None,
                cuda_graph: bool = False, profile_phases: bool = False, name: Optional[str] = None,
                spinning: bool = True) -> Any:
    """The runner for ``artifact`` on this machine: ONNX Runtime (``providers``) for an ONNX file, the TensorRT runner
    for an engine. Raises InputError naming the reason when it cannot run here (see ``artifact.unavailable``).
    ``spinning=False``: ONNX Runtime's threads do not busy-wait between runs (for interleaved timing)."""
    if artifact.kind == "onnx":
        from invpt.runners import OnnxRuntimeRunner

        # Without spinning, ONNX Runtime's idle threads do not busy-wait between runs and steal the CPU from the runner
        # timed next (measured on the tiny model on 2 cores: PyTorch's p50 55-85 ms alone, 210-260 ms beside three
        # spinning sessions).
        config = {} if spinning else {"session.intra_op.allow_spinning": "0"}
        return OnnxRuntimeRunner(artifact.path, providers, threads, manifest=artifact.manifest,
                                 name=name or artifact.label, session_config=config)
    if artifact.unavailable:
        raise InputError(f"Engine '{artifact.path}' cannot run here: {artifact.unavailable}.")
    from invpt.runtime.tensorrt_runner import TensorRTRunner

    return TensorRTRunner(artifact.path, artifact.manifest, cuda_graph=cuda_graph, profile_phases=profile_phases,
                          name=name or artifact.label)


def check_against_model(artifact: Artifact, cfg: Any, ckpt: Path) -> list[str]:
    """The tasks ``artifact`` predicts, after checking its input and outputs against the checkpoint's model ``cfg``.

    Raises InputError naming the differences: an output the model does not have, or an input/output whose channels
    or H x W differ (a candidate of another model, dataset or input size).
    """
    from invpt.manifest import io_for_config

    ins, outs = io_for_config(cfg, "batch")
    want = {o.name: o for o in outs}
    problems = []
    got_in = artifact.manifest.inputs
    if [t.name for t in got_in] != [t.name for t in ins]:
        problems.append(f"inputs {[t.name for t in got_in]} instead of {[t.name for t in ins]}")
    elif list(got_in[0].shape[1:]) != list(ins[0].shape[1:]):
        problems.append(f"input 'image' of shape {list(got_in[0].shape)} instead of [batch, "
                        f"{', '.join(map(str, ins[0].shape[1:]))}]")
    tasks = []
    for o in artifact.manifest.outputs:
        ref = want.get(o.name)
        if ref is None:
            problems.append(f"output '{o.name}', which the model does not have (it predicts {', '.join(want)})")
        elif list(o.shape[1:]) != list(ref.shape[1:]):
            problems.append(f"output '{o.name}' of shape {list(o.shape)} instead of [batch, "
                            f"{', '.join(map(str, ref.shape[1:]))}]")
        else:
            tasks.append(o.name)
    if not tasks and not problems:
        problems.append("no output at all")
    if problems:
        raise InputError(
            f"'{artifact.path}' does not match the checkpoint '{ckpt}' ({cfg.name or cfg.dataset}): it has "
            f"{'; '.join(problems)}. Compare a candidate made from this checkpoint (invpt-export --ckpt {ckpt}, then "
            "invpt-quantize / invpt-trt-build), or pass the checkpoint it was made from with --ckpt."
        )
    parent = artifact.manifest.parent or {}
    if artifact.kind == "onnx" and parent.get("kind") == "checkpoint" and parent.get("sha256"):
        from invpt.manifest import sha256_file

        if sha256_file(ckpt) != parent["sha256"]:
            _logger.warning("'%s' was exported from another checkpoint (sha256 %s...), not '%s': its parity measures "
                            "the difference between two sets of weights, not the conversion", artifact.path,
                            parent["sha256"][:12], ckpt)
    return tasks


def available_memory_bytes() -> Optional[int]:
    """Memory a new allocation can get without swapping: the core's ``MemAvailable`` reading
    (:func:`invpt.preflight.mem_available_bytes`), else (no /proc/meminfo) the free physical pages, or None."""
    from invpt.preflight import mem_available_bytes

    avail = mem_available_bytes()
    if avail is not None:
        return avail
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def io_bytes_per_image(manifest: Manifest) -> tuple[int, int]:
    """(input, all outputs) bytes of one image of an artifact, as float32 (what the runtime keeps in NumPy)."""
    def elems(shape: Sequence[Any]) -> int:
        n = 1
        for d in list(shape)[1:]:
            n *= int(d) if isinstance(d, int) and d > 0 else 1
        return n

    ins = sum(elems(t.shape) for t in manifest.inputs[:1])
    outs = sum(elems(t.shape) for t in manifest.outputs)
    return 4 * ins, 4 * outs


def check_memory(per_unit: int, count: int, flag: str, value: Any, what: str) -> None:
    """InputError (before any work) when ``count`` units of ``per_unit`` bytes, what ``flag value`` makes the run hold
    at once (``what`` says of what), exceed the memory available now; the message gives the largest count that fits."""
    avail = available_memory_bytes()
    need = per_unit * count
    if avail is None or need <= avail:
        return
    largest = avail // per_unit if per_unit else 0
    hint = f" (at most about {largest} here)" if largest >= 1 else ""
    raise InputError(
        f"{flag} {value} needs at least {need / 2**30:.1f} GiB of memory for {what}, but this machine has "
        f"{avail / 2**30:.1f} GiB available. Pass a smaller {flag}{hint}."
    )


def reference_runner(ckpt: str | os.PathLike, config: Optional[str] = None, tasks: Optional[Sequence[str]] = None,
                     device: str = "cpu", autocast: Optional[str] = None, name: Optional[str] = None) -> Any:
    """The PyTorch runner of the checkpoint (FP32 unless ``autocast``); the model is loaded now (memory-mapped)."""
    from invpt import load_model
    from invpt.errors import CheckpointError
    from invpt.paths import require_file
    from invpt.runners import PyTorchRunner

    path = require_file(ckpt, "Checkpoint", "Pass the InvPT checkpoint (.pth/.pth.tar) with --ckpt.", CheckpointError)
    model = load_model(path, config=config, fused_attn=False)
    return PyTorchRunner(model, tasks, device=device, autocast=autocast, name=name)
