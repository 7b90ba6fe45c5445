"""``invpt-infer``: run the PyTorch model on images and write one PNG per task per image plus an overview."""
from __future__ import annotations

import argparse
import json
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
atomically (a temporary file beside it, then renamed), so none is ever half-written. DIR/infer.json records
every file invpt-infer wrote there (with its sha256): a rerun into DIR replaces only those, unchanged since.

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
inside an input folder, no file this run would write there exists unless invpt-infer wrote it (listed in
DIR/infer.json and unchanged since), --device is usable here, --tasks is well-formed. An image that cannot be read
or decoded (or, with --mode pad, is larger than the model size) is skipped with a warning; the other images are
processed completely, and the run ends with a list of every skipped file and exit code 2.

exit codes: 0 every image done; 2 bad input (nothing written), or some images skipped (the rest written).
"""

#: Output file names per task (besides overview.png); used to refuse outputs that would replace an input.
_OVERVIEW = "overview.png"
#: The record invpt-infer keeps in --out of the files it wrote there: a rerun replaces only those (see
#: :func:`_check_own_outputs`). ``files`` maps each path (relative to --out, POSIX) to its sha256, or to null while a
#: run is writing it.
RECORD_NAME = "infer.json"
RECORD_SCHEMA = "invpt.infer"
RECORD_VERSION = 1


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


def _possible_names(cfg, wanted: Optional[list[str]], save_raw: bool) -> list[str]:
    """Every file name this run may write into an image's folder, known before the model is loaded: the outputs of
    the tasks of --config (without it, of every supported dataset), narrowed to --tasks."""
    from invpt.tasks import DATASETS

    specs = list(cfg.task_specs) if cfg is not None else [t for d in DATASETS.values() for t in d.tasks]
    names = {_OVERVIEW}
    for spec in specs:
        if wanted is None or spec.name in wanted:
            names.update(_output_names(spec.name, spec.kind, save_raw))
    return sorted(names)


def _read_record(out_dir: Path) -> dict[str, Optional[str]]:
    """The files earlier invpt-infer runs recorded in ``<out>/infer.json`` (relative path -> sha256, or None for one
    a run was writing when it stopped); {} when there is none. InputError for a file there that is not such a
    record: it is the user's, and never replaced."""
    path = out_dir / RECORD_NAME
    if not os.path.lexists(path):
        return {}
    files = None
    if os.path.islink(path) or not path.is_file():
        problem = "is not a regular file"
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(data, dict) or data.get("schema") != RECORD_SCHEMA:
            problem, files = "is not invpt-infer's record of the files it wrote", None
        elif not (isinstance(files, dict) and all(isinstance(k, str) and (v is None or isinstance(v, str))
                                                  for k, v in files.items())):
            problem, files = "is an invpt-infer record whose list of files is damaged", None
    if files is None:
        raise InputError(
            f"--out '{out_dir}': '{path}' already exists and {problem}; invpt-infer keeps its record of the files it "
            "writes under that name, and invpt never replaces a file it did not make. Choose another --out folder, "
            "or move that file away yourself.")
    return dict(files)


def _check_own_outputs(out_dir: Path, ids: Sequence[str], names: Sequence[str], record: dict[str, Optional[str]],
                       verify: bool = True) -> None:
    """Refuse, before any work, a run that would replace a file under --out that invpt-infer did not write (not in
    its record, or not a regular file) or, with ``verify``, one it wrote that was changed since (its sha256 differs
    from the recorded one: it may hold the user's edits); also a file where an image's folder must go."""
    from invpt.manifest import sha256_file

    foreign: list[Path] = []
    changed: list[Path] = []
    for sid in ids:
        parts = Path(sid).parts
        if parts and parts[0] == RECORD_NAME:
            raise InputError(f"Image id '{sid}' would put its outputs in '{out_dir / sid}', below the name of "
                             f"invpt-infer's record '{out_dir / RECORD_NAME}'. Rename that image (or its folder).")
        for k in range(1, len(parts) + 1):
            folder = out_dir.joinpath(*parts[:k])
            if os.path.lexists(folder) and not folder.is_dir():
                raise InputError(f"--out '{out_dir}': '{folder}' is a file, and the outputs of image '{sid}' go to a "
                                 "folder of that name; invpt never replaces a file it did not make. Choose another "
                                 "--out folder, or move that file away yourself.")
        for name in names:
            path = out_dir / sid / name
            if not os.path.lexists(path):
                continue
            rel = (Path(sid) / name).as_posix()
            if rel not in record or os.path.islink(path) or not path.is_file():
                foreign.append(path)
            elif verify and record[rel] is not None and sha256_file(path) != record[rel]:
                changed.append(path)
    for paths, what in ((foreign, f"was not written by invpt-infer (it is not listed in its record "
                                  f"'{out_dir / RECORD_NAME}')"),
                        (changed, f"was written by invpt-infer but has changed since (its sha256 differs from the one "
                                  f"in '{out_dir / RECORD_NAME}'), so it may hold your edits")):
        if paths:
            more = (f"; so do {len(paths) - 1} other file(s) this run would write, e.g. '{paths[1]}'"
                    if len(paths) > 1 else "")
            raise InputError(
                f"--out '{out_dir}': '{paths[0]}' already exists and {what}{more}. This run would replace "
                f"{'it' if len(paths) == 1 else 'them'}, and invpt never replaces a file it did not make. Choose "
                f"another --out folder, or move {'that file' if len(paths) == 1 else 'those files'} away yourself (if "
                "they are predictions of an older invpt-infer, which kept no record, delete them).")


def _write_record(out_dir: Path, files: dict[str, Optional[str]]) -> None:
    """Write ``<out>/infer.json`` (atomically): the files invpt-infer wrote under --out."""
    from invpt.atomic import write_atomic

    data = {"schema": RECORD_SCHEMA, "schema_version": RECORD_VERSION,
            "note": "Files invpt-infer wrote into this folder (path -> sha256; null while a run was writing it). A "
                    "rerun replaces only these, and only while unchanged.",
            "files": dict(sorted(files.items()))}
    blob = (json.dumps(data, indent=1) + "\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / RECORD_NAME, lambda f: f.write(blob), "Output record")


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
    import invpt
    from invpt.checkpoint import resolve_device
    from invpt.config import load_config
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
    ids = images.ids()
    record = _read_record(out_dir)
    _check_own_outputs(out_dir, ids, _possible_names(cfg, wanted, args.save_raw), record)

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
    # Again, for the model's own file names and any file that appeared while the model loaded (sha256s were checked).
    record = _read_record(out_dir)
    _check_own_outputs(out_dir, ids, names, record, verify=False)

    # The record lists every file of this run before the first is written, so an interrupted run's files stay its own.
    planned = {(Path(sid) / n).as_posix() for sid in ids for n in names}
    _write_record(out_dir, {**record, **dict.fromkeys(planned)})
    written: dict[str, str] = {}
    completed = False
    skipped: list[Path] = []
    try:
        _infer_images(args, model, images, ids, tasks, specs, out_dir, device, skipped, written)
        completed = True
    finally:
        # What is on disk now: this run's files with their sha256, earlier runs' with theirs. After an interruption a
        # listed file this run did not finish stays pending (null): it may have been replaced just before the stop.
        # A file neither written nor listed before is never adopted (it may be the user's).
        final: dict[str, Optional[str]] = {}
        for rel in sorted(set(record) | planned):
            if rel in written:
                final[rel] = written[rel]
            elif rel in record and os.path.lexists(out_dir / rel):
                final[rel] = None if rel in planned and not completed else record[rel]
        try:
            _write_record(out_dir, final)
        except InvptError as err:  # the pending record written above still lists every file of this run
            _logger.warning("%s", err)
    done = len(images) - len(skipped)
    if skipped:
        _logger.error(
            "infer finished with errors %.1fs: %d of %d image(s) skipped (see the warnings above for why), the other "
            "%d are complete in %s. Skipped: %s. Fix or remove these files and run again.",
            watch.seconds, len(skipped), len(images), done, out_dir, ", ".join(f"'{p}'" for p in skipped))
        return 2
    _logger.info("infer ok %.1fs: %d image(s) x %d task(s) -> %s", watch.seconds, done, len(tasks), out_dir)
    return 0


def _infer_images(args, model, images, ids, tasks, specs, out_dir: Path, device, skipped: list, written: dict) -> None:
    """Run the model on every image and write its files; bad images go to ``skipped``, each written file's relative
    path and sha256 to ``written``."""
    import torch
    from tqdm import tqdm

    from invpt.data.decode import decode
    from invpt.data.transforms import preprocess, read_image, restore_geometry
    from invpt.data.visualize import overview, save_png, visualize
    from invpt.manifest import sha256_file

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
            written[(Path(ids[i]) / name).as_posix()] = sha256_file(target / name)
        for name, arr in npys.items():
            _save_npy(target / name, arr)
            written[(Path(ids[i]) / name).as_posix()] = sha256_file(target / name)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``invpt-infer``; returns the exit code (0 ok, 2 bad input or skipped images)."""
    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
