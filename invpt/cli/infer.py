"""``invpt-infer``: run the PyTorch model on images and write one PNG per task per image plus an overview."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from invpt.cli.common import Stopwatch, add_logging_args, add_model_args, parse_task_list, run_main
from invpt.errors import CheckpointError, InputError, InvptError

_logger = logging.getLogger("invpt.infer")

EXAMPLES = """examples:
  invpt-infer --ckpt InvPT_pascal_vitLp16.pth.tar photos/ --out preds/
  invpt-infer --ckpt nyud.pth --mode pad room.png --out preds/ --device cuda
  invpt-infer --ckpt pascal.pth --mode letterbox photos/ --out preds/     # any size, aspect ratio kept
  invpt-infer --config tiny_pascal --random-init assets/ --out demo/     # pipeline smoke test, meaningless maps

For each image, DIR/<image id>/ gets <task>.png (colour visual), <task>_ids.png (class ids, label tasks),
<task>.npy with --save-raw, and overview.png (input plus every task side by side). Every file is written
atomically (a temporary file beside it, then renamed), so none is ever half-written.

Image ids: for one folder, the image's path relative to it without extension (photos/a/x.jpg -> a/x; the
extension is kept only where two files differ by it alone: x.jpg, x.png); for one file, its stem; with several
inputs, a folder's ids start with the folder's name (photos/a/x; a second folder also named photos becomes
photos-2/...) and a file's id is its stem.

Choosing --mode (the image is always normalised first; every output is mapped back to the image's own size):
  resize     stretch every image to the model size and back (the official inference.py). Any image size; the
             aspect ratio is not kept, so non-square images are seen distorted. The default.
  pad        centre the image unscaled in a zero (mean-colour) canvas, as the official evaluation does. Choose it
             to reproduce the published numbers on PASCAL-Context/NYUD-v2 (whose images fit the model size);
             an image larger than the model size is skipped.
  letterbox  pad for images that fit (identical results); a larger image is first scaled down to fit, keeping
             its aspect ratio (INTER_AREA), then padded. Choose it for ordinary photos and video frames of any
             size with undistorted geometry; it is what pad-exported models get from invpt-quantize for image
             folders and videos.

Checks before anything is loaded: every input exists, --out is a writable folder that is not an input and not
inside an input folder, --device is usable here, --tasks is well-formed. An image that cannot be read or decoded
(or, with --mode pad, is larger than the model size) is skipped with a warning; the other images are processed
completely, and the run ends with a list of every skipped file and exit code 2.

exit codes: 0 every image done; 2 bad input (nothing written), or some images skipped (the rest written).
"""

#: Output file names per task (besides overview.png); used to refuse outputs that would replace an input.
_OVERVIEW = "overview.png"


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
    g.add_argument("--out", required=True,
                   help="output folder (created if needed; must not be an input or lie inside an input folder)")
    g.add_argument("--mode", choices=("resize", "pad", "letterbox"), default="resize",
                   help="resize: stretch to the model size and back (official inference.py, any image size); pad: "
                   "centred zero pad as in official evaluation (images must not exceed the model size); letterbox: "
                   "pad, but an image larger than the model size is first scaled down to fit keeping its aspect "
                   "ratio (any image size). Default resize; see 'Choosing --mode' below")
    g.add_argument("--tasks", default=None, help="comma-separated subset of tasks (default: all)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    g.add_argument("--save-raw", action="store_true", help="also save raw outputs at image size as <task>.npy")
    add_logging_args(p)
    return p


def collect_images(inputs: Sequence[str]):
    """Expand files and folders into one ImageListReader with unique ids (see
    :func:`invpt.data.datasets.collect_images`); missing paths and empty folders are errors."""
    from invpt.data.datasets import collect_images as _collect

    return _collect(inputs)


def _output_names(task: str, kind: str, save_raw: bool) -> list[str]:
    return [f"{task}.png"] + ([f"{task}_ids.png"] if kind == "label" else []) + ([f"{task}.npy"] if save_raw else [])


def _check_task_names(tasks: Optional[list[str]], cfg) -> None:
    """Refuse task names that the config (or, without one, any dataset) does not have, before loading."""
    if tasks is None:
        return
    from invpt.tasks import DATASETS

    known = list(cfg.tasks) if cfg is not None else sorted({t for d in DATASETS.values() for t in d.task_names})
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = f"the model ({cfg.name or cfg.dataset})" if cfg is not None else "any supported dataset"
        raise InputError(f"--tasks names {unknown}, which {where} does not predict. Known tasks: {', '.join(known)}.")


def _check_out_dir(out: Path, inputs: Sequence[str]) -> Path:
    """--out must be a writable folder (or creatable), not an input file, and not inside an input folder."""
    out_abs = Path(os.path.abspath(out))
    out_real = out.resolve()
    for item in inputs:
        p = Path(item)
        for a, b in ((out_abs, Path(os.path.abspath(p))), (out_real, p.resolve())):
            if p.is_dir() and (a == b or b in a.parents):
                raise InputError(
                    f"--out '{out}' is inside the input folder '{p}': its predictions would be read as input images "
                    "by the next run over that folder. Choose an output folder outside every input folder."
                )
            if not p.is_dir() and a == b:
                raise InputError(f"--out '{out}' is the input file '{p}'. Choose a separate output folder.")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' exists and is not a folder. --out names the folder the predictions go to; "
                         "pass a folder path.")
    base = out_abs
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise InputError(f"--out '{out}' cannot be created: '{base}' is a file, not a folder. Choose another --out.")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"--out '{out}' cannot be written: folder '{base}' is not writable (permission denied). "
                         "Choose a writable output folder.")
    return out


def _check_outputs_outside_inputs(out_dir: Path, images, inputs: Sequence[str], names: list[str]) -> None:
    """Refuse a run whose output folders resolve into an input folder or whose files would replace an input image.

    --out itself is checked by :func:`_check_out_dir`; this catches what only the per-image folders reveal, e.g.
    ``out/<id>`` being a symlink into an input folder.
    """
    files = {images.image_path(i).resolve() for i in range(len(images))}
    folders = {Path(p).resolve() for p in inputs if Path(p).is_dir()}
    for sid in images.ids():
        target = (out_dir / sid).resolve()
        inside = next((f for f in folders if f == target or f in target.parents), None)
        clash = next((target / n for n in names if (target / n) in files), None)
        if inside is not None or clash is not None:
            what = (f"would replace the input image '{clash}'" if clash is not None
                    else f"lies in the input folder '{inside}'")
            raise InputError(
                f"Output folder '{out_dir / sid}' resolves to '{target}', which {what}. Choose an --out folder whose "
                "contents do not lead into the inputs (check for symbolic links)."
            )


def _save_npy(path: Path, arr: np.ndarray) -> None:
    from invpt.atomic import write_atomic

    write_atomic(path, lambda f: np.save(f, arr), "Raw output")


def _run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    import invpt
    from invpt.checkpoint import resolve_device
    from invpt.config import load_config
    from invpt.data.decode import decode
    from invpt.data.transforms import preprocess, read_image, restore_geometry
    from invpt.data.visualize import overview, save_png, visualize
    from invpt.paths import require_file

    watch = Stopwatch()
    # ---- every cheap check first: nothing is loaded or written until all inputs are known to be usable ----
    if args.random_init:
        if not args.config:
            raise InputError("--random-init needs --config (a preset name such as tiny_pascal, or a YAML file).")
        if args.ckpt:
            raise InputError("--random-init builds random weights and ignores a checkpoint; pass either --ckpt or "
                             "--random-init, not both.")
    elif not args.ckpt:
        raise InputError("Pass --ckpt CHECKPOINT (or --config NAME --random-init for a smoke test).")
    else:
        require_file(args.ckpt, "Checkpoint", "Pass the path of an InvPT .pth/.pth.tar file.", CheckpointError)
    cfg = load_config(args.config) if args.config else None
    wanted = parse_task_list(args.tasks)
    _check_task_names(wanted, cfg)
    device = resolve_device(args.device)
    images = collect_images(args.inputs)
    out_dir = _check_out_dir(Path(args.out), args.inputs)

    # ---- the model ----
    if args.random_init:
        _logger.warning("--random-init: random weights, the predictions are meaningless (pipeline check only)")
        model = invpt.build_model(cfg).eval().to(device)
    else:
        model = invpt.load_model(args.ckpt, config=cfg, device=device)
    tasks = model.resolve_tasks(wanted)
    specs = {t.name: t for t in model.cfg.task_specs}
    names = [_OVERVIEW] + [n for t in tasks for n in _output_names(t, specs[t].kind, args.save_raw)]
    _check_outputs_outside_inputs(out_dir, images, args.inputs, names)

    ids = images.ids()
    skipped: list[Path] = []
    for i in tqdm(range(len(images)), desc="infer", unit="img", disable=None):
        path = images.image_path(i)
        try:
            rgb = read_image(path)
            x, info = preprocess(rgb, model.cfg.image_size, args.mode, source=path)
        except InvptError as err:  # this image is bad input; the others are not
            _logger.warning("skipping image '%s': %s", path, err)
            skipped.append(path)
            continue
        with torch.no_grad():
            raw = model(torch.from_numpy(x)[None].to(device), tasks=tasks)
        # Everything for this image is computed before its first file is written.
        pngs: dict[str, np.ndarray] = {}
        npys: dict[str, np.ndarray] = {}
        visuals = {}
        for t in tasks:
            spec = specs[t]
            full = restore_geometry(raw[t][0].float().cpu().numpy(), info)  # logits back to image size
            decoded = decode(spec, full)
            visuals[t] = visualize(spec, decoded)
            pngs[f"{t}.png"] = visuals[t]
            if spec.kind == "label":
                pngs[f"{t}_ids.png"] = decoded.astype(np.uint8)  # class ids, image size
            if args.save_raw:
                npys[f"{t}.npy"] = full
        pngs[_OVERVIEW] = overview(rgb, visuals)
        target = out_dir / ids[i]
        for name, img in pngs.items():
            save_png(target / name, img)  # atomic (temporary file + os.replace)
        for name, arr in npys.items():
            _save_npy(target / name, arr)
    done = len(images) - len(skipped)
    if skipped:
        _logger.error(
            "infer finished with errors %.1fs: %d of %d image(s) skipped (see the warnings above for why), the other "
            "%d are complete in %s. Skipped: %s. Fix or remove these files and run again.",
            watch.seconds, len(skipped), len(images), done, out_dir, ", ".join(f"'{p}'" for p in skipped))
        return 2
    _logger.info("infer ok %.1fs: %d image(s) x %d task(s) -> %s", watch.seconds, done, len(tasks), out_dir)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``invpt-infer``; returns the exit code (0 ok, 2 bad input or skipped images)."""
    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
