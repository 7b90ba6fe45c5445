"""Shared fixtures: tiny models with non-trivial BatchNorm statistics, and their checkpoints."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # scripts/test.sh runs one worker per core
REPO = Path(__file__).resolve().parents[1]
TEST_DATA = Path(__file__).resolve().parent / "data"  # vendored reference facts (official key/shape listings)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and BN buffer non-trivial values so parity tests can fail for real."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.dim() > 1 else 0.1) + (1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "bn1.weight", "bn.weight")) else 0.0))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


@pytest.fixture(scope="session")
def tiny_pascal():
    import invpt

    return randomize_(invpt.build_model("tiny_pascal", fused_attn=False), seed=1).eval()


@pytest.fixture(scope="session")
def tiny_nyud():
    import invpt

    return randomize_(invpt.build_model("tiny_nyud", fused_attn=False), seed=2).eval()


@pytest.fixture(scope="session")
def tiny_pascal_official_ckpt(tiny_pascal, tmp_path_factory) -> Path:
    from invpt.checkpoint import save_official_checkpoint

    return save_official_checkpoint(tiny_pascal, tmp_path_factory.mktemp("ckpt") / "tiny_pascal_official.pth.tar")


@pytest.fixture(scope="session")
def tiny_nyud_official_ckpt(tiny_nyud, tmp_path_factory) -> Path:
    from invpt.checkpoint import save_official_checkpoint

    return save_official_checkpoint(tiny_nyud, tmp_path_factory.mktemp("ckpt") / "tiny_nyud_official.pth.tar")
