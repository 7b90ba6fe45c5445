"""``invpt-quantize``: FP32 ONNX -> FP16 (AutoCast) or INT8 (explicit Q/DQ) ONNX, verified per task."""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from invpt.cli.common import Stopwatch, add_logging_args, human_size, run_main
from invpt.errors import InputError, VerificationError

_logger = logging.getLogger("invpt.calib")

EXAMPLES = """examples:
  invpt-quantize --onnx model.onnx --precision fp16                               # -> model.fp16.onnx + .json
  invpt-quantize --onnx model.onnx --precision int8 --calib-data data/PASCALContext --calib-samples 64
  invpt-quantize --onnx model.onnx --precision int8 --calib-data frames/ --calib-method percentile --keep head.normals
  invpt-quantize --onnx model.onnx --precision int8 --calib-data video.mp4 --sensitivity --budget semseg=0.03,normals=0.05
  invpt-quantize --onnx model.onnx --list-terms                                    # model terms a policy can name

entropy and max: invpt measures the activation ranges itself, in ONNX Runtime sessions that expose a bounded
share of the tensors ModelOpt will quantize and fold each step into ModelOpt's own accumulators, then ModelOpt
inserts the Q/DQ nodes from those ranges (the same model as ModelOpt calibrating itself; memory bounded by the
model, not the number of samples). --calibrate-per-node / --no-calibrate-per-node let ModelOpt calibrate itself
instead (node by node, or the whole graph at once). Measured times and memory: bench/README.md.

Tolerances vs FP32 PyTorch on held-out samples (pass/fail, exit 3 on fail):
  fp16: rel err <= 1e-2, cosine >= 0.9999, agreement >= 0.99
  int8: rel err <= 0.15, cosine >= 0.99,   agreement >= 0.90

exit codes: 0 verified (or --no-verify); 2 bad input (also an ONNX that no longer matches its manifest), nothing
written; 3 outside the tolerance, nothing written unless --allow-mismatch; 4 a library (ModelOpt, onnxruntime) failed:
re-run with -v for its traceback.
"""


def _budgets(text: Optional[str]) -> Optional[dict[str, float]]:
    if not text:
        return None
    out = {}
    for item in text.split(","):
        if "=" not in item:
            raise InputError(f"--budget expects task=value pairs like semseg=0.03,normals=0.05; got '{item}'.")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise InputError(f"--budget value for '{k}' is not a number: '{v}'.") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="invpt-quantize",
        description="Make the reduced-precision ONNX files TensorRT 10/11 consume: FP16 mixed precision (ModelOpt "
        "AutoCast) or INT8 explicit Q/DQ (ModelOpt PTQ; onnxruntime for percentile), with a named precision policy, "
        "calibration on real samples, a per-task parity check on held-out samples, and a manifest next to the output.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--onnx", required=True, help="FP32 ONNX written by invpt-export (its .json manifest must be beside it)")
    p.add_argument("--precision", choices=("fp16", "int8"), help="target precision (required unless --list-terms)")
    p.add_argument("--out", default=None, help="output path (default: <name>.fp16.onnx / <name>.int8.onnx next to --onnx)")
    g = p.add_argument_group("Policy")
    g.add_argument("--policy", default="default",
                   help="named policy: fp16 'default' (LayerNorm, Softmax, attention scores FP32) or 'layernorm-only'; "
                   "int8 'default' (Conv/MatMul/Gemm except attention scores) or 'backbone-only'")
    g.add_argument("--keep", action="append", default=[], metavar="TERM",
                   help="also keep this model term in high precision (repeatable): e.g. head.normals, decoder.stage2, "
                   "backbone.block.0, op.Resize; see --list-terms")
    g.add_argument("--list-terms", action="store_true", help="print the model terms and their node counts, then exit")
    c = p.add_argument_group("Calibration data")
    c.add_argument("--calib-data", default=None,
                   help="PASCAL-Context or NYUD-v2 root (official layout; val split), a folder of images, or a video; "
                   "required for int8, optional for fp16 (held-out parity inputs)")
    c.add_argument("--calib-samples", type=int, default=32, help="images used to calibrate (default 32)")
    c.add_argument("--holdout-samples", type=int, default=4,
                   help="further images, never used for calibration, for the parity check (default 4)")
    c.add_argument("--calib-method", choices=("entropy", "max", "percentile"), default="entropy",
                   help="activation range calibration (default entropy)")
    c.add_argument("--calibrate-per-node", action=argparse.BooleanOptionalAction, default=None,
                   help="entropy/max: let ModelOpt calibrate itself, node by node (memory bounded by one node's "
                   "tensors, slow) or, with --no-calibrate-per-node, the whole graph at once (memory grows with the "
                   "model's copies and one step's tensors). Default (neither flag): invpt measures the ranges with "
                   "bounded memory and ModelOpt inserts Q/DQ from them, the same model; choose a flag only to compare "
                   "with ModelOpt's own calibration. Ignored by percentile")
    c.add_argument("--dataset", choices=("pascal_context", "nyud_v2", "folder", "video", "image"), default=None,
                   help="how to read --calib-data when detection is not what you want, e.g. a db_root holding both "
                   "PASCALContext/ and NYUDv2/ (default: detected from the path)")
    c.add_argument("--split", default="val", help="split file of a PASCAL-Context/NYUD-v2 root to sample from (default val)")
    c.add_argument("--video-step", type=int, default=1, metavar="N",
                   help="video --calib-data: sample from every N-th frame (default 1: every frame)")
    c.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    c.add_argument("--cache-dir", default=None, help="prepared-tensor cache (default $INVPT_CACHE_DIR or ~/.cache/invpt)")
    v = p.add_argument_group("Verification")
    v.add_argument("--ckpt", default=None,
                   help="FP32 PyTorch checkpoint for the reference outputs (default: the one recorded in the manifest; "
                   "if absent, the export-verified FP32 ONNX)")
    v.add_argument("--no-verify", action="store_true", help="skip the held-out parity check")
    v.add_argument("--allow-mismatch", action="store_true",
                   help="write the output even if parity is outside tolerance (its manifest records passed=false); "
                   "the command still exits 3, so scripts notice")
    v.add_argument("--sensitivity", action="store_true",
                   help="int8: measure each block alone in INT8 per task, search what to keep for --budget; writes "
                   "<name>.int8.sensitivity.{json,md,png}")
    v.add_argument("--budget", default=None,
                   help="per-task budget for --sensitivity as relative L2 error vs FP32, e.g. semseg=0.03,normals=0.05 "
                   "(default 0.05 each)")
    add_logging_args(p)
    return p


def options_from_args(args: argparse.Namespace):
    """The parsed command line as the stage's options (every flag has a field; nothing is dropped)."""
    from invpt.calib.pipeline import QuantizeOptions

    return QuantizeOptions.make(
        args.precision, args.out, policy=args.policy, keep_terms=args.keep, calib_data=args.calib_data,
        calib_samples=args.calib_samples, holdout_samples=args.holdout_samples, calib_method=args.calib_method,
        calibrate_per_node=args.calibrate_per_node, dataset=args.dataset, split=args.split,
        video_step=args.video_step, seed=args.seed, cache_dir=args.cache_dir, ckpt=args.ckpt,
        verify=not args.no_verify, allow_mismatch=args.allow_mismatch, sensitivity=args.sensitivity,
        budgets=_budgets(args.budget), command="invpt-quantize " + shlex.join(sys.argv[1:]),
    )


def _list_terms(onnx_path: str) -> int:
    from google.protobuf.message import DecodeError

    from invpt.artifacts import verified_manifest
    from invpt.calib.pipeline import unreadable_onnx
    from invpt.calib.policy import block_terms, graph_nodes, resolve_terms, term_patterns

    man = verified_manifest(onnx_path, what="ONNX file")
    cfg = man.model_config
    try:
        nodes = graph_nodes(onnx_path)
    except DecodeError as err:
        raise unreadable_onnx(Path(onnx_path), err) from err
    terms = resolve_terms(term_patterns(man.tasks, cfg.backbone.depth), nodes, man.tasks, cfg.backbone.depth)
    blocks = set(block_terms(man.tasks, cfg.backbone.depth))
    print("| term | nodes | Conv/MatMul/Gemm | sensitivity block |\n|---|---|---|---|")
    for term, names in terms.items():
        q = sum(1 for n, t in nodes if n in set(names) and t in ("Conv", "MatMul", "Gemm"))
        print(f"| {term} | {len(names)} | {q} | {'yes' if term in blocks else ''} |")
    return 0


def _run(args: argparse.Namespace) -> int:
    from invpt.calib.pipeline import quantize

    if args.list_terms:
        return _list_terms(args.onnx)
    if not args.precision:
        raise InputError("--precision fp16|int8 is required (or --list-terms).")
    watch = Stopwatch()
    res = quantize(args.onnx, options_from_args(args))
    if res.parity is not None and not res.parity.passed:
        bad = sorted(k for k, v in res.parity.tasks.items() if not v.passed)
        raise VerificationError(
            f"The {args.precision.upper()} model '{res.onnx_path}' is outside the stated tolerance for {bad}; it was "
            "written anyway because of --allow-mismatch, and its manifest records verification.passed=false. Do not "
            "deploy it: keep more of the model in high precision (--keep TERM) or run --sensitivity with --budget."
        )
    status = "verified" if res.parity else "NOT verified (--no-verify)"
    _logger.info("quantize ok %.1fs -> %s (%s, %s), %s; manifest %s", watch.seconds, res.onnx_path,
                 args.precision, human_size(res.manifest.size_bytes), status, res.manifest_path)
    _logger.info("next: invpt-trt-build --onnx %s   (on a machine with TensorRT)", res.onnx_path)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``invpt-quantize``; returns 0 ok, 2 bad input, 3 outside tolerance, 4 a library failed."""
    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
