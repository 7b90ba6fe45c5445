"""``invpt-infer``: run the PyTorch model on images and write one PNG per task per image plus an overview."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from invpt.cli.common import Stopwatch, add_logging_args, add_model_args, run_main
from invpt.errors import InputError

_logger = logging.getLogger("invpt.infer")

EXAMPLES = """examples:
  invpt-infer --ckpt InvPT_pascal_vitLp16.pth.tar photos/ --out preds/
  invpt-infer --ckpt nyud.pth --mode pad room.png --out preds/ --device cuda
  invpt-infer --config tiny_pascal --random-init assets/ --out demo/     # pipeline smoke test, meaningless maps

For each image, DIR/<image id>/ gets <task>.png (colour visual), <task>_ids.png (class ids, label tasks),
<task>.npy with --save-raw, and overview.png (input plus every task side by side).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="invpt-infer",
        description="Run an InvPT checkpoint (PyTorch) on images and save per-task predictions as PNGs.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively for jpg/png/bmp)")
    add_model_args(p, ckpt_required=False)
    p.add_argument("--random-init", action="store_true",
                   help="no checkpoint: build --config with random weights (smoke tests and demos only; outputs are "
                   "meaningless)")
    g = p.add_argument_group("Inference")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--mode", choices=("resize", "pad"), default="resize",
                   help="resize: stretch to the model size and back (official inference.py, any image size); pad: "
                   "centred zero pad as in official evaluation (images must not exceed the model size)")
    g.add_argument("--tasks", default=None, help="comma-separated subset of tasks (default: all)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    g.add_argument("--save-raw", action="store_true", help="also save raw outputs at image size as <task>.npy")
    add_logging_args(p)
    return p


def collect_images(inputs: Sequence[str]):
    """Expand files and folders into one ImageListReader; missing paths and empty folders are errors."""
    from invpt.data.datasets import ImageFolderReader, ImageListReader

    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            folder = ImageFolderReader(p)
            paths += [folder.image_path(i) for i in range(len(folder))]
        elif p.is_file():
            paths.append(p)
        else:
            raise InputError(f"Input '{p}' does not exist. Pass image files or folders of images.")
    return ImageListReader(paths)


def _run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    import invpt
    from invpt.data.decode import decode
    from invpt.data.transforms import preprocess, read_image, restore_geometry
    from invpt.data.visualize import overview, save_png, visualize

    watch = Stopwatch()
    if args.random_init:
        if not args.config:
            raise InputError("--random-init needs --config (a preset name such as tiny_pascal, or a YAML file).")
        _logger.warning("--random-init: random weights, the predictions are meaningless (pipeline check only)")
        model = invpt.build_model(args.config).eval().to(args.device)
    elif not args.ckpt:
        raise InputError("Pass --ckpt CHECKPOINT (or --config NAME --random-init for a smoke test).")
    else:
        model = invpt.load_model(args.ckpt, config=args.config, device=args.device)
    tasks = model._resolve_tasks(args.tasks.split(",") if args.tasks else None)
    specs = {t.name: t for t in model.cfg.task_specs}
    images = collect_images(args.inputs)
    out_dir = Path(args.out)
    for i in tqdm(range(len(images)), desc="infer", unit="img", disable=None):
        path = images.image_path(i)
        rgb = read_image(path)
        x, info = preprocess(rgb, model.cfg.image_size, args.mode, source=path)
        with torch.no_grad():
            raw = model(torch.from_numpy(x)[None].to(args.device), tasks=tasks)
        visuals = {}
        target = out_dir / images.ids()[i]
        for t in tasks:
            spec = specs[t]
            full = restore_geometry(raw[t][0].float().cpu().numpy(), info)  # logits back to image size
            decoded = decode(spec, full)
            visuals[t] = visualize(spec, decoded)
            save_png(target / f"{t}.png", visuals[t])
            if spec.kind == "label":
                save_png(target / f"{t}_ids.png", decoded.astype(np.uint8))  # class ids, image size
            if args.save_raw:
                np.save(target / f"{t}.npy", full)
        save_png(target / "overview.png", overview(rgb, visuals))
    _logger.info("infer ok %.1fs: %d image(s) x %d task(s) -> %s", watch.seconds, len(images), len(tasks), out_dir)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``invpt-infer``; returns the exit code (0 ok, 2 bad input)."""
    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
