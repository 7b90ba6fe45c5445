"""``invpt-export``: checkpoint -> verified ONNX plus its manifest."""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from invpt.cli.common import Stopwatch, add_logging_args, add_model_args, human_size, parse_task_list, run_main
from invpt.export.opsets import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

_logger = logging.getLogger("invpt.export")

EXAMPLES = """examples:
  invpt-export --ckpt InvPT_pascal_vitLp16.pth.tar                 # config inferred -> InvPT_pascal_vitLp16.onnx
  invpt-export --ckpt nyud.pth --out out/nyud.onnx --dynamic-batch
  invpt-export --ckpt my.pth --config my_model.yaml --tasks semseg,depth --opset 19

exit codes: 0 verified (or --no-verify); 2 bad input, nothing written; 3 ONNX Runtime disagrees with PyTorch,
nothing written; 4 a library (torch.onnx, onnx, onnxruntime) failed: re-run with -v for its traceback.
"""


def default_out(ckpt: str) -> Path:
    """``dir/name.pth.tar`` -> ``dir/name.onnx``."""
    p = Path(ckpt)
    name = p.name
    for suffix in (".tar", ".pth", ".pt", ".ckpt", ".bin"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return p.with_name(name + ".onnx")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="invpt-export",
        description="Export an InvPT checkpoint to ONNX (one input 'image', one output per task), check the graph, "
        "verify it against PyTorch with ONNX Runtime, and write a manifest (model.json) next to it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    g = p.add_argument_group("Output")
    g.add_argument("--out", default=None, help="ONNX path (default: next to the checkpoint, <name>.onnx); the "
                   "manifest goes to the same path with .json")
    g.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET}-{MAX_OPSET} (default {DEFAULT_OPSET}: TensorRT 10.3/JetPack 6 to 11.x)")
    b = g.add_mutually_exclusive_group()
    b.add_argument("--batch", type=int, default=1, help="static batch size (default 1)")
    b.add_argument("--dynamic-batch", action="store_true",
                   help="symbolic batch dimension 'batch' (H and W stay fixed): choose it to run several images per call "
                   "or build engines with a batch range; it also lets invpt-quantize calibrate up to 16 samples per step "
                   "(much faster INT8 calibration of large models)")
    g.add_argument("--tasks", default=None,
                   help="comma-separated subset of heads to export (e.g. semseg,depth); compute only other heads "
                   "need is dropped. Default: all tasks")
    g.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                   help="store weights in <file>.data: auto (over 1.8 GB), always, never")
    g.add_argument("--simplify", action="store_true",
                   help="run onnxslim and keep its graph if it has fewer nodes (off by default: on the dynamo graphs of "
                   "InvPT it rarely helps and costs time and memory; see bench/README.md)")
    g.add_argument("--preprocess", choices=("pad", "resize", "letterbox"), default="pad",
                   help="preprocessing recorded in the manifest: pad (official evaluation, centred zero pad; images "
                   "must fit the input size), resize (official inference.py stretch, aspect ratio not kept) or "
                   "letterbox (pad, but images larger than the input are first scaled down to fit, aspect ratio "
                   "kept). Default pad")
    v = p.add_argument_group("Verification")
    v.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch parity check")
    add_logging_args(p)
    return p


def options_from_args(args: argparse.Namespace):
    """The parsed command line as the stage's options (every export flag has a field)."""
    from invpt.export.pipeline import ExportOptions

    tasks = parse_task_list(args.tasks, "--tasks")
    return ExportOptions(opset=args.opset, batch=args.batch, dynamic_batch=args.dynamic_batch,
                         tasks=tuple(tasks) if tasks is not None else None, verify=not args.no_verify,
                         simplify=args.simplify, external_data=args.external_data, preprocess_mode=args.preprocess,
                         command="invpt-export " + shlex.join(sys.argv[1:]))


def _run(args: argparse.Namespace) -> int:
    from invpt.export.pipeline import run_export

    watch = Stopwatch()
    out = Path(args.out) if args.out else default_out(args.ckpt)
    result = run_export(args.ckpt, out, options_from_args(args), config=args.config)
    m = result.manifest
    verdict = "verified" if result.parity else "NOT verified (--no-verify)"
    _logger.info("export ok %.1fs -> %s (%s), %s; manifest %s", watch.seconds, result.onnx_path,
                 human_size(m.size_bytes), verdict, result.manifest_path)
    _logger.info("next: invpt-quantize --onnx %s --precision fp16", result.onnx_path)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``invpt-export``; returns the exit code (0 ok, 2 bad input, 3 verification failed, 4 a library failed)."""
    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
