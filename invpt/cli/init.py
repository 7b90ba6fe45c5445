"""``invpt-init``: write a randomly initialised checkpoint of a config (demos, tests, a start for training)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from invpt.cli.common import add_logging_args, run_main

_logger = logging.getLogger("invpt.init")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="invpt-init",
        description="Create a checkpoint with random weights for a config. The weights are meaningless; use it to "
        "try the toolchain end to end without a trained model, or as a starting point.",
        epilog="example:\n  invpt-init --config tiny_pascal --out out/tiny_pascal.pth --official-format",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="preset name (e.g. tiny_pascal) or YAML path")
    p.add_argument("--out", required=True, help="checkpoint path to write (atomically)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--official-format", action="store_true",
                   help="write the official layout {'model': {'module.'+key: ...}} instead of invpt's (weights + config)")
    add_logging_args(p)
    return p


def _run(args: argparse.Namespace) -> int:
    import torch

    import invpt
    from invpt.checkpoint import save_checkpoint, save_official_checkpoint

    torch.manual_seed(args.seed)
    model = invpt.build_model(args.config).eval()
    # Non-trivial BatchNorm statistics, so exported graphs and parity checks exercise every op.
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    path = save_official_checkpoint(model, args.out) if args.official_format else save_checkpoint(model, args.out)
    _logger.info("init ok -> %s (%s, random weights, seed %d)", path, model.cfg.name or model.cfg.dataset, args.seed)
    _logger.info("next: invpt-export --ckpt %s", path)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``invpt-init``."""
    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
