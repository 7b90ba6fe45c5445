"""The training loop on a micro InvPT (64x64, ViT depth 3, ~0.6M parameters) and synthetic data: the loss falls,
a resumed run reproduces the uninterrupted one, two torchrun processes train like one, checkpoints load everywhere,
a NaN loss stops the run with the last good checkpoint kept, and timm backbone weights load."""
from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import invpt
from invpt.errors import CheckpointError, ConfigError
from invpt.train import TrainOptions, train
from invpt.train.distributed import ResumableSampler
from invpt.train.logging_utils import LOG_NAME, read_log
from invpt.train.loop import TrainingDivergedError, load_backbone_weights

REPO = Path(__file__).resolve().parents[1]

#: The smallest valid InvPT: 64x64 input (the size multiple), ViT width 48 / depth 3, decoder E = 48.
MICRO = {
    "name": "micro_pascal",
    "dataset": "pascal_context",
    "image_size": [64, 64],
    "backbone": {"depth": 3, "embed_dim": 48, "num_heads": 2, "taps": [1, 2, 3], "drop_path_rate": 0.1},
    "decoder": {"embed_dim": 32, "pred_channels": 16},
}
NYUD_MICRO = {
    "dataset": "nyud_v2", "tasks": ["normals", "edge"], "image_size": [64, 64],
    "backbone": {"depth": 3, "embed_dim": 48, "num_heads": 2, "taps": [1, 2, 3], "drop_path_rate": 0.0},
    "decoder": {"embed_dim": 32, "pred_channels": 16},
}
LOSS_KEYS = ["total", "semseg", "human_parts", "sal", "normals", "edge", "inter_semseg", "inter_human_parts",
             "inter_sal", "inter_normals", "inter_edge"]


@pytest.fixture(scope="module")
def pascal_root(tmp_path_factory) -> Path:
    from invpt.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synth")
    make_synthetic("pascal_context", root, n_train=4, n_val=2, size=(64, 64), seed=3)
    return root


def _opts(data: Path, out: Path, **kw) -> TrainOptions:
    base = dict(config=MICRO, data_root=data, out_dir=out, workers=0, progress="none", tensorboard="off",
                eval_every=0, final_eval=False, checkpoint_every=0, eval_batch=2)
    base.update(kw)
    return TrainOptions(**base)


def _losses(rows, keys=LOSS_KEYS):
    """Every loss of every row, flattened (pytest.approx compares flat sequences)."""
    return [r[k] for r in rows for k in keys]


@pytest.fixture(scope="module")
def run_a(pascal_root, tmp_path_factory):
    """8 iterations with augmentation, drop-path, a DataLoader worker, an evaluation and checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("run") / "a"
    result = train(_opts(pascal_root, out, max_iter=8, batch=2, lr=1e-3, checkpoint_every=4, keep_checkpoints=0,
                         eval_every=4, final_eval=True, workers=1, tensorboard="auto"))
    return result


def test_overfit_loss_falls(pascal_root, tmp_path):
    """Four images without augmentation, lr 3e-3: the loss falls clearly (measured: last-5 / first-5 mean ~0.3)."""
    result = train(_opts(pascal_root, tmp_path / "o", max_iter=30, batch=2, lr=3e-3, augment=False))
    totals = [r["total"] for r in result.history]
    assert len(totals) == 30 and all(math.isfinite(t) for t in totals)
    first, last = sum(totals[:5]) / 5, sum(totals[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    # the CSV is the same record, every loss column present
    rows = read_log(tmp_path / "o" / LOG_NAME)
    assert [r["iteration"] for r in rows] == list(range(1, 31))
    assert _losses(rows) == pytest.approx(_losses(result.history), rel=1e-12)
    assert rows[0]["lr"] == pytest.approx(3e-3) and rows[-1]["lr"] == pytest.approx(3e-3 * (1 - 29 / 30) ** 0.9)


def test_run_writes_checkpoints_reports_and_logs(run_a):
    out = run_a.out_dir
    names = {p.name for p in out.iterdir()}
    assert {"last.pth", "ckpt_000004.pth", "ckpt_000008.pth", "final.pth", "final_official.pth.tar", LOG_NAME,
            "eval", "tensorboard"} <= names
    assert os.path.samefile(out / "last.pth", out / "ckpt_000008.pth")  # last.pth is a link, not a second copy
    assert sorted(p.name for p in (out / "eval").iterdir()) == [
        "iter_000004.json", "iter_000004.md", "iter_000008.json", "iter_000008.md"]
    assert set(run_a.scores) == {"semseg", "human_parts", "sal", "normals", "edge"}
    assert "mIoU" in run_a.scores["semseg"] and "mean" in run_a.scores["normals"]
    assert any((out / "tensorboard").iterdir())
    assert not [p for p in out.rglob(".*tmp*")]


def test_resume_reproduces_the_uninterrupted_run(run_a, pascal_root, tmp_path):
    """Resumed from the iteration-4 checkpoint (no worker this time), iterations 5-8 give the same losses and the
    same final weights as the uninterrupted run: data order, position in the epoch, augmentation, drop-path RNG,
    optimizer and schedule are all restored."""
    ckpt4 = run_a.out_dir / "ckpt_000004.pth"
    resumed = train(_opts(pascal_root, tmp_path / "b", max_iter=8, batch=2, lr=1e-3, checkpoint_every=4, resume=str(ckpt4),
                          config=None))
    assert resumed.start_iteration == 4 and resumed.iteration == 8
    assert _losses(resumed.history) == pytest.approx(_losses(run_a.history[4:]), rel=1e-6, abs=1e-7)
    a = torch.load(run_a.out_dir / "final.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "final.pth", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst <= 1e-6


def test_resume_in_place_drops_log_rows_after_the_checkpoint(run_a, pascal_root, tmp_path):
    """A run killed after iteration 8's log rows but with last.pth still at 4 (simulated): --resume continues from
    last.pth, the rows after 4 are replaced, and the log reads exactly like the uninterrupted run's."""
    folder = tmp_path / "c"
    shutil.copytree(run_a.out_dir, folder)
    for name in ("last.pth", "ckpt_000008.pth", "final.pth", "final_official.pth.tar"):
        (folder / name).unlink()
    shutil.copyfile(folder / "ckpt_000004.pth", folder / "last.pth")
    train(_opts(pascal_root, folder, max_iter=8, batch=2, lr=1e-3, checkpoint_every=4, resume="last",
                config=None))
    rows, ref = read_log(folder / LOG_NAME), read_log(run_a.out_dir / LOG_NAME)
    assert [r["iteration"] for r in rows] == list(range(1, 9))
    assert _losses(rows) == pytest.approx(_losses(ref), rel=1e-6, abs=1e-7)


def test_resume_refuses_a_config_with_other_tasks(run_a, pascal_root, tmp_path):
    other = dict(MICRO, tasks=["semseg", "normals"])
    with pytest.raises(ConfigError, match="differs from the config stored in the resumed checkpoint.*tasks"):
        train(_opts(pascal_root, tmp_path / "d", max_iter=8, resume=str(run_a.out_dir / "last.pth"), config=other))


class _ReachedTheExport(Exception):
    """Raised in place of the ONNX tracing: invpt-export read the checkpoint and got to its first step of real work."""


def test_checkpoints_load_with_load_model_and_export(run_a, tmp_path, monkeypatch):
    """Every checkpoint the run wrote loads with the trained weights, through invpt.load_model and through invpt-export
    (which is stopped at its tracing step: the checkpoint format is under test here, not torch.onnx)."""
    import invpt.export.pipeline as pipeline
    from invpt.export.cli import main as export_main

    out = run_a.out_dir
    ref = torch.load(out / "final.pth", weights_only=True)["state_dict"]
    for name, config in (("last.pth", None), ("final.pth", None), ("final_official.pth.tar", MICRO)):
        model = invpt.load_model(out / name, config=config)
        assert not model.training and model.cfg.image_size == (64, 64)
        sd = model.state_dict()
        assert all(torch.equal(sd[k], ref[k]) for k in ref), name
    official = torch.load(out / "final_official.pth.tar", weights_only=True)
    assert set(official) == {"model"} and all(k.startswith("module.") for k in official["model"])
    handed = []

    def reached(model, path, **kw):
        handed.append((model.cfg.image_size, model.state_dict()))
        raise _ReachedTheExport(path)

    monkeypatch.setattr(pipeline, "export_graph", reached)
    with pytest.raises(_ReachedTheExport):
        export_main(["--ckpt", str(out / "last.pth"), "--out", str(tmp_path / "m.onnx"), "--no-verify", "-q"])
    (size, sd), = handed
    assert size == (64, 64) and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert list(tmp_path.iterdir()) == []  # the staging folder went with the run


def test_nan_loss_stops_with_the_iteration_and_keeps_the_last_good_checkpoint(pascal_root, tmp_path, monkeypatch):
    from invpt.train.losses import MultiTaskLoss

    original = MultiTaskLoss.forward
    calls = {"n": 0}

    def poisoned(self, outputs, targets):
        out = original(self, outputs, targets)
        calls["n"] += 1
        if calls["n"] == 3:
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(MultiTaskLoss, "forward", poisoned)
    out = tmp_path / "n"
    with pytest.raises(TrainingDivergedError, match=r"iteration 3: the loss is not finite \(total nan\).*last good "
                       r"checkpoint is .*last\.pth.*--lr 5e-06"):
        train(_opts(pascal_root, out, max_iter=6, batch=2, lr=1e-5, checkpoint_every=2))
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["train_state"]["iteration"] == 2
    assert not (out / "ckpt_000004.pth").exists() and not (out / "final.pth").exists()
    assert [r["iteration"] for r in read_log(out / LOG_NAME)] == [1, 2]


def test_bf16_and_activation_checkpointing_train(pascal_root, tmp_path):
    """bf16 autocast with activation checkpointing: finite losses; with checkpointing alone (FP32) the losses equal
    the plain run's (recomputation replays the drop-path RNG)."""
    plain = train(_opts(pascal_root, tmp_path / "p", max_iter=2, batch=2, lr=1e-3))
    ckpt = train(_opts(pascal_root, tmp_path / "c", max_iter=2, batch=2, lr=1e-3, grad_checkpointing=True))
    assert _losses(ckpt.history) == pytest.approx(_losses(plain.history), rel=1e-5)
    both = train(_opts(pascal_root, tmp_path / "b", max_iter=2, batch=2, lr=1e-3, bf16=True, grad_checkpointing=True))
    assert all(math.isfinite(v) for v in _losses(both.history))
    assert _losses(both.history)[:1] != _losses(plain.history)[:1]  # bf16 really changed the arithmetic


def test_resumable_sampler_skips_consumed_indices_and_shards_like_one_process():
    one = ResumableSampler(10, 1, 0, seed=5)
    one.set_epoch(3)
    full = list(one)
    assert sorted(full) == list(range(10)) and full != list(range(10))
    one.set_start(4)
    assert list(one) == full[4:] and len(one) == 6
    ranks = [ResumableSampler(10, 2, r, seed=5) for r in range(2)]
    for s in ranks:
        s.set_epoch(3)
    assert [i for pair in zip(*map(list, ranks)) for i in pair] == full  # rank 0, rank 1, rank 0, ...
    one.set_epoch(4)
    assert one.start == 0 and list(one) != full


def test_backbone_weights_load_through_timm_filter(tmp_path):
    import timm
    from safetensors.torch import save_file

    model = invpt.build_model(MICRO)
    # An ImageNet-style checkpoint: another input size (pos_embed of 2x2 patches + cls), a classifier head.
    src = timm.create_model("vit_large_patch16_384", pretrained=False, img_size=32, patch_size=16, depth=3,
                            embed_dim=48, num_heads=2, num_classes=7)
    sd = src.state_dict()
    torch.save({"model": sd}, tmp_path / "vit.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "vit.safetensors"))
    for name in ("vit.pth", "vit.safetensors"):
        report = load_backbone_weights(model.backbone, tmp_path / name)
        got = model.backbone.state_dict()
        assert torch.equal(got["blocks.2.mlp.fc2.weight"], sd["blocks.2.mlp.fc2.weight"])
        assert got["pos_embed"].shape == (1, 17, 48)  # resampled from 1 + 2x2 to 1 + 4x4 tokens
        assert torch.equal(got["pos_embed"][:, 0], sd["pos_embed"][:, 0])  # the class token's embedding is kept
        assert "head.weight" in report["ignored"]
    wide = timm.create_model("vit_large_patch16_384", pretrained=False, img_size=64, patch_size=16, depth=3,
                             embed_dim=64, num_heads=2, num_classes=0)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    before = model.backbone.state_dict()["blocks.0.attn.qkv.weight"].clone()
    with pytest.raises(CheckpointError, match=r"do not fit the config's ViT.*another shape.*Nothing was loaded"):
        load_backbone_weights(model.backbone, tmp_path / "wide.pth")
    assert torch.equal(model.backbone.state_dict()["blocks.0.attn.qkv.weight"], before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_train_like_one(tmp_path):
    """torchrun, 2 CPU processes (Gloo) x batch 2 == 1 process x batch 4: the same images per global step (the
    DistributedSampler order) and gradients averaged by DDP, so the same losses and weights.

    Made comparable on purpose, and only for this: a per-process loss normalisation equal to the batch one needs
    every image to have the same number of valid pixels, so NYUD (images exactly the model size, no padding) with its
    normals and edge tasks (valid everywhere); no augmentation (random crops pad); drop-path off (each process draws
    its own masks); frozen BatchNorm statistics (PyTorch's SyncBatchNorm runs on CUDA only, and per-process batch
    statistics of 2 images differ from those of 4). Per-process batch 2 (the official per-GPU batch), not 1: PyTorch's
    CPU BatchNorm backward returns wrong input gradients for a batch of 1 when the incoming gradient is a
    channels-last view (as the decoder's query projections receive; see test_batch_of_one_gradients below).
    Measured: losses equal to ~1e-7 relative; 2 of 362k weights differ by more than 1e-5 after 4 Adam steps.
    """
    from invpt.data.synthetic import make_synthetic

    root = tmp_path / "data"
    make_synthetic("nyud_v2", root, n_train=8, n_val=2, size=(64, 64), seed=1)
    cfg_path = tmp_path / "nyud_micro.yaml"
    cfg_path.write_text(yaml.safe_dump(NYUD_MICRO))
    common = ["--config", str(cfg_path), "--data", str(root), "--max-iter", "4", "--lr", "1e-3", "--eval-every", "0",
              "--no-final-eval", "--checkpoint-every", "0", "--workers", "0", "--no-augment", "--freeze-bn-stats",
              "--progress", "none", "--tensorboard", "off", "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "invpt.train.cli", *common,
           "--out", str(tmp_path / "two"), "--batch", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from invpt.train.cli import build_parser, options_from_args

    one = train(options_from_args(build_parser().parse_args(common + ["--out", str(tmp_path / "one"), "--batch", "4"])))
    keys = ["total", "normals", "edge", "inter_normals", "inter_edge"]
    two = read_log(tmp_path / "two" / LOG_NAME)
    assert [r["iteration"] for r in two] == [1, 2, 3, 4] and [r["epoch"] for r in two] == [0, 0, 1, 1]
    assert _losses(two, keys) == pytest.approx(_losses(one.history, keys), rel=1e-5)
    a = torch.load(tmp_path / "one" / "last.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "two" / "last.pth", weights_only=True)["state_dict"]
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a if a[k].is_floating_point()])
    assert (diffs > 1e-5).float().mean().item() < 1e-3 and diffs.max().item() < 2e-3  # < 2 x lr: no drift
    state = torch.load(tmp_path / "two" / "last.pth", weights_only=True)["train_state"]
    assert state["world_size"] == 2 and state["global_batch"] == 4 and len(state["rng"]) == 2


def test_batch_of_one_gradients_equal_the_batch_gradient():
    """Per-sample independence of the training gradient (frozen BatchNorm statistics, no drop-path): the gradient
    of a batch of 2 is the mean of the two batch-of-1 gradients, in float64 to ~1e-13. Without the channels-last BN
    input in the decoder's query projections (invpt/layers/attention.py) PyTorch's CPU BatchNorm backward gives a
    relative error ~1 here, i.e. --batch 1 training on CPU computed wrong gradients."""
    from torch import nn

    torch.manual_seed(0)
    model = invpt.build_model(NYUD_MICRO).double().train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)

    def grads(batch):
        model.zero_grad()
        out = model(batch, return_intermediate=True)
        (out["normals"].pow(2).mean() + out["edge"].mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    both, first, second = grads(x), grads(x[:1]), grads(x[1:])
    worst = max(((both[n] - (first[n] + second[n]) / 2).abs().max() / both[n].abs().max()).item()
                for n in both if both[n].abs().max() > 1e-12)
    assert worst < 1e-9
