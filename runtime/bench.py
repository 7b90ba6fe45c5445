"""``invpt-bench``: several runners side by side in one run, interleaved, at each batch size.

What is timed is :meth:`invpt.runners.Runner.infer` end to end (host arrays in, host arrays out: for a GPU runner the
copies are included, like trtexec's host latency), with the statistics of :mod:`invpt.latency` (mean, std, p50,
p90, p95, p99, min, max, throughput; numpy percentiles). Runners of one batch size are timed round-robin
(:func:`invpt.latency.time_interleaved`) so drift of a shared machine hits them alike; ONNX Runtime's threads are
told not to spin-wait between runs, else they take the CPU from the runner timed next. The TensorRT runner also
reports the GPU split (host-to-device, compute, device-to-host, from CUDA events), and with ``cuda_graph`` each engine
is timed a second time replaying a CUDA graph. Peak memory: the process's peak RSS, and per GPU runner its peak
device memory.

The report folder gets ``bench.json``, ``bench.md`` and ``bench.png``. For every engine the equivalent
``trtexec`` / ``tensorrt_rtx`` command is printed and recorded; an engine this machine cannot run is listed with the
reason and not timed.

``bench.json``: ``schema`` ("invpt.bench"), ``version`` (1), ``created``, ``machine`` {``platform``, ``cpu_count``,
``gpus``}, ``settings`` {``batches``, ``iters``, ``warmup``, ``threads``}, ``results``: a list of {``runner``,
``artifact``, ``kind``, ``backend``, ``device``, ``precision``, ``batch``, ``cuda_graph``, ``stats``
(:meth:`invpt.latency.LatencyStats.to_dict`: ``*_ms``, ``throughput_ips``, ``times_s``), ``gpu_split_ms`` or null,
``peak_device_bytes`` or null}, ``not_run``: a list of {``artifact``, ``reason``}, ``commands``: a list of
{``artifact``, ``batch``, ``command``}, ``peak_rss_bytes``.
"""
from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from invpt.errors import InputError

_logger = logging.getLogger(__name__)

SCHEMA = "invpt.bench"
REPORT_FILES = ("bench.json", "bench.md", "bench.png")


@dataclass
class BenchReport:
    out_dir: Path
    json_path: Path
    markdown_path: Path
    plot_path: Optional[Path]
    data: dict


def parse_batches(text: Optional[str]) -> list[int]:
    """``"1,4"`` -> [1, 4] (each >= 1, no repeats)."""
    if text is None:
        return [1]
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"--batch expects batch sizes separated by commas, e.g. --batch 1,4; got '{text}'.") from None
    if not vals or any(v < 1 for v in vals):
        raise InputError(f"--batch expects batch sizes >= 1 separated by commas, e.g. --batch 1,4; got '{text}'.")
    return list(dict.fromkeys(vals))


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)


def _plot(results: list[dict], path: Path) -> Optional[Path]:
    """Per-iteration latency distribution of every runner and batch (box plot), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _logger.warning("matplotlib is not installed: no bench.png (pip install 'invpt[calib]')")
        return None
    from invpt.atomic import atomic_path

    labels = [f"{r['runner']}\nbatch {r['batch']}" for r in results]
    data = [np.asarray(r["stats"]["times_s"]) * 1e3 for r in results]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(results) + 2), 4.5))
    ax.boxplot(data, showfliers=True, whis=(5, 95))
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7, rotation=20, ha="right")
    for k, r in enumerate(results, start=1):
        ax.plot([k], [r["stats"]["mean_ms"]], marker="x", color="tab:red")
    ax.set_ylabel("latency per iteration (ms)")
    ax.set_title("invpt-bench: box p25-p75, whiskers p5-p95, x = mean")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _markdown(data: dict) -> str:
    s = data["settings"]
    lines = ["# Latency report", "",
             f"Interleaved timing: {s['warmup']} warm-up + {s['iters']} timed iterations per runner and batch; "
             "`infer()` end to end (host arrays in and out); ONNX Runtime threads do not spin between runs. Machine: "
             f"{data['machine']['platform']}, {data['machine']['cpu_count']} CPU(s), GPUs: "
             f"{', '.join(g['name'] for g in data['machine']['gpus']) or 'none'}.", "",
             "| runner | precision | batch | mean ms | p50 | p90 | p95 | p99 | min | max | img/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        st = r["stats"]
        lines.append(f"| `{r['runner']}` | {r['precision']} | {r['batch']} | {st['mean_ms']:.3f} | {st['p50_ms']:.3f} "
                     f"| {st['p90_ms']:.3f} | {st['p95_ms']:.3f} | {st['p99_ms']:.3f} | {st['min_ms']:.3f} | "
                     f"{st['max_ms']:.3f} | {st['throughput_ips']:.1f} |")
    split = [r for r in data["results"] if r.get("gpu_split_ms")]
    if split:
        lines += ["", "GPU split (mean ms, CUDA events):", "",
                  "| runner | batch | CUDA graph | H2D | compute | D2H | end to end |", "|---|---|---|---|---|---|---|"]
        for r in split:
            g = r["gpu_split_ms"]
            lines.append(f"| `{r['runner']}` | {r['batch']} | {'yes' if r['cuda_graph'] else 'no'} | {g['h2d_ms']:.3f} "
                         f"| {g['compute_ms']:.3f} | {g['d2h_ms']:.3f} | {r['stats']['mean_ms']:.3f} |")
    lines += ["", f"Peak RSS of the process: {data['peak_rss_bytes'] / 2**20:.0f} MiB."]
    if data["not_run"]:
        lines += ["", "Not run on this machine:", ""]
        lines += [f"- `{n['artifact']}`: {n['reason']}" for n in data["not_run"]]
    if data["commands"]:
        lines += ["", "Equivalent TensorRT commands (run them on the target GPU):", "", "```"]
        lines += [c["command"] for c in data["commands"]]
        lines += ["```"]
    if data.get("plot"):
        lines += ["", f"![latency]({data['plot']})"]
    return "\n".join(lines) + "\n"


def run_bench(
    models: Sequence[str | os.PathLike] = (),
    out: str | os.PathLike = "bench",
    *,
    ckpt: Optional[str | os.PathLike] = None,
    config: Optional[str] = None,
    batches: Sequence[int] = (1,),
    iters: int = 50,
    warmup: int = 5,
    threads: Optional[int] = None,
    torch_device: str = "cpu",
    autocast: Sequence[str] = (),
    cuda_graph: bool = False,
    providers: Sequence[str] = ("cpu",),
    seed: int = 0,
    artifacts: Optional[list] = None,
) -> BenchReport:
    """Time every runner (the checkpoint's PyTorch runner when ``ckpt`` is given, plus each of ``models``) at each
    batch size; write the report into ``out``. Every input is checked (manifests, batch ranges) before any timing."""
    from invpt.latency import time_interleaved
    from invpt.manifest import now_iso
    from invpt.runtime.load import load_artifacts, load_runner, reference_runner
    from invpt.runtime.reports import prepare_report_dir, write_json, write_text
    from invpt.runtime.tensorrt_runner import trtexec_command

    if not models and ckpt is None and not artifacts:
        raise InputError("Nothing to time: pass --model ARTIFACT (repeatable) and/or --ckpt CKPT (the PyTorch runner).")
    if not isinstance(iters, int) or iters < 1:
        raise InputError(f"--iters must be >= 1, got {iters}.")
    if not isinstance(warmup, int) or warmup < 0:
        raise InputError(f"--warmup must be >= 0, got {warmup}.")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}.")
    batches = list(batches)
    if not batches or any(not isinstance(b, int) or b < 1 for b in batches):
        raise InputError(f"--batch sizes must be integers >= 1, got {batches}.")
    arts = artifacts if artifacts is not None else (load_artifacts(models) if models else [])
    for a in arts:  # before any work: --batch outside an engine's profile or an ONNX's static batch
        for b in batches:
            a.check_batch(b)
    out = prepare_report_dir(out, REPORT_FILES, [ckpt, *[a.path for a in arts]], owner=("bench.json", SCHEMA))
    if any(a.kind == "onnx" for a in arts):
        from invpt.runners import resolve_providers

        resolve_providers(providers)  # an execution provider this onnxruntime lacks: exit 2 before any timing
    commands = []
    for a in arts:
        if a.kind == "engine":
            for b in batches:
                cmd = trtexec_command(a.path, a.manifest, b, iters, warmup, cuda_graph)
                commands.append({"artifact": str(a.path), "batch": b, "command": cmd})
                _logger.info("equivalent command: %s", cmd)
    not_run = [{"artifact": str(a.path), "reason": a.unavailable} for a in arts if a.unavailable]
    for n in not_run:
        _logger.warning("bench: %s not timed: %s", n["artifact"], n["reason"])
    runners: list[tuple[Any, Optional[Any]]] = []  # (runner, artifact)
    if ckpt is not None:
        runners.append((reference_runner(ckpt, config, device=torch_device,
                                         name=f"pytorch-{torch_device}-fp32"), None))
        for ac in autocast:
            runners.append((reference_runner(ckpt, config, device=torch_device, autocast=ac,
                                             name=f"pytorch-{torch_device}-{ac}-autocast"), None))
    for a in arts:
        if a.unavailable:
            continue
        runners.append((load_runner(a, providers=providers, threads=threads, profile_phases=True, spinning=False), a))
        if a.kind == "engine" and cuda_graph:
            runners.append((load_runner(a, cuda_graph=True, profile_phases=True, name=a.label + "+cudagraph"), a))
    sizes = {}
    for r, a in runners:
        sizes[r.name] = tuple(r.model.cfg.image_size) if a is None else tuple(a.manifest.inputs[0].shape[2:])
    results = []
    rng = np.random.default_rng(seed)
    for b in batches:
        if not runners:
            break
        feeds = {}
        cache: dict[tuple, np.ndarray] = {}
        for r, _ in runners:
            hw = sizes[r.name]
            if hw not in cache:
                cache[hw] = rng.standard_normal((b, 3, *hw), dtype=np.float32)
            feeds[r.name] = {"image": cache[hw]}
        named = {r.name: r for r, _ in runners}
        phases: dict[str, list[dict]] = {k: [] for k in named}

        def on_iter(name: str, phase: str, i: int, dt: float) -> None:
            p = getattr(named[name], "last_phases_ms", None)
            if phase == "timed" and p:
                phases[name].append(dict(p))

        _logger.info("timing %d runner(s) at batch %d: %d warm-up + %d iterations each, interleaved", len(named), b,
                     warmup, iters)
        stats = time_interleaved(named, feeds[next(iter(named))], warmup, iters, feeds=feeds, on_iteration=on_iter)
        torch_peak = None
        if any(r.backend == "pytorch" and str(r.device).startswith("cuda") for r, _ in runners):
            import torch

            torch_peak = int(torch.cuda.max_memory_allocated())  # the process's peak: runners share it when interleaved
        for r, a in runners:
            st = stats[r.name]
            split = None
            if phases[r.name]:
                split = {k: float(np.mean([p[k] for p in phases[r.name]])) for k in phases[r.name][0]}
            results.append({
                "runner": r.name, "artifact": str(a.path) if a else None, "kind": a.kind if a else "checkpoint",
                "backend": r.backend, "device": r.device, "precision": r.precision, "batch": b,
                "cuda_graph": bool(getattr(r, "cuda_graph", False)), "stats": st.to_dict(), "gpu_split_ms": split,
                "peak_device_bytes": getattr(r, "peak_device_bytes", None) or (
                    torch_peak if r.backend == "pytorch" and str(r.device).startswith("cuda") else None),
            })
            _logger.info("%s batch %d: %s", r.name, b, st.summary())
    from invpt.engines.build import _cuda_devices

    data = {
        "schema": SCHEMA, "version": 1, "created": now_iso(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "gpus": _cuda_devices() or []},
        "settings": {"batches": batches, "iters": iters, "warmup": warmup, "threads": threads,
                     "onnxruntime_spinning": False},
        "results": results, "not_run": not_run, "commands": commands, "peak_rss_bytes": _peak_rss_bytes(),
        "plot": None,
    }
    plot = _plot(results, out / "bench.png") if results else None
    data["plot"] = plot.name if plot else None
    md_path = write_text(out / "bench.md", _markdown(data))
    json_path = write_json(out / "bench.json", data)
    _logger.info("latency report: %s (%s)", md_path, json_path)
    return BenchReport(out, json_path, md_path, plot, data)
