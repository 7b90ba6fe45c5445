"""``invpt-init``: write a randomly initialised checkpoint of a config (demos, tests, a start for training)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from invpt.cli.common import add_logging_args, run_main
from invpt.errors import InputError

_logger = logging.getLogger("invpt.init")

#: --out suffixes that name another kind of file (a manifest, a config, a graph, an engine); refused.
_NOT_CHECKPOINT_SUFFIXES = (".json", ".yaml", ".yml", ".onnx", ".engine", ".plan", ".trt")
_OUT_FIX = "Pass a checkpoint file path such as out/tiny_pascal.pth."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="invpt-init",
        description="Create a checkpoint with random weights for a config. The weights are meaningless; use it to "
        "try the toolchain end to end without a trained model, or as a starting point.",
        epilog="example:\n  invpt-init --config tiny_pascal --out out/tiny_pascal.pth --official-format\n\n"
        "--out is written atomically (a temporary file beside it, then renamed); an existing checkpoint there is\n"
        "replaced, any other existing file, a folder or a name ending in .json/.yaml/.onnx/.engine is refused.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="preset name (e.g. tiny_pascal) or YAML path")
    p.add_argument("--out", required=True, help="checkpoint file to write (atomically; replaces only a checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--official-format", action="store_true",
                   help="write the official layout {'model': {'module.'+key: ...}} instead of invpt's (weights + config)")
    add_logging_args(p)
    return p


def _looks_like_checkpoint(path: Path) -> bool:
    """Whether an existing file is a PyTorch checkpoint (zip or legacy pickle) or empty: the files init replaces."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == b"" or head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def check_out(out: str) -> Path:
    """Refuse, before any work, an --out that is not a place for a new checkpoint (one paragraph, exit 2)."""
    from invpt.atomic import check_output_file

    path = Path(out)
    name = path.name.lower()
    if name.endswith(_NOT_CHECKPOINT_SUFFIXES):
        raise InputError(
            f"--out '{path}' ends in {path.suffix}, which names another kind of file (.json is a manifest, .yaml a "
            f"config, .onnx/.engine a model graph), not a checkpoint. {_OUT_FIX}"
        )
    check_output_file(path, "--out", _OUT_FIX, InputError)
    if path.is_file() and not _looks_like_checkpoint(path):
        raise InputError(
            f"--out '{path}' exists and is not a PyTorch checkpoint; invpt-init replaces only checkpoints, so this "
            f"file is left alone. Delete it yourself if it is not needed, or choose another --out. {_OUT_FIX}"
        )
    return path


def _run(args: argparse.Namespace) -> int:
    import torch

    import invpt
    from invpt.checkpoint import save_checkpoint, save_official_checkpoint
    from invpt.config import load_config

    out = check_out(args.out)
    cfg = load_config(args.config)
    torch.manual_seed(args.seed)
    model = invpt.build_model(cfg).eval()
    # Non-trivial BatchNorm statistics, so exported graphs and parity checks exercise every op.
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    path = save_official_checkpoint(model, out) if args.official_format else save_checkpoint(model, out)
    _logger.info("init ok -> %s (%s, random weights, seed %d)", path, model.cfg.name or model.cfg.dataset, args.seed)
    _logger.info("next: invpt-export --ckpt %s", path)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``invpt-init``; returns the exit code (0 ok, 2 bad input)."""
    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
