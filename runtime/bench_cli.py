"""``invpt-bench``: interleaved latency of several runners; JSON + Markdown + a PNG plot."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from invpt.cli.common import Stopwatch, add_logging_args, add_provider_arg, run_main

_logger = logging.getLogger("invpt.runtime")

EXAMPLES = """examples:
  invpt-bench --model tiny_pascal.onnx --model tiny_pascal.fp16.onnx --ckpt tiny_pascal.pth --batch 1,4
  invpt-bench --model pascal.fp16.plan --model pascal.int8.plan --batch 1,8 --cuda-graph    # on the GPU
  invpt-bench --ckpt pascal.pth --device cuda --autocast fp16 --batch 1,8 --iters 200       # PyTorch CUDA

Runners are timed round-robin (A, B, C, A, B, C...) after the warm-up so drift of a shared machine hits all alike;
statistics are numpy's (mean, p50, p90, p95, p99, min, max; throughput = batch / mean). For each engine the
equivalent trtexec (enterprise TensorRT) or tensorrt_rtx (TensorRT-RTX) command is printed. Engines need the GPU
they were built for; without one they are listed as not run. Written to --out: bench.json, bench.md, bench.png.

exit codes: 0 ok; 2 bad input (missing or mismatched manifest, --batch outside an engine's profile or an ONNX's
static batch); 4 a library failed (-v shows its traceback).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="invpt-bench",
        description="Time several runners side by side (ONNX files and engines written by invpt, and the "
        "checkpoint's PyTorch model), interleaved, at one or more batch sizes.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="ARTIFACT",
                   help="ONNX file or engine with its JSON manifest beside it (repeatable)")
    p.add_argument("--ckpt", default=None, help="also time the checkpoint's PyTorch model")
    p.add_argument("--config", default=None, help="with --ckpt: preset name or YAML path")
    p.add_argument("--device", default="cpu", help="PyTorch runner device: cpu (default), cuda, cuda:N")
    p.add_argument("--autocast", action="append", default=[], choices=("fp16", "bf16"),
                   help="also time PyTorch under CUDA autocast at this precision (repeatable; CUDA only)")
    p.add_argument("--batch", default="1", help="batch sizes, comma separated (default 1)")
    p.add_argument("--iters", type=int, default=50, help="timed iterations per runner and batch (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up iterations (default 5)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    p.add_argument("--cuda-graph", action="store_true", help="also time each engine replaying a CUDA graph")
    p.add_argument("--out", default="bench", help="report folder (default ./bench)")
    add_provider_arg(p)
    add_logging_args(p)
    return p


def _check_inputs(args: argparse.Namespace, batches: list[int]) -> list:
    """Checks run_bench would make only after loading the checkpoint (seconds for ViT-L) or not at all: the PyTorch
    --device and --autocast, and a --batch whose inputs and outputs cannot fit in the memory available now.
    Returns the --model artifacts, loaded and checked against their manifests."""
    from invpt.errors import InputError

    if args.ckpt is not None:
        from invpt.checkpoint import resolve_device

        dev = resolve_device(args.device)
        if args.autocast and dev.type != "cuda":
            raise InputError(f"--autocast {','.join(args.autocast)} times PyTorch under CUDA autocast, but --device is "
                             f"'{args.device}'. Add --device cuda, or leave --autocast out.")
    elif args.autocast or args.device != "cpu":
        raise InputError("--device and --autocast set up the PyTorch runner, which needs --ckpt. Add --ckpt CKPT, or "
                         "leave them out to time only the --model artifacts.")
    if not args.model:
        return []
    from invpt.runtime.load import check_memory, io_bytes_per_image, load_artifacts

    arts = load_artifacts(args.model)
    inputs = {tuple(a.manifest.inputs[0].shape[1:]): io_bytes_per_image(a.manifest)[0] for a in arts}  # one per size
    per_image = sum(inputs.values()) + max(io_bytes_per_image(a.manifest)[1] for a in arts)
    if batches and all(isinstance(b, int) and b >= 1 for b in batches):
        for a in arts:  # a static batch or an engine profile refuses a --batch more precisely
            for b in batches:
                a.check_batch(b)
        check_memory(per_image, max(batches), "--batch", args.batch,
                     f"the random inputs of every runner and one runner's outputs ({per_image / 2**20:.1f} MiB an "
                     "image, before the runtimes' own working memory)")
    return arts


def _run(args: argparse.Namespace) -> int:
    from invpt.runtime.bench import parse_batches, run_bench

    watch = Stopwatch()
    batches = parse_batches(args.batch)
    arts = _check_inputs(args, batches)
    try:
        rep = run_bench(args.model, args.out, ckpt=args.ckpt, config=args.config, batches=batches,
                        iters=args.iters, warmup=args.warmup, threads=args.threads, torch_device=args.device,
                        autocast=args.autocast, cuda_graph=args.cuda_graph, providers=(args.provider,),
                        artifacts=arts)
    except MemoryError as err:  # the PyTorch runner's activations (not estimated up front) at a large --batch
        from invpt.errors import InputError

        raise InputError(f"Out of memory while timing --batch {args.batch} ({type(err).__name__}: {err}). Pass "
                         "smaller --batch sizes; the report was not written.") from err
    for c in rep.data["commands"]:
        print(c["command"])
    _logger.info("bench ok (%.1fs); report %s", watch.seconds, rep.markdown_path)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``invpt-bench``: 0 ok, 2 bad input, 4 a library failed."""
    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
