"""PyTorch GPU baseline for InvPT: the numbers a TensorRT engine has to beat.

Latency (CUDA events, compute only: the input is already on the GPU, outputs stay there) for eager
FP32 (TF32 off), TF32, FP16 autocast and BF16 autocast, per batch size, plus peak GPU memory and each
mode's per-task deviation from FP32 on the same input, all in one run.

    python -m bench.bench_torch_gpu --presets pascal_vitl nyud_vitl --batches 1 4 --out bench/results/torch_gpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

MODES = ("fp32", "tf32", "fp16-autocast", "bf16-autocast")


def _ctx(mode: str):
    if mode == "fp16-autocast":
        return torch.autocast("cuda", dtype=torch.float16)
    if mode == "bf16-autocast":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def time_mode(model, x, mode: str, warmup: int, runs: int) -> dict:
    """Median/mean/std/p90 latency (ms) with CUDA events, and peak memory (MiB) of one forward."""
    _set_tf32(mode != "fp32")
    with torch.no_grad(), _ctx(mode):
        for _ in range(warmup):
            model(x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    times.sort()
    return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
            "std_ms": statistics.pstdev(times), "p90_ms": times[int(0.9 * (len(times) - 1))], "min_ms": times[0],
            "runs": runs, "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20}


def deviation(model, x, mode: str, ref: dict) -> dict:
    """Per task: max abs error / max |FP32 ref| of this mode's outputs."""
    _set_tf32(mode != "fp32")
    with torch.no_grad(), _ctx(mode):
        out = model(x)
    return {t: float((out[t].float() - ref[t]).abs().max() / ref[t].abs().max()) for t in ref}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["pascal_vitl", "nyud_vitl"], help="model presets (random weights)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4], help="batch sizes")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs per mode (default 10)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per mode (default 50)")
    p.add_argument("--out", default="bench/results/torch_gpu.json", help="JSON output path")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    import invpt

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
           "timed": "compute only (CUDA events; input on GPU, no host copies)", "command": " ".join(sys.argv)}
    rows = []
    for preset in args.presets:
        torch.manual_seed(0)
        model = invpt.build_model(preset).eval().cuda()
        cfg = model.cfg
        for b in args.batches:
            x = torch.randn(b, 3, *cfg.image_size, device="cuda")
            _set_tf32(False)
            with torch.no_grad():
                ref = {k: v.float() for k, v in model(x).items()}
            for mode in MODES:
                t = time_mode(model, x, mode, args.warmup, args.runs)
                dev = deviation(model, x, mode, ref) if mode != "fp32" else {k: 0.0 for k in ref}
                rows.append({"preset": preset, "size": list(cfg.image_size), "batch": b, "mode": mode, **t,
                             "images_per_s": 1000 * b / t["median_ms"], "max_rel_err_vs_fp32": max(dev.values()),
                             "rel_err_per_task": dev})
                print(f"{preset:12s} b={b} {mode:14s} {t['median_ms']:8.2f} ms (p90 {t['p90_ms']:.2f}) "
                      f"{1000 * b / t['median_ms']:7.1f} img/s  mem {t['peak_mem_mib']:7.0f} MiB  "
                      f"max rel err {max(dev.values()):.2e}", flush=True)
        del model
        torch.cuda.empty_cache()
    md = ["| preset | batch | mode | median ms | p90 ms | img/s | peak MiB | max rel err vs FP32 |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['preset']} | {r['batch']} | {r['mode']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
           f"{r['images_per_s']:.1f} | {r['peak_mem_mib']:.0f} | {r['max_rel_err_vs_fp32']:.2e} |" for r in rows]
    print("\n" + "\n".join(md))
    print(f"\n{env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}; {env['timed']}")
    out = Path(os.environ.get("OUT", ".")) / Path(args.out).name if os.environ.get("OUT") else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"environment": env, "rows": rows, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))
    os.replace(tmp, out)
    (out.with_suffix(".md")).write_text("\n".join(md) + f"\n\n{env['gpu']}, torch {env['torch']}; {env['timed']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
