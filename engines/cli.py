"""``invpt-trt-build``: ONNX (or checkpoint) -> checked, strongly typed TensorRT engine plus its manifest."""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Optional, Sequence

from invpt.cli.common import Stopwatch, add_logging_args, human_size, run_main

_logger = logging.getLogger("invpt.engines")

EXAMPLES = """examples:
  invpt-trt-build --onnx model.onnx --fp16                      # -> model.fp16.onnx (made if needed) -> model.fp16.plan
  invpt-trt-build --onnx model.onnx --int8 --calib-data data/PASCALContext --calib-samples 64
  invpt-trt-build --onnx model.fp16.onnx --out engines/model.fp16.plan    # build an existing FP16/INT8 ONNX as it is
  invpt-trt-build --ckpt InvPT_pascal_vitLp16.pth.tar --fp16   # export first, then FP16, then the engine
  invpt-trt-build --onnx model.onnx --fp16 --backend rtx --compute-capability 86,89,120   # RTX PCs (no GPU needed)
  invpt-trt-build --onnx model.onnx --fp16 --backend tensorrt --hardware-compat ampere+ --timing-cache trt.cache
  invpt-trt-build --onnx model.int8.onnx --dla-core 0            # Jetson AGX Orin, enterprise TensorRT

Backends (--backend auto takes the first that imports): 'tensorrt' = enterprise TensorRT 10.3-11.x (datacenter
GPUs, Jetson; builds on the GPU it targets), 'rtx' = TensorRT for RTX (pip install "invpt[rtx]"; builds on any
x86 machine, even without a GPU; engines run on RTX GPUs of compute capability 7.5-12.x, not on Hopper or Jetson).
Precision comes from the ONNX (AutoCast casts or Q/DQ nodes) and the network is strongly typed; before building,
the parsed network is checked against the ONNX manifest's precision policy, and the build fails if they disagree.

exit codes: 0 ok, 2 bad input / refused option / no TensorRT module, 3 precision check or parity failed,
4 TensorRT's builder failed
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="invpt-trt-build",
        description="Build a TensorRT engine (a plain serialized plan) from an invpt ONNX file or checkpoint, after "
        "checking on CPU that the parsed network computes in the precision its manifest promises; write the plan "
        "and its manifest (<plan>.json) atomically.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("Model").add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", help="ONNX written by invpt-export (FP32) or invpt-quantize (FP16/INT8), manifest beside it")
    src.add_argument("--ckpt", help="InvPT checkpoint: exported first (invpt-export), the ONNX written next to --out "
                     "or the checkpoint")
    p.add_argument("--config", default=None, help="with --ckpt: preset name or YAML path (default: read from the checkpoint)")
    g = p.add_argument_group("Precision")
    prec = g.add_mutually_exclusive_group()
    prec.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                      help="FP16 via the FP16 ONNX (reused if one with the same parent and policy exists, else made by "
                      "invpt-quantize's pipeline, parity-checked)")
    prec.add_argument("--int8", dest="precision", action="store_const", const="int8",
                      help="INT8 via the Q/DQ ONNX (needs --calib-data when it has to be made)")
    prec.add_argument("--fp32", dest="precision", action="store_const", const="fp32", help="FP32")
    g.add_argument("--calib-data", default=None, help="for --int8: PASCAL-Context/NYUD-v2 root, image folder or video")
    g.add_argument("--calib-samples", type=int, default=32, help="for --int8: calibration images (default 32)")
    b = p.add_argument_group("Build")
    b.add_argument("--backend", choices=("auto", "tensorrt", "rtx"), default="auto",
                   help="auto (default): enterprise 'tensorrt' when it imports, else TensorRT for RTX ('tensorrt_rtx')")
    b.add_argument("--out", default=None, help="plan path (default: <onnx name>.plan next to the ONNX built from); "
                   "the manifest goes to <plan>.json")
    b.add_argument("--batch", default=None, metavar="MIN,OPT,MAX",
                   help="batch range of a --dynamic-batch ONNX (default 1,1,1); a static ONNX keeps its batch")
    b.add_argument("--workspace", type=float, default=None, metavar="GiB", help="builder workspace limit in GiB")
    b.add_argument("--opt-level", type=int, default=None, metavar="N", help="builder optimization level 0-5 (default 3)")
    b.add_argument("--timing-cache", default=None, metavar="FILE",
                   help="read and update this timing cache (enterprise TensorRT; TensorRT-RTX has none)")
    b.add_argument("--compute-capability", default=None, metavar="CC,...",
                   help="TensorRT-RTX target GPUs, e.g. 86,89,120 (default: Ampere+ RTX 80,86,89,12x; 75 on request)")
    b.add_argument("--version-compatible", action="store_true",
                   help="enterprise TensorRT: a plan later TensorRT versions can run (lean runtime embedded)")
    b.add_argument("--hardware-compat", choices=("none", "ampere+", "same-cc"), default=None,
                   help="enterprise TensorRT: run on every Ampere-or-newer GPU (ampere+) or same-compute-capability GPUs")
    b.add_argument("--dla-core", type=int, default=None, metavar="N",
                   help="Jetson (enterprise TensorRT): put layers on DLA core N, GPU fallback for the rest")
    b.add_argument("--refittable", action="store_true", help="build a refittable engine (weights can be replaced)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar during the build")
    add_logging_args(p)
    return p


def _run(args: argparse.Namespace) -> int:
    from invpt.engines.build import BuildOptions, parse_batch, run_build

    watch = Stopwatch()
    ccs = tuple(c.strip() for c in args.compute_capability.split(",") if c.strip()) if args.compute_capability else ()
    if args.compute_capability is not None and not ccs:
        from invpt.errors import InputError

        raise InputError(f"--compute-capability was given but names no target ({args.compute_capability!r}); "
                         "e.g. --compute-capability 86,89, or leave it out for the backend's default targets.")
    opts = BuildOptions(
        batch=parse_batch(args.batch), workspace_gib=args.workspace, opt_level=args.opt_level,
        timing_cache=args.timing_cache, compute_capabilities=ccs, version_compatible=args.version_compatible,
        hardware_compat=args.hardware_compat, dla_core=args.dla_core, refittable=args.refittable,
        progress=not args.no_progress,
    )
    res = run_build(
        args.onnx, ckpt=args.ckpt, config=args.config, precision=args.precision, out=args.out, backend=args.backend,
        options=opts, calib_data=args.calib_data, calib_samples=args.calib_samples,
        command="invpt-trt-build " + shlex.join(sys.argv[1:]),
    )
    m = res.manifest
    _logger.info("trt-build ok %.1fs -> %s (%s %s); manifest %s", watch.seconds, res.plan_path,
                 m.precision.upper(), human_size(m.size_bytes), res.manifest_path)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``invpt-trt-build``; returns 0 ok, 2 bad input, 3 precision check failed, 4 TensorRT failed."""
    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
