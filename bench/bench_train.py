"""Benchmark training throughput and peak memory of an InvPT preset (random init, synthetic data, nothing downloaded).

For each variant (``fp32``, ``bf16``, ``fp32+ckpt`` = activation checkpointing, ``bf16+ckpt``), in a fresh child
process (so its peak memory is its own):

1. writes a synthetic dataset of the preset's dataset and size (``invpt.data.synthetic``) in a temp folder;
2. sets up the real training loop (:class:`invpt.train.loop.Trainer`: model, Adam, poly schedule, data, criterion);
3. **loop**: ``--warmup`` then ``--iters`` iterations of the loop as ``invpt-train`` runs them (DataLoader with
   ``--workers``, augmentation, forward with intermediate predictions, loss, backward, Adam step), each timed;
4. **step**: the same number of optimizer steps on one batch already on the device (compute only, no data loading);
5. reports iterations/s and images/s (median iteration time), and peak memory: the process's peak RSS (CPU) or
   ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` (GPU).

Example::

    python -m bench.bench_train --preset tiny_pascal --device cpu --out bench/results/train_tiny_pascal_cpu.json
    python -m bench.bench_train --preset pascal_vitl --device cuda --variants fp32,bf16,bf16+ckpt \\
        --out bench/results/train_pascal_vitl_gpu.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
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
    markdown_table,
    peak_rss,
    write_json_atomic,
)

_log = logging.getLogger("bench.train")
SCHEMA = "invpt-bench-train/1"
VARIANTS = {"fp32": (False, False), "bf16": (True, False), "fp32+ckpt": (False, True), "bf16+ckpt": (True, True)}


# ------------------------------------------------------------------------------------------- child

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(args: dict[str, Any]) -> dict[str, Any]:
    """In the child process: set up the training loop for one variant and time it (see the module docstring)."""
    import torch

    torch.set_num_threads(args["threads"])
    from invpt.config import load_config
    from invpt.data.synthetic import make_synthetic
    from invpt.train.distributed import DistContext, resolve_train_device
    from invpt.train.loop import Trainer
    from invpt.train.options import TrainOptions

    bf16, ckpt = VARIANTS[args["variant"]]
    cfg = load_config(args["preset"])
    device = resolve_train_device(args["device"], 0, 1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    work = Path(args["workdir"])
    data = work / "data"
    # one epoch covers every timed iteration: no DataLoader worker restart at an epoch boundary inside the timing
    n_train = args["batch"] * (args["warmup"] + args["iters"] + 1)
    if not data.exists():
        make_synthetic(cfg.dataset, data, n_train=n_train, n_val=1, size=cfg.image_size, seed=args["seed"])
    opts = TrainOptions(config=cfg, data_root=data, out_dir=work / f"out_{args['variant'].replace('+', '_')}",
                        max_iter=10**6, batch=args["batch"], eval_every=0, final_eval=False, checkpoint_every=0,
                        workers=args["workers"], bf16=bf16, grad_checkpointing=ckpt, device=str(device),
                        progress="none", tensorboard="off", seed=args["seed"])
    t0 = time.perf_counter()
    trainer = Trainer(opts, DistContext(device=device))
    trainer.setup()
    trainer.train_mode()
    setup_s = time.perf_counter() - t0
    params = sum(p.numel() for p in trainer.bare.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = peak_rss(reset=True)
    n = args["warmup"] + args["iters"]

    # loop: as invpt-train runs it (data loading included)
    loop_times: list[float] = []
    batches = trainer.batches()
    first_batch = None
    for k in range(n):
        _sync(device)
        t = time.perf_counter()
        _, _, batch = next(batches)
        values = trainer.step(batch)
        _sync(device)
        loop_times.append(time.perf_counter() - t)
        first_batch = first_batch or batch
        _log.info("%s loop %d/%d: %s (loss %.4f)", args["variant"], k + 1, n, fmt_seconds(loop_times[-1]),
                  values["total"])
    del batches
    # step: compute only, one batch already on the device
    dev_batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in first_batch.items()}
    step_times: list[float] = []
    for k in range(n):
        _sync(device)
        t = time.perf_counter()
        trainer.step(dev_batch)
        _sync(device)
        step_times.append(time.perf_counter() - t)
    out: dict[str, Any] = {
        "variant": args["variant"], "bf16": bf16, "grad_checkpointing": ckpt, "device": str(device),
        "params": params, "batch": args["batch"], "setup_s": setup_s,
        "loop": TimingStats(runs=loop_times[args["warmup"]:], warmup=loop_times[:args["warmup"]]).to_dict(),
        "step": TimingStats(runs=step_times[args["warmup"]:], warmup=step_times[:args["warmup"]]).to_dict(),
        "peak_rss_bytes": peak_rss(), "peak_rss_before_timing_bytes": rss_before,
    }
    for key in ("loop", "step"):
        med = out[key]["median_s"]
        out[key]["iterations_per_s"] = 1.0 / med if med else None
        out[key]["images_per_s"] = args["batch"] / med if med else None
    if device.type == "cuda":
        out["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["cuda_max_memory_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def child_main(args_json: Path) -> int:
    args = json.loads(args_json.read_text())
    try:
        res = run_variant(args)
    except Exception as err:  # reported as an ERROR row, the other variants still run
        import traceback

        res = {"variant": args["variant"], "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    Path(args["result"]).write_text(json.dumps(res))
    return 0


# ------------------------------------------------------------------------------------------- parent

LEGEND = """Legend: loop = one iteration as invpt-train runs it (next batch from the DataLoader with augmentation,
forward with intermediate predictions, official loss, backward, Adam step); step = the same on one batch already on
the device (compute only). it/s and img/s from the median iteration time of the timed runs (warm-up excluded).
Peak memory: the child process's peak RSS during the timed iterations (CPU: model, Adam state, activations;
DataLoader workers are separate processes and not included) and, on GPU, torch.cuda.max_memory_allocated / reserved during the timed iterations.
Variants: bf16 = bfloat16 autocast of the forward pass; ckpt = activation checkpointing of the ViT blocks."""


def render(res: dict[str, Any]) -> str:
    rows = []
    for v in res["variants"]:
        if "error" in v:
            rows.append([v["variant"], "-", "-", "-", "-", v["error"][:120], "ERROR"])
            continue
        mem = fmt_bytes(v["peak_rss_bytes"])
        if "cuda_max_memory_allocated_bytes" in v:
            mem = (f"{fmt_bytes(v['cuda_max_memory_allocated_bytes'])} GPU alloc "
                   f"({fmt_bytes(v['cuda_max_memory_reserved_bytes'])} reserved); RSS {mem}")
        lp, st = v["loop"], v["step"]
        rows.append([v["variant"], f"{lp['iterations_per_s']:.3g}", f"{lp['images_per_s']:.3g}",
                     f"{st['iterations_per_s']:.3g}", f"{st['images_per_s']:.3g}",
                     f"iteration median / min: loop {fmt_seconds(lp['median_s'])} / {fmt_seconds(lp['min_s'])}, step "
                     f"{fmt_seconds(st['median_s'])} / {fmt_seconds(st['min_s'])}; peak {mem}", "OK"])
    cfg = res["config"]
    head = (f"### invpt training benchmark: {res['preset']} ({cfg['image_size'][0]}x{cfg['image_size'][1]}, "
            f"{res['params'] / 1e6:.1f}M params), batch {res['settings']['batch']}, {res['settings']['device']}\n")
    table = markdown_table(["variant", "loop it/s", "loop img/s", "step it/s", "step img/s", "detail", "status"], rows)
    note = f"\n{res['note']}\n" if res["settings"]["device"].startswith("cpu") else ""
    return f"{head}\n{table}\n\n{LEGEND}\n{note}\n{environment_markdown(res['environment'])}\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_train",
        description="Benchmark invpt training: iterations/s and images/s of the real training loop and of the compute "
        "step alone, and peak memory (RSS on CPU, CUDA allocator peaks on GPU), per precision / activation-"
        "checkpointing variant, on a preset with random initialisation and synthetic data (nothing downloaded).",
        epilog="Examples:\n"
        "  python -m bench.bench_train --preset tiny_pascal --device cpu --out bench/results/train_tiny_pascal_cpu.json\n"
        "  python -m bench.bench_train --preset pascal_vitl --device cuda --variants fp32,bf16,bf16+ckpt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="tiny_pascal", help="model preset (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--variants", default="fp32,bf16,fp32+ckpt",
                   help=f"comma list of {', '.join(VARIANTS)} (default: %(default)s)")
    p.add_argument("--batch", type=int, default=2, help="images per iteration (default 2, the official per-GPU batch)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per measurement (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up iterations (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of data and initialisation (default: %(default)s)")
    p.add_argument("--child", type=Path, default=None, help="internal: run one variant from ARGS_JSON")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON result (default bench/results/train_<preset>_<device>.json); the Markdown table goes "
                   "next to it (.md)")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown or args.iters < 1 or args.warmup < 0 or args.batch < 1:
        p.error(f"bad --variants {unknown} or --iters/--warmup/--batch")
    if args.out is None:
        args.out = Path("bench/results") / f"train_{args.preset}_{args.device.split(':')[0]}.json"
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("bench").setLevel(logging.INFO)
    if args.child is not None:
        return child_main(args.child)
    from invpt import build_model, load_config

    import torch

    cfg = load_config(args.preset)
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(cfg).parameters())
    env = environment(threads=args.threads)
    if args.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    res: dict[str, Any] = {
        "schema": SCHEMA, "preset": args.preset, "config": cfg.to_dict(), "params": params,
        "command": command_line(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "note": SHARED_MACHINE_NOTE,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
        "environment": env, "variants": [],
    }
    with tempfile.TemporaryDirectory(prefix="invpt_bench_train_") as tmp:
        for variant in args.variants.split(","):
            child_args = {"variant": variant, "preset": args.preset, "device": args.device, "batch": args.batch,
                          "iters": args.iters, "warmup": args.warmup, "workers": args.workers, "threads": args.threads,
                          "seed": args.seed, "workdir": tmp, "result": str(Path(tmp) / f"{variant}.json")}
            path = Path(tmp) / f"{variant}.args.json"
            path.write_text(json.dumps(child_args))
            _log.info("variant %s ...", variant)
            proc = subprocess.run([sys.executable, "-m", "bench.bench_train", "--child", str(path)], cwd=REPO)
            result = Path(child_args["result"])
            if result.exists():
                res["variants"].append(json.loads(result.read_text()))
            else:
                res["variants"].append({"variant": variant, "error": f"child process exited {proc.returncode}"})
    write_json_atomic(res, args.out)
    md = render(res)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
