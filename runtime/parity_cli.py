"""``invpt-parity``: PyTorch FP32 vs each candidate artifact, per task; JSON + Markdown + visual diffs."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from invpt.cli.common import Stopwatch, add_logging_args, add_provider_arg, run_main

_logger = logging.getLogger("invpt.runtime")

EXAMPLES = """examples:
  invpt-parity --ckpt tiny_pascal.pth --model tiny_pascal.onnx --model tiny_pascal.fp16.onnx --data assets/
  invpt-parity --ckpt pascal.pth --model pascal.int8.onnx --data data/PASCALContext --samples 16 --out reports/int8
  invpt-parity --ckpt nyud.pth --model nyud.fp16.plan          # an engine: needs the GPU it was built for

Each candidate passes when every task is within the stated tolerance of its precision (the table invpt-export and
invpt-quantize verify against): fp32 rel err <= 1e-4, cosine >= 0.99999, agreement >= 0.999; fp16 1e-2, 0.9999,
0.99; int8 0.15, 0.99, 0.90. Task-level agreement with PyTorch's predictions is reported too (mIoU, agreement at
0.5, depth RMSE, normals angle). Written to --out: parity.json, parity.md, visuals/<candidate>__<task>.png.
An engine this machine cannot run (no CUDA GPU) is listed as 'not run' with the reason.

exit codes: 0 every candidate that ran passed; 2 bad input (missing or mismatched manifest, a candidate of another
model), nothing run; 3 a candidate is outside its tolerance; 4 a library failed (-v shows its traceback).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="invpt-parity",
        description="Run the same images through the checkpoint's PyTorch FP32 model and each candidate (ONNX files "
        "and engines written by invpt, each checked against its manifest), and report per-task parity.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the checkpoint the candidates were made from (the reference)")
    p.add_argument("--config", default=None, help="preset name or YAML path (default: read from the checkpoint)")
    p.add_argument("--model", action="append", required=True, metavar="ARTIFACT",
                   help="candidate: ONNX file or engine with its JSON manifest beside it (repeatable)")
    p.add_argument("--data", default=None, help="image, folder of images, video or PASCAL-Context/NYUD-v2 root "
                   "(default: seeded random inputs)")
    p.add_argument("--samples", type=int, default=4, help="images compared (default 4)")
    p.add_argument("--visual-samples", type=int, default=2, help="images shown in each visual diff PNG (default 2)")
    p.add_argument("--out", default="parity", help="report folder (default ./parity)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs without --data (default 0)")
    add_provider_arg(p)
    add_logging_args(p)
    return p


def _check_inputs(args: argparse.Namespace) -> list:
    """The candidates, loaded and checked against their manifests, after refusing a --samples whose images and
    outputs (all kept in memory: the reference's and one candidate's) cannot fit in the memory available now."""
    from pathlib import Path

    from invpt.runtime.load import check_memory, io_bytes_per_image, load_artifacts

    arts = load_artifacts(args.model)
    if args.samples < 1:
        return arts  # run_parity says why
    per_image = io_bytes_per_image(arts[0].manifest)[0] + 2 * max(io_bytes_per_image(a.manifest)[1] for a in arts)
    n = args.samples
    if args.data is not None and Path(args.data).exists() and n * per_image > (1 << 30):
        from invpt.data.datasets import open_source

        n = min(n, len(open_source(args.data)))  # --data caps the images compared
    check_memory(per_image, n, "--samples", args.samples,
                 f"{n} input image(s) and their outputs (PyTorch's and a candidate's: {per_image / 2**20:.1f} MiB an "
                 "image, all kept until the comparison)")
    return arts


def _run(args: argparse.Namespace) -> int:
    from invpt.runtime.parity import run_parity

    watch = Stopwatch()
    arts = _check_inputs(args)
    try:
        rep = run_parity(args.ckpt, args.model, args.out, config=args.config, data=args.data, samples=args.samples,
                         visual_samples=args.visual_samples, seed=args.seed, providers=(args.provider,),
                         artifacts=arts)
    except MemoryError as err:  # the runtimes' own working memory is not part of the estimate made up front
        from invpt.errors import InputError

        raise InputError(f"Out of memory while comparing --samples {args.samples} ({type(err).__name__}: {err}). "
                         "Pass a smaller --samples; parity.json and parity.md were not written.") from err
    if rep.failed:
        _logger.error("parity FAILED for %s (%.1fs); report %s", ", ".join(rep.failed), watch.seconds,
                      rep.markdown_path)
        return 3
    if not rep.passed:  # nothing failed, and nothing ran: nothing was verified, which a script must not read as a pass
        from invpt.errors import InputError

        why = "; ".join(f"{c['label']}: {c['reason']}" for c in rep.data["candidates"] if c["status"] == "not run")
        raise InputError(f"No candidate could run on this machine, so nothing was verified ({why}). Run invpt-parity "
                         f"where they load (an engine: on a machine with the GPU it was built for); the report "
                         f"{rep.markdown_path} says the same.")
    _logger.info("parity ok (%.1fs); report %s", watch.seconds, rep.markdown_path)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``invpt-parity``: 0 passed, 2 bad input or no candidate could run here, 3 a candidate is outside
    tolerance, 4 a library failed."""
    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
