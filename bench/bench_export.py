"""Benchmark the export stage and CPU inference latency of an InvPT preset (random weights, no download).

What it does, in order:

1. builds the preset with random non-trivial weights (parameters and BatchNorm statistics, as the tests do)
   and saves it as an official-format checkpoint (``{'model': {'module.' + key: tensor}}``) in a temp folder;
2. runs ``invpt.export.pipeline.run_export`` on it (verification on) in a fresh child process
   (``python -m bench.bench_export --export-child ARGS.json``), so the child's peak RSS is that of the export
   alone; the steps' seconds and peak RSS come from the stage's own phase timer (``run_export(timer=
   PhaseTimer(reset_peak=True))``, read from the result); the parent also samples the child's RSS from /proc as a
   cross-check;
3. in this process, times PyTorch eager FP32 (``fused_attn=True`` and, unless ``--no-unfused``,
   ``fused_attn=False``) against ONNX Runtime CPU on one seeded batch-1 input: warm-up runs, then
   ``--runs`` timed rounds with the backends interleaved (A, B, C, A, B, C, ...), torch and ORT using the same
   thread count;
4. prints a Markdown table and an environment block, and writes everything as JSON to ``--out``.

Example::

    python -m bench.bench_export --preset tiny_pascal --runs 5 --out bench/results/export_tiny_pascal.json
    python -m bench.bench_export --preset pascal_vitl --runs 3 --out bench/results/export_pascal_vitl.json
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from bench.common import (
    REPO,
    SHARED_MACHINE_NOTE,
    TimingStats,
    command_line,
    environment,
    environment_markdown,
    fmt_bytes,
    fmt_seconds,
    load_average,
    markdown_table,
    time_interleaved,
    write_json_atomic,
)

_log = logging.getLogger("bench.export")
SCHEMA = "invpt-bench-export/1"


# ------------------------------------------------------------------------------------------- model + checkpoint

def randomize_(model, seed: int = 0):
    """Give every parameter and BN buffer non-trivial values (same idea as tests/conftest.py::randomize_).

    Unit-mean norm weights keep activations in a realistic range through 24 blocks; random BN statistics
    make sure the exported BatchNorm folding is exercised.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    unit = ("norm1.weight", "norm2.weight", "norm.weight", "bn1.weight", "bn.weight")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.dim() > 1 else 0.1)
                    + (1.0 if name.endswith(unit) else 0.0))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def make_checkpoint(preset: str, path: Path, seed: int) -> dict[str, Any]:
    import invpt
    from invpt.checkpoint import save_official_checkpoint

    t0 = time.perf_counter()
    model = randomize_(invpt.build_model(preset, fused_attn=False), seed=seed).eval()
    n_params = sum(p.numel() for p in model.parameters())
    save_official_checkpoint(model, path)
    del model
    gc.collect()
    return {"path": str(path), "format": "official", "params": n_params, "bytes": path.stat().st_size,
            "seed": seed, "build_and_save_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------- export (child)

def _setup_logging(prefix: str = "") -> None:
    """INFO from invpt and this benchmark, WARNING and above from third-party libraries (onnx_ir is chatty)."""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {prefix}%(name)s: %(message)s", stream=sys.stderr)
    for name in ("invpt", "bench"):
        logging.getLogger(name).setLevel(logging.INFO)


def _rss_kib(pid: int) -> tuple[Optional[int], Optional[int]]:
    """(VmRSS, VmHWM) of a process in KiB from /proc, or (None, None)."""
    rss = hwm = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return rss, hwm


def _export_child(args: dict) -> dict[str, Any]:
    """Runs in the export child process: run_export with its phase timer resetting the peak per phase; returns the
    report dict."""
    import resource

    try:
        import torch

        torch.set_num_threads(args["threads"])
        import invpt.export.pipeline as pipeline

        from invpt.timing import PhaseTimer

        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # The stage's own phase timer, resetting the kernel's peak counter at every phase boundary: exact seconds and
        # peak RSS of every phase, read from the result (nothing of the pipeline is patched).
        timer = PhaseTimer(reset_peak=True)
        t0 = time.perf_counter()
        cpu0 = os.times()
        res = pipeline.run_export(args["ckpt"], args["onnx"], config=args["preset"], opset=args["opset"],
                                  verify=True, dynamic_batch=args.get("dynamic_batch", False),
                                  command=args["command"], timer=timer)
        total = time.perf_counter() - t0
        cpu1 = os.times()
        timings = timer.to_dict()
        # ru_maxrss only covers the timer's last window (the timer resets the kernel's counter); the timer keeps the
        # process's peak over all of them.
        peak = max(timings["process_peak_rss_bytes"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        # Largest ru_maxrss among processes this child forked (if any). Not additive to peak_rss_bytes: a forked
        # process starts with its parent's resident pages counted, so a late fork reports the parent's RSS.
        peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        man = res.manifest
        onnx_path = Path(res.onnx_path)
        data = {d: (onnx_path.parent / d).stat().st_size for d in man.external_data}
        phases = {k[:-2]: v for k, v in timings["seconds"].items()}
        phases["other"] = max(0.0, total - sum(phases.values()))
        census = man.export.get("op_census", {})
        return {
            "ok": True,
            "total_s": total,
            "phases_s": phases,
            "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
            "stage_timings": timings,  # the export stage's PhaseTimer: seconds, RSS at start, peaks per phase
            "peak_rss_after_phase_bytes": {k[:-2]: v for k, v in timings["peak_rss_bytes"].items()},
            "peak_rss_within_phase_bytes": {k[:-2]: v for k, v in timings["phase_peak_rss_bytes"].items()},
            "rss_at_phase_start_bytes": {k[:-2]: v for k, v in timings["start_rss_bytes"].items()},
            "peak_rss_bytes": peak,
            "peak_rss_before_export_bytes": rss_before,
            "peak_rss_grandchildren_bytes": peak_children,
            "onnx_path": str(onnx_path),
            "onnx_bytes": onnx_path.stat().st_size,
            "external_data_bytes": data,
            "total_bytes": man.size_bytes,
            "nodes": sum(census.values()),
            "op_census": census,
            "simplified": man.export.get("simplified"),
            "opset": man.export.get("opset"),
            "resize_nodes": man.export.get("resize_nodes"),
            "tasks": man.export.get("tasks"),
            "parity": res.parity.to_dict() if res.parity is not None else None,
            "versions": man.versions,
        }
    except BaseException as err:  # report any failure to the parent instead of dying silently
        return {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}


def export_child_main(args_path: Path) -> int:
    """Entry point of the export child (``--export-child ARGS.json``): writes the report next to ARGS.json."""
    args = json.loads(Path(args_path).read_text())
    report = _export_child(args)
    write_json_atomic(report, args["report"])
    return 0 if report["ok"] else 1


def run_export_measured(args: dict, workdir: Path, poll_s: float = 0.25) -> dict[str, Any]:
    """Run the export in a fresh child process; return its report plus the parent's RSS samples of it.

    The child is ``python -m bench.bench_export --export-child ARGS.json`` (a plain subprocess rather than a
    multiprocessing worker, so its command line says what it is and is not mistaken for a stray worker).
    """
    args = dict(args, report=str(workdir / "export_child_report.json"))
    args_path = workdir / "export_child_args.json"
    write_json_atomic(args, args_path)
    Path(args["report"]).unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bench.bench_export", "--export-child", str(args_path)],
                            cwd=str(REPO), env=env)
    samples = {"peak_vmrss_kib": 0, "vmhwm_kib": 0, "n": 0}
    while True:
        rss, hwm = _rss_kib(proc.pid)
        if rss is not None:
            samples["peak_vmrss_kib"] = max(samples["peak_vmrss_kib"], rss)
            samples["vmhwm_kib"] = max(samples["vmhwm_kib"], hwm or 0)
            samples["n"] += 1
        try:
            proc.wait(timeout=poll_s)
            break
        except subprocess.TimeoutExpired:
            continue
    rc = proc.returncode
    try:
        report = json.loads(Path(args["report"]).read_text())
    except (OSError, ValueError):
        if rc is not None and rc < 0:
            sig = signal.Signals(-rc).name
            why = ("killed by SIGKILL: out of memory?" if sig == "SIGKILL"
                   else f"terminated by {sig}, sent by another process")
        else:
            why = f"exit code {rc}"
        report = {"ok": False, "error": f"export child process died without a report ({why})"}
    report["child_wall_s"] = time.perf_counter() - t0
    report["child_exitcode"] = rc
    report["parent_sampled_peak_rss_bytes"] = samples["peak_vmrss_kib"] * 1024 or None
    report["parent_sampled_vmhwm_bytes"] = samples["vmhwm_kib"] * 1024 or None
    report["parent_rss_samples"] = samples["n"]
    report["parent_rss_poll_interval_s"] = poll_s
    return report


# ------------------------------------------------------------------------------------------- latency (this process)

def measure_latency(ckpt: Path, onnx_path: Path, preset: str, threads: int, runs: int, warmup: int, seed: int,
                    unfused: bool) -> dict[str, Any]:
    import numpy as np
    import torch

    import invpt
    from invpt.export.ort import ort_session, run_session

    torch.set_num_threads(threads)
    out: dict[str, Any] = {"threads": threads, "torch_threads": torch.get_num_threads(), "ort_intra_op_threads": threads,
                           "batch": 1, "seed": seed, "warmup": warmup, "runs": runs}
    load_t: dict[str, float] = {}
    t0 = time.perf_counter()
    fused = invpt.load_model(ckpt, config=preset, fused_attn=True)
    load_t["pytorch_fused"] = time.perf_counter() - t0
    models = {"pytorch_fused": fused}
    if unfused:
        t0 = time.perf_counter()
        models["pytorch_unfused"] = invpt.load_model(ckpt, config=preset, fused_attn=False)
        load_t["pytorch_unfused"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sess = ort_session(onnx_path, threads=threads)
    load_t["onnxruntime"] = time.perf_counter() - t0
    out["load_s"] = load_t

    h, w = fused.cfg.image_size
    tasks = tuple(fused.tasks)
    x = np.random.default_rng(seed).standard_normal((1, 3, h, w), dtype=np.float32)
    xt = torch.from_numpy(x)
    outputs: dict[str, dict[str, np.ndarray]] = {}

    def torch_fn(name, model):
        def fn():
            with torch.no_grad():
                res = model(xt)
            outputs[name] = {t: res[t].numpy() for t in tasks}
        return fn

    def ort_fn():
        outputs["onnxruntime"] = run_session(sess, {"image": x}, tasks)

    fns = {name: torch_fn(name, m) for name, m in models.items()}
    fns["onnxruntime"] = ort_fn

    def progress(name, phase, i, dt):
        _log.info("latency %-16s %-6s %d: %s", name, phase, i + 1, fmt_seconds(dt))

    out["load_average_before"] = load_average()
    stats: dict[str, TimingStats] = time_interleaved(fns, runs=runs, warmup=warmup, on_run=progress)
    out["load_average_after"] = load_average()
    out["order"] = list(fns)
    out["backends"] = {k: v.to_dict() for k, v in stats.items()}
    ort_med = stats["onnxruntime"].median
    out["ratio_ort_over_pytorch_median"] = {k: ort_med / stats[k].median for k in models}
    # Agreement of the timed outputs (same input), a sanity check that every backend computed the same thing.
    agree = {}
    for name in models:
        per_task = {}
        for t in tasks:
            ref = outputs[name][t].astype(np.float64)
            diff = np.abs(outputs["onnxruntime"][t].astype(np.float64) - ref)
            per_task[t] = float(diff.max() / (np.abs(ref).max() or 1.0))
        agree[name] = per_task
    out["ort_vs_pytorch_max_rel_err"] = agree
    return out


# ------------------------------------------------------------------------------------------- report

LEGEND = """Legend: status OK = measured; PASS / FAIL = ONNX Runtime vs PyTorch parity within / outside the FP32
tolerance of run_export's verification (rel err = max|ORT - PyTorch| / max|PyTorch| over the verification
inputs); SKIP = not run (flag or earlier failure); ERROR = failed (details in the JSON). Export steps are
the phases of one run_export call, as its phase timer records them (check = options and checkpoint hash, load =
checkpoint -> model, write = weights back into one file, manifest, publishing; other = outside the phases); 'peak
RSS in step' = the process's VmHWM during that step alone (the timer resets it at every phase boundary), 'at
start' = its RSS when the step began. Peak RSS = the export child's peak over all steps (includes its imports and
the loaded checkpoint). Latency: batch
1, FP32, CPU, same seeded input, backends interleaved per round; 'ratio' = ORT median / PyTorch median
(< 1: ONNX Runtime faster); 'cores busy' = process CPU time / wall time of the timed runs (well below
the thread count means threads waited for cores, e.g. taken by other jobs). Timings come from a shared
2-core machine and are noisy."""


def report_rows(res: dict[str, Any]) -> list[list[Any]]:
    ex = res.get("export") or {}
    rows: list[list[Any]] = []
    if not ex.get("ok"):
        rows.append(["export", "run_export (total)", ex.get("error", "not run"), "ERROR"])
    else:
        cpu = f" (CPU {fmt_seconds(ex['cpu_s'])})" if ex.get("cpu_s") else ""
        rows.append(["export", "run_export wall time (total)", fmt_seconds(ex["total_s"]) + cpu, "OK"])
        peaks = ex.get("peak_rss_after_phase_bytes", {})
        within = ex.get("peak_rss_within_phase_bytes", {})
        start = ex.get("rss_at_phase_start_bytes", {})
        for name, t in ex["phases_s"].items():
            peak = (f" (peak RSS in step {fmt_bytes(within[name])}"
                    + (f", at start {fmt_bytes(start[name])})" if name in start else ")") if name in within else
                    f" (peak RSS so far {fmt_bytes(peaks[name])})" if name in peaks else "")
            rows.append(["export", f"  step: {name}", fmt_seconds(t) + peak, "OK"])
        rows.append(["export", "peak RSS of export process", f"{fmt_bytes(ex['peak_rss_bytes'])} "
                     f"(sampled {fmt_bytes(ex.get('parent_sampled_peak_rss_bytes'))})", "OK"])
        data = sum(ex["external_data_bytes"].values())
        rows.append(["export", "ONNX size (.onnx + .data)",
                     f"{fmt_bytes(ex['total_bytes'])} ({fmt_bytes(ex['onnx_bytes'])} + {fmt_bytes(data)})", "OK"])
        simp = ex.get("simplified") or {}
        simp_txt = (f"; onnxslim {simp.get('nodes_before')} -> {simp.get('nodes_after')}"
                    f"{'' if simp.get('applied') else ' (not applied)'}" if simp else "")
        rows.append(["export", "ONNX nodes", f"{ex['nodes']} (opset {ex['opset']}{simp_txt})", "OK"])
        par = ex.get("parity")
        if par:
            for task, t in par["tasks"].items():
                rows.append(["verify", f"max rel err {task}", f"{t['rel_err']:.3g} (cos {t['cosine']:.7f})",
                             "PASS" if t["passed"] else "FAIL"])
    lat = res.get("latency") or {}
    if lat.get("error"):
        rows.append(["latency", "all backends", lat["error"], "ERROR"])
    elif not lat.get("backends"):
        rows.append(["latency", "all backends", "not run", "SKIP"])
    else:
        names = {"pytorch_fused": "PyTorch eager FP32, fused_attn=True",
                 "pytorch_unfused": "PyTorch eager FP32, fused_attn=False", "onnxruntime": "ONNX Runtime CPU FP32"}
        for name, s in lat["backends"].items():
            st = TimingStats(runs=s["runs_s"], warmup=s["warmup_s"], cpu=s.get("cpu_s", []))
            rows.append(["latency", names.get(name, name), st.summary(), "OK"])
        if "pytorch_unfused" not in lat["backends"]:
            rows.append(["latency", names["pytorch_unfused"], "not run (--no-unfused)", "SKIP"])
        for name, r in lat["ratio_ort_over_pytorch_median"].items():
            rows.append(["latency", f"ratio ORT / {names[name].replace('PyTorch eager FP32, ', 'PyTorch ')} (median)",
                         f"{r:.3g}x", "OK"])
    return rows


def render(res: dict[str, Any]) -> str:
    head = (f"### invpt export benchmark: {res['preset']} ({res['image_size'][0]}x{res['image_size'][1]}, "
            f"{res['checkpoint']['params'] / 1e6:.1f}M params)\n")
    table = markdown_table(["stage", "measurement", "value", "status"], report_rows(res))
    return f"{head}\n{table}\n\n{LEGEND}\n\n{environment_markdown(res['environment'])}"


# ------------------------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    try:
        from invpt import preset_names

        presets = list(preset_names())
    except Exception:  # keep --help working even if invpt is broken
        presets = None
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_export",
        description="Benchmark invpt's export stage (run_export with verification: wall time per step, peak memory, "
                    "ONNX size and node count, parity) and CPU latency of PyTorch eager FP32 vs ONNX Runtime, on a "
                    "preset model with random weights (nothing is downloaded). Prints a Markdown table and writes JSON.",
        epilog="Examples:\n"
               "  python -m bench.bench_export --preset tiny_pascal --runs 5\n"
               "  nohup python -m bench.bench_export --preset pascal_vitl --runs 3 \\\n"
               "      --out bench/results/export_pascal_vitl.json > bench/results/export_pascal_vitl.log 2>&1 &\n\n"
               "ViT-L presets need ~10 GB RAM and several minutes on 2 cores (each latency run is ~10-25 s).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="pascal_vitl", choices=presets,
                   help="model preset to build with random weights (default: %(default)s)")
    p.add_argument("--runs", type=int, default=5,
                   help="timed latency runs per backend, interleaved across backends (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed warm-up runs per backend before the timed runs (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch intra-op threads and ONNX Runtime intra_op_num_threads, the same for both and for "
                        "the export (default: os.cpu_count() = %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights and of the latency input (default: %(default)s)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset for run_export (default: the pipeline's default)")
    p.add_argument("--no-unfused", action="store_true",
                   help="skip the PyTorch fused_attn=False latency backend (saves one backend's runs)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="folder for the checkpoint and ONNX files (default: a new temp folder, deleted at the end "
                        "unless --keep); ViT-L needs ~3 GB free")
    p.add_argument("--ckpt", type=Path, default=None,
                   help="export this checkpoint (of --preset) instead of building one with random weights")
    p.add_argument("--dynamic-batch", action="store_true", help="export with a dynamic batch (verified at 1 and 3)")
    p.add_argument("--no-latency", action="store_true", help="measure the export only, not PyTorch/ORT latency")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and ONNX files after the run")
    p.add_argument("--export-child", type=Path, default=None, metavar="ARGS_JSON",
                   help="internal: run only the export step from ARGS_JSON (the benchmark starts itself this way "
                        "to measure the export's peak memory in a fresh process); not for direct use")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON result file; parent folders are created, the file is written atomically "
                        "(default: bench/results/export_<preset>.json)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        p.error("--runs must be >= 1, --warmup >= 0 and --threads >= 1")
    if args.out is None:
        args.out = Path("bench/results") / f"export_{args.preset}.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.export_child is not None:
        _setup_logging("[export child] ")
        return export_child_main(args.export_child)
    _setup_logging()
    import torch

    torch.set_num_threads(args.threads)
    from invpt import load_config
    from invpt.export.onnx_export import DEFAULT_OPSET

    cfg = load_config(args.preset)
    opset = args.opset or DEFAULT_OPSET
    env = environment(threads=args.threads, torch_threads=torch.get_num_threads(), ort_intra_op_threads=args.threads)
    res: dict[str, Any] = {
        "schema": SCHEMA,
        "preset": args.preset,
        "image_size": list(cfg.image_size),
        "tasks": list(cfg.tasks),
        "command": command_line(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "note": SHARED_MACHINE_NOTE,
        "settings": {"runs": args.runs, "warmup": args.warmup, "threads": args.threads, "seed": args.seed,
                     "opset": opset, "unfused": not args.no_unfused, "batch": 1, "verify": True},
        "environment": env,
    }
    own_dir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix=f"invpt-bench-{args.preset}-")) if own_dir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = workdir / f"{args.preset}_random_official.pth.tar"
    onnx_path = workdir / f"{args.preset}.onnx"
    rc = 0
    res["settings"]["dynamic_batch"] = args.dynamic_batch
    try:
        if args.ckpt is not None:
            ckpt = args.ckpt
            import invpt

            with torch.device("meta"):
                n_params = sum(p.numel() for p in invpt.build_model(args.preset).parameters())
            res["checkpoint"] = {"path": str(ckpt), "bytes": ckpt.stat().st_size, "params": n_params, "given": True}
        else:
            _log.info("building %s with random weights -> %s", args.preset, ckpt)
            res["checkpoint"] = make_checkpoint(args.preset, ckpt, args.seed)
        _log.info("exporting in a child process (verification on)")
        res["export"] = run_export_measured({"ckpt": str(ckpt), "onnx": str(onnx_path), "preset": args.preset,
                                             "opset": opset, "threads": args.threads, "command": res["command"],
                                             "dynamic_batch": args.dynamic_batch},
                                            workdir)
        if not res["export"]["ok"]:
            _log.error("export failed: %s\n%s", res["export"]["error"], res["export"].get("traceback", ""))
            res["latency"] = {}
            rc = 1
        elif args.no_latency:
            res["latency"] = {}
            par = res["export"].get("parity")
            if par is not None and not par["passed"]:
                rc = 1
        else:
            _log.info("export done in %s; timing latency (%d warm-up + %d timed runs per backend)",
                      fmt_seconds(res["export"]["total_s"]), args.warmup, args.runs)
            try:
                res["latency"] = measure_latency(ckpt, onnx_path, args.preset, args.threads, args.runs, args.warmup,
                                                 args.seed, unfused=not args.no_unfused)
            except Exception as err:
                _log.exception("latency measurement failed")
                res["latency"] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
                rc = 1
            par = res["export"].get("parity")
            if par is not None and not par["passed"]:
                rc = 1
    finally:
        res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        res["environment"]["load_average_1_5_15_at_end"] = load_average()
        res["artifacts_kept"] = str(workdir) if (args.keep or not own_dir) else None
        if own_dir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        write_json_atomic(res, args.out)  # first: a report that fails to render must not lose the measurements
        _log.info("wrote %s", args.out)
        if "checkpoint" in res:
            print(render(res), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
