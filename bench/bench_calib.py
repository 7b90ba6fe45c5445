"""Calibration benchmark: INT8 calibration time for N samples, and INT8 vs FP32 (and FP16) ONNX Runtime CPU
latency measured in one run on the same input.

    python -m bench.bench_calib --preset pascal_vitl --samples 8 --runs 3 --out bench/results/calib_pascal_vitl.json

The model has random weights (no download); the calibration images are crops of the sample photos in
assets/ (resized to the model size), so timings are real and accuracy numbers only show the toolchain works.
"""
from __future__ import annotations

import argparse
import logging
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
    peak_rss,
    time_interleaved,
    write_json_atomic,
)

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="pascal_vitl", help="model preset (random weights; default pascal_vitl)")
    p.add_argument("--samples", type=int, default=8, help="calibration samples N (default 8)")
    p.add_argument("--holdout", type=int, default=2, help="held-out samples for the parity check (default 2)")
    p.add_argument("--method", default="entropy", choices=("entropy", "max", "percentile"), help="calibration method")
    p.add_argument("--calibrate-per-node", action=argparse.BooleanOptionalAction, default=None,
                   help="let ModelOpt calibrate itself, node by node or the whole graph (default: invpt measures the "
                        "ranges with bounded memory and ModelOpt inserts Q/DQ)")
    p.add_argument("--runs", type=int, default=3, help="timed ORT runs per model (default 3; ViT-L takes ~10 s a run)")
    p.add_argument("--fp16", action="store_true", help="also produce and time the FP16 model")
    p.add_argument("--out", default="bench/results/calib.json", help="JSON output (a .md table is written beside it)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log = logging.getLogger("bench.calib")

    import numpy as np
    import torch

    import invpt
    from invpt.calib import run_quantize
    from invpt.checkpoint import save_official_checkpoint
    from invpt.export import run_export
    from invpt.export.ort import ort_session

    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)  # the same random weights every run
        model = invpt.build_model(args.preset).eval()
        cfg = model.cfg
        ckpt = save_official_checkpoint(model, tmp / "model.pth")
        del model
        data = tmp / "calib"
        data.mkdir()
        make_photo_crops(data, args.samples + args.holdout, cfg.image_size)
        t0 = time.perf_counter()
        # Dynamic batch lets calibration take all N samples in one step (see calib.int8.calibration_batch).
        fp32 = run_export(ckpt, tmp / "model.onnx", verify=False, preprocess_mode="resize", dynamic_batch=True)
        results["export_s"] = time.perf_counter() - t0
        results["export_peak_rss_bytes"] = peak_rss(reset=True)
        t0 = time.perf_counter()
        int8 = run_quantize(fp32.onnx_path, "int8", calib_data=data, calib_samples=args.samples,
                            holdout_samples=args.holdout, calib_method=args.method, cache_dir=tmp / "cache", ckpt=str(ckpt),
                            allow_mismatch=True,  # a benchmark records a parity miss instead of dying on it
                            calibrate_per_node=args.calibrate_per_node)
        results["int8_quantize_s"] = time.perf_counter() - t0
        results["calibrate_per_node"] = int8.manifest.calibration.get("per_node")
        results["calibration_engine"] = int8.manifest.calibration.get("engine")  # see calib.int8.calibration_engine
        results["int8_phases_s"] = int8.timings
        results["int8_peak_rss_bytes"] = peak_rss(reset=True)  # percentile runs in a child: not counted here
        results["int8_parity"] = int8.parity.to_dict()
        results["int8_task_agreement"] = int8.task_metrics
        models = {"onnxruntime fp32": fp32.onnx_path, "onnxruntime int8": int8.onnx_path}
        if args.fp16:
            t0 = time.perf_counter()
            fp16 = run_quantize(fp32.onnx_path, "fp16", calib_data=data, holdout_samples=args.holdout,
                                cache_dir=tmp / "cache", ckpt=str(ckpt), allow_mismatch=True)
            results["fp16_convert_s"] = time.perf_counter() - t0
            results["fp16_parity"] = fp16.parity.to_dict()
            models["onnxruntime fp16"] = fp16.onnx_path
        sizes = {k: v.stat().st_size for k, v in models.items()}
        x = np.random.default_rng(0).standard_normal((1, 3, *cfg.image_size), dtype=np.float32)
        sessions = {k: ort_session(v) for k, v in models.items()}
        stats = time_interleaved({k: (lambda s=s: s.run(None, {"image": x})) for k, s in sessions.items()},
                                 args.runs, warmup=1,
                                 on_run=lambda n, ph, i, dt: log.info("latency %-18s %s %d: %s", n, ph, i, fmt_seconds(dt)))
        base = stats["onnxruntime fp32"].median
        for k, st in stats.items():
            rows.append([k, "ok", fmt_seconds(st.median), fmt_seconds(st.std), f"{base / st.median:.2f}x", fmt_bytes(sizes[k])])
        results["latency"] = {k: st.to_dict() for k, st in stats.items()}
        results["file_bytes"] = sizes

    table = markdown_table(["model", "status", "median latency", "std", "speed vs fp32", "file"], rows)
    ph = results["int8_phases_s"]
    parity = results["int8_parity"]
    worst = max(t["rel_err"] for t in parity["tasks"].values())
    mode = {"modelopt-per-node": ", ModelOpt node by node", "modelopt-whole-graph": ", ModelOpt whole graph",
            "bounded-ranges": ", ranges by invpt"}.get(results.get("calibration_engine") or "", "")
    summary = (f"{args.preset}: INT8 calibration ({args.method}, {args.samples} samples{mode}) took "
               f"{fmt_seconds(ph.get('calibrate_s', float('nan')))}; with data preparation, the FP32 PyTorch reference "
               f"and held-out parity ({args.holdout} images) {fmt_seconds(results['int8_quantize_s'])}. "
               f"INT8 parity {'passed' if parity['passed'] else 'FAILED'} (worst task rel. err {worst:.3g}). "
               f"Export {fmt_seconds(results['export_s'])}. Peak RSS: export "
               f"{fmt_bytes(results['export_peak_rss_bytes'])}, INT8 {fmt_bytes(results['int8_peak_rss_bytes'])}.")
    env = environment()
    md = "\n".join([f"# Calibration benchmark ({args.preset})", "", summary, "", table, "",
                    "Latency: ONNX Runtime CPU, batch 1, same input, interleaved runs. " + SHARED_MACHINE_NOTE, "",
                    environment_markdown(env)])
    print(md)
    out = Path(args.out)
    write_json_atomic({"preset": args.preset, "samples": args.samples, "method": args.method, **results,
                       "environment": env, "note": SHARED_MACHINE_NOTE, "command": command_line()}, out)
    out.with_suffix(".md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
