"""``invpt-eval``: official metrics of a checkpoint on a dataset split (JSON report + Markdown table)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from invpt.cli.common import Stopwatch, add_logging_args, add_model_args, run_main
from invpt.errors import ConfigError, InputError

_logger = logging.getLogger("invpt.train")

EXAMPLES = """examples:
  invpt-eval --ckpt runs/pascal/final.pth --data /datasets                       # -> runs/pascal/final.eval_val.json|md
  invpt-eval --ckpt InvPT_pascal_vitLp16.pth.tar --data /datasets --out reports/pascal.json
  invpt-eval --ckpt runs/nyud/last.pth --data /datasets --save-predictions preds/ --save-tasks edge
  torchrun --nproc_per_node 4 -m invpt.train.eval_cli --ckpt final.pth --data /datasets   # one shard per GPU

Protocol (as upstream's main.py test): images normalised and centred-padded to the model size (no resize), metrics
accumulated over the whole split on the padded outputs with the padding ignored; saved predictions are cropped back
to each image's size (boundary PNGs in the layout the official odsF tools read).

An existing --out report (or the .md beside it) is replaced only when it is an earlier invpt-eval report; any
other file there (an ONNX manifest, your own notes) is refused before the model is loaded.

exit codes: 0 done; 2 bad input (checkpoint, data, --config that disagrees with the checkpoint, output path);
4 a library failed: re-run with -v for its traceback.
"""

#: ``schema`` of the JSON report invpt-eval writes: how a rerun recognises its own earlier report.
REPORT_SCHEMA = "invpt.eval"
#: Keys of every report invpt-eval wrote before it had a ``schema`` field (recognised by these with its title and
#: command).
_LEGACY_REPORT_KEYS = frozenset({"title", "checkpoint", "split", "images", "data_root", "seconds", "processes", "bf16",
                                 "device", "predictions", "command", "config", "scores"})
#: A sentence of the notes every Markdown table of an evaluation report ends with (invpt.train.evaluate).
_MARKDOWN_NOTE = "Metrics follow the official protocol: eval transforms"
_MAX_OWN_REPORT_BYTES = 64 << 20  # a report is kilobytes; a larger file is not one (and is not read whole)


@dataclass(frozen=True)
class EvalOptions:
    """What ``invpt-eval`` was asked to do (every flag has a field)."""

    ckpt: Path
    data_root: Path
    out: Path
    config: Optional[str] = None
    split: str = "val"
    batch: int = 6
    workers: int = 2
    device: str = "auto"
    bf16: bool = False
    save_predictions: Optional[Path] = None
    save_tasks: str = "all"
    command: str = ""

    def __post_init__(self) -> None:
        for name in ("batch",):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.workers < 0:
            raise InputError(f"--workers must be >= 0, got {self.workers}.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="invpt-eval",
        description="Evaluate an InvPT checkpoint (official release, invpt-train output or a bare state_dict) on a "
        "PASCAL-Context or NYUD-v2 split with the official protocol and metrics: mIoU (semseg, human parts), maxF "
        "(saliency), mean angular error (normals), RMSE (depth), plus upstream's in-code boundary loss. Writes a JSON "
        "report and a Markdown table.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    d = p.add_argument_group("Data")
    d.add_argument("--data", required=True,
                   help="dataset root in the official layout (the PASCALContext/ or NYUDv2/ folder or their parent), "
                   "e.g. --data /datasets")
    d.add_argument("--split", default="val", help="split to evaluate (a file of ImageSets/Context or gt_sets; default val)")
    o = p.add_argument_group("Output")
    o.add_argument("--out", default=None,
                   help="JSON report path; the Markdown table goes next to it with .md (default: beside the "
                   "checkpoint, <name>.eval_<split>.json)")
    o.add_argument("--save-predictions", default=None, metavar="DIR",
                   help="also write each image's predictions to DIR/<task>/<id>.png (depth: .npy), cropped back to "
                   "the image size: label ids, 255 x probability (saliency, boundary), (n + 1) x 255 / 2 normals")
    o.add_argument("--save-tasks", default="all",
                   help="tasks whose predictions --save-predictions writes: all (default) or a comma list, e.g. edge "
                   "(the files the offline odsF evaluation reads)")
    h = p.add_argument_group("Hardware")
    h.add_argument("--batch", type=int, default=6, help="images per step (per process under torchrun; default 6)")
    h.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    h.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    h.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast (CUDA 8.0+ or CPU); the official protocol is FP32")
    add_logging_args(p)
    return p


def default_report_path(ckpt: Path, split: str) -> Path:
    """``dir/name.pth.tar`` -> ``dir/name.eval_<split>.json``."""
    name = ckpt.name
    for suffix in (".tar", ".pth", ".pt", ".ckpt", ".bin"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return ckpt.with_name(f"{name}.eval_{split}.json")


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    ckpt = Path(args.ckpt)
    return EvalOptions(
        ckpt=ckpt, data_root=Path(args.data), out=Path(args.out) if args.out else default_report_path(ckpt, args.split),
        config=args.config, split=args.split, batch=args.batch, workers=args.workers, device=args.device,
        bf16=args.bf16, save_predictions=Path(args.save_predictions) if args.save_predictions else None,
        save_tasks=args.save_tasks, command="invpt-eval " + shlex.join(sys.argv[1:]),
    )


def _read_small_text(path: Path) -> Optional[str]:
    """The text of a regular file (not a symlink) of at most a few MiB, or None."""
    import stat

    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_OWN_REPORT_BYTES:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None


def _not_own_report(path: Path, markdown: bool) -> Optional[str]:
    """None when ``path`` is absent or is invpt-eval's own earlier report (its JSON, or the Markdown table beside it);
    else a few words on what the file is, for the refusal."""
    if not os.path.lexists(path):
        return None
    if os.path.islink(path):
        return "a symbolic link, not an invpt-eval report"
    text = _read_small_text(path)
    if text is None:
        return "not an invpt-eval report"
    if markdown:
        return None if text.startswith("## Evaluation of ") and _MARKDOWN_NOTE in text else \
            "not an invpt-eval report table"
    try:
        data = json.loads(text)
    except ValueError:
        return "not JSON, so not an invpt-eval report"
    if not isinstance(data, dict):
        return "not an invpt-eval report"
    if "schema" in data:
        if data["schema"] == REPORT_SCHEMA:
            return None
        if data["schema"] == "invpt.manifest":
            artifact = data.get("artifact")
            return f"an invpt manifest{f' (of {artifact!r})' if isinstance(artifact, str) else ''}, not an " \
                "invpt-eval report"
        return f"a JSON file of schema {data['schema']!r}, not an invpt-eval report"
    legacy = (_LEGACY_REPORT_KEYS <= data.keys() and str(data.get("command", "")).startswith("invpt-eval")
              and str(data.get("title", "")).startswith("Evaluation of "))
    return None if legacy else "not an invpt-eval report"


def check_report_ownership(opts: EvalOptions) -> None:
    """Refuse a report path (--out, or the .md beside it) that holds a file invpt-eval did not write: only its own
    earlier report is ever replaced."""
    for path, markdown in ((opts.out, False), (opts.out.with_suffix(".md"), True)):
        what = _not_own_report(path, markdown)
        if what is not None:
            where = f"Report '{path}'" if not markdown else \
                f"'{path}' (where the Markdown table of --out '{opts.out}' goes)"
            raise InputError(
                f"{where} already exists and is {what}; invpt-eval replaces only its own earlier report, and "
                "invpt never replaces a file it did not make. Choose another --out path (e.g. reports/eval.json), or "
                "move that file away yourself.")


def check_outputs(opts: EvalOptions) -> None:
    """Refuse, before loading anything, a report path or prediction folder that would overwrite an input or a file
    invpt-eval did not write."""
    from invpt.atomic import check_output_file
    from invpt.paths import is_within as _within, same_file as _same_file

    md = opts.out.with_suffix(".md")
    if opts.out.suffix.lower() != ".json":
        raise InputError(f"--out '{opts.out}' must end in .json (the report is JSON; the Markdown table goes beside it "
                         "as .md). Pass e.g. --out reports/eval.json.")
    for path in (opts.out, md):
        check_output_file(path, "Report", "Choose another --out path.", InputError)
        if path.exists() and _same_file(path, opts.ckpt):
            raise InputError(f"Report '{path}' is the checkpoint '{opts.ckpt}'; invpt never writes into its inputs. "
                             "Choose another --out path.")
        if opts.data_root.exists() and _within(path, opts.data_root):
            raise InputError(f"Report '{path}' lies inside the data folder '{opts.data_root}'; invpt never writes into "
                             "its inputs. Choose another --out path.")
    check_report_ownership(opts)
    if opts.save_predictions is not None:
        sp = opts.save_predictions
        if sp.exists() and not sp.is_dir():
            raise InputError(f"--save-predictions '{sp}' is an existing file; pass a folder.")
        if opts.data_root.exists() and (_within(sp, opts.data_root) or _within(opts.data_root, sp)):
            raise InputError(f"--save-predictions '{sp}' overlaps the data folder '{opts.data_root}'; invpt never writes "
                             "into its inputs. Pass a separate folder, e.g. preds/.")
        if _within(opts.ckpt, sp) or _within(opts.out, sp):
            raise InputError(f"--save-predictions '{sp}' holds the checkpoint or the report (--out); pass a folder of "
                             "its own for the predictions, e.g. preds/.")
        if sp.is_dir() and any(sp.iterdir()):
            first = sorted(p.name for p in sp.iterdir())[:3]
            raise InputError(
                f"--save-predictions '{sp}' is not empty (it holds {', '.join(first)}...): the predictions of this run "
                "would mix with files already there, and an offline evaluation of the folder would read both. Pass a "
                "new or empty folder, or delete that one yourself if it holds old predictions.")
        from invpt.paths import check_output_dir

        check_output_dir(sp, "--save-predictions", "Pass a writable folder, e.g. preds/.")
    elif opts.save_tasks != "all":
        raise InputError(f"--save-tasks {opts.save_tasks} chooses which predictions --save-predictions writes, and no "
                         "--save-predictions folder was given. Add --save-predictions DIR, or leave --save-tasks out.")


def save_task_list(opts: EvalOptions) -> "str | list[str]":
    """``--save-tasks`` as ``"all"`` or a list of task names (InputError for an empty list or an unknown name)."""
    from invpt.cli.common import parse_task_list
    from invpt.tasks import DATASETS

    if opts.save_tasks.strip() == "all":
        return "all"
    tasks = parse_task_list(opts.save_tasks, "--save-tasks") or []
    known = sorted({t.name for d in DATASETS.values() for t in d.tasks})
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise InputError(f"--save-tasks names unknown task(s) {', '.join(unknown)}; tasks are {', '.join(known)} (the "
                         "model's own are checked once it is loaded), or all.")
    return tasks


def _config_check(opts: EvalOptions) -> None:
    """A --config that disagrees with the config stored in an invpt checkpoint is an error (not a warning)."""
    from invpt.checkpoint import read_checkpoint
    from invpt.config import load_config
    from invpt.train.loop import config_differences

    if opts.config is None:
        return
    raw = read_checkpoint(opts.ckpt)
    if raw.config is None:
        return  # official / bare checkpoints: load_model's shape check compares them with --config
    diff = config_differences(load_config(raw.config), load_config(opts.config))
    if diff:
        raise ConfigError(
            f"--config '{opts.config}' disagrees with the config stored in checkpoint '{opts.ckpt}' "
            f"({'; '.join(diff)}; checkpoint vs --config). Leave out --config to evaluate the model the checkpoint "
            "describes."
        )


def evaluate_checkpoint(opts: EvalOptions) -> dict:
    """Load the checkpoint, evaluate it on the split, write the reports (rank 0); returns the report dict."""
    import time

    from invpt import load_model
    from invpt.data.multitask import MultiTaskDataset
    from invpt.train.distributed import cleanup, init_distributed
    from invpt.train.evaluate import evaluate, write_report
    from invpt.train.loop import check_bf16
    from invpt.train.metrics import build_evaluator

    check_outputs(opts)
    save_tasks = save_task_list(opts)
    _config_check(opts)
    sp = opts.save_predictions
    sp_created = sp is not None and not sp.exists()  # else it is empty (check_outputs): all it will hold is this run's
    ctx = init_distributed(opts.device)
    completed = False
    try:
        if opts.bf16:
            check_bf16(ctx.device)
        model = load_model(opts.ckpt, config=opts.config, device=ctx.device)
        cfg = model.cfg
        if save_tasks != "all" and opts.save_predictions is not None:
            missing = [t for t in save_tasks if t not in cfg.tasks]
            if missing:
                raise InputError(f"--save-tasks {', '.join(missing)}: the model of '{opts.ckpt}' does not predict "
                                 f"{'it' if len(missing) == 1 else 'them'}; its tasks are {', '.join(cfg.tasks)}.")
        dataset = MultiTaskDataset(opts.data_root, cfg, split=opts.split, transforms="eval")
        evaluator = build_evaluator(cfg, save_dir=opts.save_predictions, save_tasks=save_tasks)
        t0 = time.perf_counter()
        scores = evaluate(model, dataset, evaluator, batch_size=opts.batch, workers=opts.workers, ctx=ctx,
                          bf16=opts.bf16, progress=ctx.is_main and sys.stderr.isatty())
        report = {
            "schema": REPORT_SCHEMA,
            "title": f"Evaluation of {opts.ckpt.name} on {opts.split}",
            "checkpoint": str(opts.ckpt), "split": opts.split, "images": len(dataset), "data_root": str(opts.data_root),
            "seconds": round(time.perf_counter() - t0, 3), "processes": ctx.world_size, "bf16": opts.bf16,
            "device": str(ctx.device), "predictions": str(opts.save_predictions) if opts.save_predictions else None,
            "command": opts.command, "config": cfg.to_dict(), "scores": scores,
        }
        if ctx.is_main:
            check_report_ownership(opts)  # again: a file may have appeared at --out while the split was evaluated
            write_report(report, opts.out)
        ctx.barrier()
        completed = True
        return report
    finally:
        if not completed and sp is not None and sp.is_dir():
            # A failed or interrupted run's predictions are a partial set that an offline evaluation would read as the
            # split: removed (the folder held nothing else when the run started; it is removed too if the run made it).
            _remove_partial_predictions(sp, sp_created)
        cleanup(ctx)


def _remove_partial_predictions(folder: Path, created: bool) -> None:
    import shutil

    if created:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        for child in list(folder.iterdir()):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    _logger.warning("the run did not complete: its partial predictions in '%s' were removed", folder)


def _run(args: argparse.Namespace) -> int:
    from invpt.train.evaluate import headline

    if os.environ.get("RANK", "0") not in ("", "0"):
        logging.getLogger("invpt").setLevel(logging.WARNING)
    watch = Stopwatch()
    opts = options_from_args(args)
    report = evaluate_checkpoint(opts)
    if os.environ.get("RANK", "0") in ("", "0"):
        _logger.info("eval ok %.1fs, %d images: %s -> %s (+ .md)", watch.seconds, report["images"],
                     headline(report["scores"], report["config"]), opts.out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``invpt-eval``; returns the exit code (0 ok, 2 bad input, 4 a library failed)."""
    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
