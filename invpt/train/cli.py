"""``invpt-train``: train or fine-tune InvPT with the official recipe; one process, or one per GPU under torchrun."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from invpt.cli.common import Stopwatch, add_logging_args, run_main
from invpt.errors import InputError

_logger = logging.getLogger("invpt.train")

EXAMPLES = """examples:
  invpt-synth-data --dataset pascal_context --out data/synth                  # a tiny dataset to try it on
  invpt-train --config tiny_pascal --data data/synth --out runs/tiny --max-iter 200 --eval-every 100
  invpt-train --config pascal_vitl --data /data --out runs/pascal --backbone-weights vit_large_p16_384.safetensors
  invpt-train --out runs/pascal --resume                                      # continue from runs/pascal/last.pth
  torchrun --nproc_per_node 4 -m invpt.train.cli --config pascal_vitl --data /data --out runs/pascal
  torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint host0:29500 \\
           -m invpt.train.cli --config pascal_vitl --data /data --out runs/pascal --batch 1

outputs in --out: last.pth and ckpt_<iter>.pth (weights + config + optimizer/schedule/RNG/data position: --resume
continues exactly), final.pth (weights + config) and final_official.pth.tar (official layout) at the end,
train_log.csv (losses per iteration), tensorboard/, eval/iter_<N>.json|md. Every checkpoint loads with
invpt-export --ckpt, invpt-eval --ckpt and invpt.load_model.

the --out folder: a run never writes into a folder where one of these names holds a file invpt-train did not write
(refused before any work; move the file or choose another --out). A new run (no --resume) needs a folder without an
earlier run's outputs: one with a checkpoint is continued with --resume, and the logs and reports of a run that
stopped before its first checkpoint are refused, never appended to (delete them or choose another --out); a new run
never mixes with an earlier run's files. A run that fails or is interrupted before its first checkpoint (bad data,
the loss diverged, Ctrl-C) removes what it wrote, and the folders it created, so the same command can simply be run
again; after a checkpoint, a failed run keeps its outputs for --resume. Other files in --out are never touched.

exit codes: 0 done; 2 bad input (data, config, output folder, resume checkpoint) or the loss became NaN/Inf (the
last good checkpoint is kept); 4 a library failed: re-run with -v for its traceback.
"""


def build_parser() -> argparse.ArgumentParser:
    from invpt.train.options import RESUME_LAST

    p = argparse.ArgumentParser(
        prog="invpt-train",
        description="Train InvPT on PASCAL-Context or NYUD-v2 (official layout) with the official recipe: Adam lr 2e-5, "
        "weight decay 1e-6, poly schedule over 40k iterations, batch 2 per process, intermediate supervision, FP32. "
        "Checkpoints, logs and evaluation reports go to --out; --resume continues a run exactly where it stopped.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("Model and data")
    g.add_argument("--config", default=None,
                   help="preset name (pascal_vitl, nyud_vitl, tiny_pascal, tiny_nyud) or YAML path, e.g. "
                   "--config pascal_vitl; required unless --resume (a resumed run uses the checkpoint's config)")
    g.add_argument("--data", required=True,
                   help="dataset root in the official layout: the PASCALContext/ or NYUDv2/ folder or their parent, "
                   "e.g. --data /datasets (invpt-synth-data writes a tiny one)")
    g.add_argument("--train-split", default="train", help="training split name (default train)")
    g.add_argument("--val-split", default="val", help="evaluation split name (default val)")
    g.add_argument("--backbone-weights", default=None, metavar="PATH",
                   help="local timm ViT checkpoint (.pth/.bin/.safetensors/.npz) for the backbone, e.g. ImageNet "
                   "weights of vit_large_patch16_384; the position embedding is resampled to the config's size. "
                   "Nothing is downloaded. Default: random initialisation")
    g.add_argument("--no-augment", action="store_true",
                   help="train on the eval transforms (pad only) instead of the official augmentation (random "
                   "scale, crop, flip, photometric); for debugging and overfitting checks")
    o = p.add_argument_group("Output and checkpoints")
    o.add_argument("--out", default=None,
                   help="output folder (default runs/<config name>; with --resume PATH, the checkpoint's folder), "
                   "e.g. --out runs/pascal. A folder holding another run is refused unless --resume, and one holding files "
                   "named like the outputs that invpt-train did not write is always refused (see below)")
    o.add_argument("--resume", nargs="?", const=RESUME_LAST, default=None, metavar="CKPT",
                   help="continue a run: without a value from --out/last.pth, or from the given last.pth / "
                   "ckpt_<iter>.pth; model, optimizer, schedule, iteration, data order and RNG states are restored")
    o.add_argument("--checkpoint-every", type=int, default=5000, metavar="N",
                   help="write ckpt_<iter>.pth and last.pth every N iterations (default 5000; 0: only at the end)")
    o.add_argument("--keep-checkpoints", type=int, default=3, metavar="N",
                   help="keep only the newest N ckpt_<iter>.pth files (default 3; 0 keeps all); last.pth is kept")
    s = p.add_argument_group("Optimisation")
    s.add_argument("--max-iter", type=int, default=40000, help="total iterations (default 40000, as upstream)")
    s.add_argument("--batch", type=int, default=2,
                   help="images per process and iteration (default 2, as upstream; global batch = batch x processes)")
    s.add_argument("--lr", type=float, default=2e-5, help="Adam learning rate (default 2e-5)")
    s.add_argument("--weight-decay", type=float, default=1e-6, help="Adam weight decay (default 1e-6)")
    s.add_argument("--poly-power", type=float, default=0.9,
                   help="poly schedule power: lr x (1 - iter/max_iter)^power, per iteration (default 0.9)")
    s.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order, augmentation (default 0)")
    e = p.add_argument_group("Evaluation")
    e.add_argument("--eval-every", type=int, default=5000, metavar="N",
                   help="evaluate on --val-split every N iterations (default 5000; 0: only at the end)")
    e.add_argument("--no-final-eval", action="store_true", help="skip the evaluation at the end of training")
    e.add_argument("--eval-batch", type=int, default=6, help="images per process during evaluation (default 6)")
    h = p.add_argument_group("Hardware and memory")
    h.add_argument("--device", default="auto",
                   help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default auto); under torchrun each "
                   "process uses cuda:LOCAL_RANK")
    h.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per process (default 2)")
    h.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast for the forward pass (CUDA with compute capability 8.0+, or CPU); the "
                   "official recipe is FP32, so metrics may differ slightly")
    h.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute ViT block activations during backward: much less activation memory, more time")
    h.add_argument("--freeze-bn-stats", action="store_true",
                   help="BatchNorm uses its running statistics and never updates them (fine-tuning with small "
                   "per-process batches; also makes CPU multi-process training independent of the split)")
    h.add_argument("--no-sync-bn", action="store_true",
                   help="keep per-process BatchNorm statistics on several GPUs (default: SyncBatchNorm, as upstream)")
    lg = p.add_argument_group("Progress")
    lg.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto",
                    help="console progress: bar (tqdm), lines (one log line every --log-every iterations: for batch "
                    "jobs), none; auto: a bar on a terminal, else lines")
    lg.add_argument("--log-every", type=int, default=20, help="iterations between progress lines (default 20)")
    lg.add_argument("--tensorboard", choices=("auto", "on", "off"), default="auto",
                    help="TensorBoard scalars in --out/tensorboard: auto (when installed), on (required), off; the "
                    "CSV log is always written")
    add_logging_args(p)
    return p


def default_out_dir(args: argparse.Namespace) -> Path:
    """``--out``, else the resumed checkpoint's folder, else ``runs/<config name>``."""
    from invpt.train.options import RESUME_LAST

    if args.out:
        return Path(args.out)
    if args.resume and args.resume != RESUME_LAST:
        return Path(args.resume).parent
    if args.config is None:
        raise InputError("--resume without a checkpoint path needs --out: the run folder whose last.pth to continue "
                         "(e.g. invpt-train --out runs/pascal --resume --data /data).")
    name = Path(args.config).name
    for suffix in (".yaml", ".yml"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return Path("runs") / name


def options_from_args(args: argparse.Namespace):
    """The parsed command line as :class:`~invpt.train.options.TrainOptions` (every flag has a field)."""
    from invpt.train.options import TrainOptions

    return TrainOptions(
        config=args.config, data_root=Path(args.data), out_dir=default_out_dir(args), resume=args.resume,
        max_iter=args.max_iter, batch=args.batch, lr=args.lr, weight_decay=args.weight_decay,
        poly_power=args.poly_power, eval_every=args.eval_every, final_eval=not args.no_final_eval,
        eval_batch=args.eval_batch, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        seed=args.seed, workers=args.workers, bf16=args.bf16, grad_checkpointing=args.grad_checkpointing,
        backbone_weights=Path(args.backbone_weights) if args.backbone_weights else None, device=args.device,
        augment=not args.no_augment, freeze_bn_stats=args.freeze_bn_stats, sync_bn=not args.no_sync_bn,
        train_split=args.train_split, val_split=args.val_split, progress=args.progress, log_every=args.log_every,
        tensorboard=args.tensorboard, command="invpt-train " + shlex.join(sys.argv[1:]),
    )


def _run(args: argparse.Namespace) -> int:
    from invpt.train.loop import train

    if os.environ.get("RANK", "0") not in ("", "0"):
        logging.getLogger("invpt").setLevel(logging.WARNING)  # rank 0 reports; the others only warn
    watch = Stopwatch()
    opts = options_from_args(args)
    result = train(opts)
    if os.environ.get("RANK", "0") in ("", "0"):
        scores = ""
        if result.scores:
            from invpt.train.evaluate import headline

            scores = "; eval: " + headline(result.scores, result.config)
        ckpt = result.final_checkpoint or result.last_checkpoint
        _logger.info("train ok %.1fs -> %s (iteration %d)%s", watch.seconds, ckpt, result.iteration, scores)
        if ckpt is not None:
            _logger.info("next: invpt-eval --ckpt %s --data %s   |   invpt-export --ckpt %s", ckpt, opts.data_root, ckpt)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``invpt-train``; returns the exit code (0 ok, 2 bad input or divergence, 4 a library failed)."""
    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
