"""Engine build benchmark: invpt-trt-build at FP32, FP16 and INT8 with TensorRT-RTX on CPU (no GPU needed).

    python -m bench.bench_trt_build --preset tiny_pascal
    python -m bench.bench_trt_build --preset pascal_vitl --onnx-dir work/vitl   # reuse model.onnx (+ .fp16/.int8)

For each precision: the ONNX is taken from --onnx-dir when it is there (FP32 ``<name>.onnx``, ``<name>.fp16.onnx``,
``<name>.int8.onnx`` with their manifests), otherwise made (export with random weights, then invpt-quantize's
pipeline; calibration images are crops of the photos in assets/). Each engine is then built by
``invpt-trt-build`` in a child process of its own, so the peak memory recorded (the child's VmHWM, which the
build writes into the engine manifest) is the build command's alone. Recorded: wall time of the command,
TensorRT's build time, parse and precision check time, peak RSS, plan size, and the network precision summary
from the engine manifest. ViT-L INT8 calibration, when it has to be made here, takes tens of minutes on 2 cores
(see bench/results/calib_pascal_vitl.md): pass --onnx-dir with the ONNX files made beforehand.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    SHARED_MACHINE_NOTE,
    command_line,
    environment,
    environment_markdown,
    fmt_bytes,
    fmt_seconds,
    markdown_table,
    make_photo_crops,
    write_json_atomic,
)

REPO = Path(__file__).resolve().parents[1]
PRESETS = ("tiny_pascal", "pascal_vitl")


def _fp32_onnx(folder: Path) -> Path | None:
    """``model.onnx`` in ``folder``, else the only FP32 ONNX there (by its manifest)."""
    if (folder / "model.onnx").is_file():
        return folder / "model.onnx"
    found = []
    for p in sorted(folder.glob("*.onnx")):
        try:
            if json.loads(p.with_suffix(".json").read_text()).get("precision") == "fp32":
                found.append(p)
        except (OSError, ValueError):
            continue
    if len(found) > 1:
        raise SystemExit(f"--onnx-dir {folder} holds several FP32 ONNX files {[p.name for p in found]}; keep one.")
    return found[0] if found else None


def _build_in_child(onnx: Path, plan: Path, backend: str, log: logging.Logger) -> dict:
    cmd = [sys.executable, "-m", "invpt.engines.cli", "--onnx", str(onnx), "--out", str(plan), "--backend", backend,
           "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    proc.wait()
    wall = time.perf_counter() - t0
    for line in out.splitlines():
        log.info("  %s", line)
    # wait4's ru_maxrss would include this (torch-loaded) parent's RSS, copied at fork; the build records its own
    # peak (VmHWM, reset by exec) in the engine manifest, which is what is reported.
    res = {"rc": proc.returncode, "command_wall_s": round(wall, 3), "log_tail": out.splitlines()[-5:]}
    if proc.returncode == 0:
        man = json.loads(plan.with_name(plan.name + ".json").read_text())
        build = man.get("build") or man["export"]["build"]
        check = man["verification"]["precision_check"]
        res.update(
            plan_bytes=plan.stat().st_size, plan_sha256=man["sha256"], timings_s=build["timings_s"],
            backend=f"{build['backend_name']} {build['backend_version']}", targets=build["targets"],
            precision_check={k: v for k, v in check.items() if k != "summary"},
            network=check["summary"], engine_inspector=man["verification"]["engine_inspector"],
            peak_rss_bytes=build["peak_rss_bytes"],
        )
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny_pascal", choices=PRESETS, help="model preset (random weights)")
    p.add_argument("--precisions", default="fp32,fp16,int8", help="comma-separated subset of fp32,fp16,int8")
    p.add_argument("--onnx-dir", default=None,
                   help="folder with an existing FP32 ONNX (model.onnx or the only FP32 one) and, optionally, its "
                   ".fp16/.int8 ONNX; missing ones are made next to it")
    p.add_argument("--calib-samples", type=int, default=8, help="INT8 calibration images when INT8 is made (default 8)")
    p.add_argument("--backend", default="rtx", choices=("rtx", "tensorrt", "auto"), help="default rtx (CPU build)")
    p.add_argument("--keep-plans", default=None, help="copy the plans and their manifests into this folder")
    p.add_argument("--out", default=None, help="JSON output (default bench/results/trt_build_<preset>.json; a .md beside)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log = logging.getLogger("bench.trt_build")
    precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    if not precisions or set(precisions) - {"fp32", "fp16", "int8"}:
        raise SystemExit(f"--precisions must name fp32, fp16 and/or int8; got {args.precisions!r}")
    out = Path(args.out or f"bench/results/trt_build_{args.preset}.json")

    results: dict = {"preset": args.preset, "backend": args.backend, "builds": {}, "prepare_s": {}}
    with tempfile.TemporaryDirectory(prefix="invpt_trt_bench.") as tmp:
        tmp = Path(tmp)
        onnx_dir = Path(args.onnx_dir) if args.onnx_dir else tmp / "onnx"
        onnx_dir.mkdir(parents=True, exist_ok=True)
        fp32 = _fp32_onnx(onnx_dir)
        cfg_size = None
        if fp32 is None:
            import torch

            import invpt
            from invpt.checkpoint import save_official_checkpoint
            from invpt.export import run_export

            torch.manual_seed(0)  # the same random weights every run
            model = invpt.build_model(args.preset).eval()
            cfg_size = model.cfg.image_size
            ckpt = save_official_checkpoint(model, tmp / "model.pth")
            del model
            t0 = time.perf_counter()
            fp32 = run_export(ckpt, onnx_dir / "model.onnx", verify=args.preset.startswith("tiny")).onnx_path
            results["prepare_s"]["export"] = round(time.perf_counter() - t0, 3)
        else:
            log.info("using existing FP32 ONNX %s", fp32)
        onnx_for = {"fp32": fp32}
        for prec in precisions:
            if prec == "fp32":
                continue
            cand = fp32.with_name(f"{fp32.stem}.{prec}.onnx")
            if cand.is_file():
                log.info("using existing %s ONNX %s", prec.upper(), cand)
                onnx_for[prec] = cand
                continue
            from invpt.calib import run_quantize
            from invpt.manifest import load_manifest_for

            data = tmp / "calib"
            if not data.exists():
                data.mkdir()
                make_photo_crops(data, args.calib_samples + 2, cfg_size or tuple(load_manifest_for(fp32).preprocessing.size))
            t0 = time.perf_counter()
            res = run_quantize(fp32, prec, calib_data=data, calib_samples=args.calib_samples, holdout_samples=2,
                               cache_dir=tmp / "cache", allow_mismatch=True)  # a benchmark records a parity miss
            results["prepare_s"][prec] = round(time.perf_counter() - t0, 3)
            onnx_for[prec] = res.onnx_path
        for prec in precisions:
            plan = tmp / "plans" / f"model.{prec}.plan"
            plan.parent.mkdir(exist_ok=True)
            log.info("building %s from %s", prec.upper(), onnx_for[prec])
            res = _build_in_child(onnx_for[prec], plan, args.backend, log)
            res["onnx_bytes"] = onnx_for[prec].stat().st_size + sum(
                f.stat().st_size for f in onnx_for[prec].parent.glob(onnx_for[prec].name + ".data"))
            results["builds"][prec] = res
            if args.keep_plans and res["rc"] == 0:
                keep = Path(args.keep_plans)
                keep.mkdir(parents=True, exist_ok=True)
                for f in (plan, plan.with_name(plan.name + ".json")):
                    shutil.copy2(f, keep / f.name)
            plan.unlink(missing_ok=True)

    rows = []
    for prec, r in results["builds"].items():
        if r["rc"] != 0:
            rows.append([prec, f"FAILED (exit {r['rc']})", "", "", "", "", "", ""])
            continue
        t, chk, net = r["timings_s"], r["precision_check"], r["network"]
        share = ", ".join(f"{k} {100 * v:.1f} %" for k, v in net["matmul_conv_flop_share"].items())
        rows.append([prec, "ok", fmt_seconds(t["build_s"]), fmt_seconds(t["parse_s"] + t["precision_check_s"]),
                     fmt_seconds(r["command_wall_s"]), fmt_bytes(r["peak_rss_bytes"]), fmt_bytes(r["plan_bytes"]),
                     f"{net['layers']} layers; MatMul/Conv FLOPs: {share}; check {'passed' if chk['passed'] else 'FAILED'}"])
    table = markdown_table(["precision", "status", "TensorRT build", "parse + check", "command wall", "peak RSS",
                            "plan", "network precision"], rows)
    any_ok = next((r for r in results["builds"].values() if r["rc"] == 0), None)
    backend = any_ok["backend"] if any_ok else args.backend
    env = environment(packages=("invpt", "torch", "onnx", "onnxruntime", "nvidia-modelopt", "tensorrt-rtx-cu13"))
    md = "\n".join([
        f"# Engine build benchmark ({args.preset}, {backend}, CPU-only build)", "",
        "Each engine built by `invpt-trt-build` in its own child process (peak RSS = that process's VmHWM, "
        "including Python, the ONNX load, parsing and the precision check). 'TensorRT build' is "
        "`build_serialized_network` alone; 'command wall' is the whole command. Engines built by TensorRT-RTX "
        "target RTX GPUs (default: Ampere+ RTX) and cannot be loaded without a GPU, so the engine inspector did "
        "not run; the pre-build network precision check did.", "", table, "",
        SHARED_MACHINE_NOTE, "", environment_markdown(env)])
    print(md)
    write_json_atomic({**results, "environment": env, "note": SHARED_MACHINE_NOTE, "command": command_line()}, out)
    out.with_suffix(".md").write_text(md + "\n")
    return 0 if all(r["rc"] == 0 for r in results["builds"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
