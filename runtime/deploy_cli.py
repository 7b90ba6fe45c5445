"""``invpt-deploy``: checkpoint -> ONNX -> FP16/INT8 ONNX -> engines -> parity -> latency, in one command."""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Optional, Sequence

from invpt.cli.common import add_logging_args, run_main

_logger = logging.getLogger("invpt.runtime")

EXAMPLES = """examples:
  invpt-deploy --out out/demo                  # embedded default: tiny model, random weights, sample images
  invpt-deploy --ckpt tiny_pascal.pth --data assets/ --out out/deploy                 # FP32 + FP16
  invpt-deploy --ckpt InvPT_pascal_vitLp16.pth.tar --calib-data data/PASCALContext --out out/pascal
  invpt-deploy --ckpt nyud.pth --precision fp16 --backend rtx --batch 1,4 --out out/nyud

Into --out: <name>.onnx (FP32, dynamic batch), <name>.fp16.onnx, <name>.int8.onnx (with --calib-data), an engine
per precision (<name>[.fp16|.int8].plan, built with enterprise TensorRT when it imports, else TensorRT-RTX, which
needs no GPU to build), each with its JSON manifest; parity/ (invpt-parity), bench/ (invpt-bench), summary.md and
index.html. A rerun reuses every artifact that is verified (sha256 against its manifest, made from this run's
parent, verification passed); an existing file that is not is never overwritten (exit 2). Engines need a GPU to
run: without one their parity and latency are reported as not run.

exit codes: 0 ok; 2 bad input; 3 a stage's verification or the parity report failed; 4 a library failed.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="invpt-deploy",
        description="The whole chain in one command: export, FP16/INT8 ONNX, TensorRT engines with whichever backend "
        "is present, a parity report and a latency report, with one summary (Markdown and HTML).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="InvPT checkpoint (official release, bare state_dict or invpt's own); "
                   "default: the embedded tiny_pascal model with random weights, written to OUT/tiny_pascal.pth")
    p.add_argument("--config", default=None, help="preset name or YAML path (default: read from the checkpoint)")
    p.add_argument("--precision", default=None,
                   help="comma-separated fp32,fp16,int8 (default fp32,fp16, plus int8 with --calib-data)")
    p.add_argument("--calib-data", default=None, help="INT8 calibration data: PASCAL-Context/NYUD-v2 root, image "
                   "folder or video")
    p.add_argument("--calib-samples", type=int, default=32, help="INT8 calibration images (default 32)")
    p.add_argument("--holdout-samples", type=int, default=4, help="held-out images for the quantize checks (default 4)")
    p.add_argument("--data", default=None, help="images for the parity report (default: --calib-data, else the "
                   "bundled sample images, else seeded random inputs)")
    p.add_argument("--samples", type=int, default=4, help="parity images (default 4)")
    p.add_argument("--batch", default="1", help="batch sizes to time and to build the engine profile for (default 1)")
    p.add_argument("--iters", type=int, default=30, help="timed iterations per runner and batch (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up iterations (default 3)")
    p.add_argument("--backend", choices=("auto", "tensorrt", "rtx"), default="auto",
                   help="TensorRT backend for the engines (default auto: tensorrt, else tensorrt_rtx)")
    p.add_argument("--no-engines", action="store_true", help="stop at the ONNX files (no TensorRT)")
    p.add_argument("--out", default="deploy", help="output folder (default ./deploy)")
    add_logging_args(p)
    return p


def _run(args: argparse.Namespace) -> int:
    from invpt.runtime.bench import parse_batches
    from invpt.runtime.deploy import bundled_images, parse_precisions, run_deploy

    precisions = parse_precisions(args.precision, args.calib_data)
    batches = parse_batches(args.batch)
    data = args.data if args.data is not None else (args.calib_data or bundled_images())
    try:
        res = run_deploy(
            args.ckpt, args.out, config=args.config, precisions=precisions,
            calib_data=args.calib_data, calib_samples=args.calib_samples, holdout_samples=args.holdout_samples,
            data=data, samples=args.samples, batches=batches, iters=args.iters, warmup=args.warmup,
            backend=args.backend, engines=not args.no_engines, command="invpt-deploy " + shlex.join(sys.argv[1:]),
        )
    except MemoryError as err:  # a stage's working memory is not part of the estimates made up front
        from invpt.errors import InputError

        raise InputError(f"Out of memory in invpt-deploy ({type(err).__name__}: {err}) with --batch {args.batch} and "
                         f"--samples {args.samples}. Pass smaller values; the artifacts already verified in "
                         f"'{args.out}' are reused by the next run.") from err
    return 0 if res.passed else 3


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``invpt-deploy``: 0 ok, 2 bad input, 3 verification or parity failed, 4 a library failed."""
    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
