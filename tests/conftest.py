"""Shared fixtures: tiny models with non-trivial BatchNorm statistics, their checkpoints, and the artifacts made from
them once per test run (exported, FP16 and INT8 ONNX files, calibration images), shared read-only."""
from __future__ import annotations

import fcntl
import os
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, TypeVar

import pytest
import torch

from tests.helpers import artifact_files, photo_crops
from tests.helpers import copy_artifact as copy_artifact_to

os.environ.setdefault("OMP_NUM_THREADS", "1")  # scripts/test.sh runs one worker per core
REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")
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


# ---- files made once per test run and shared read-only -------------------------------------------------------------
# Exporting or quantizing even the tiny models costs seconds of CPU each, so the checkpoints and artifacts below are
# made once and every test that only reads them uses them. A test that edits an artifact, or writes beside it, works
# on a copy (``copy_artifact``). Each fixture checks at the end of the session that its files still have their bytes,
# so a test that writes into a shared file fails loudly instead of corrupting later tests.


def _once(tmp_path_factory, name: str, build: Callable[[Path], T]) -> T:
    """``build(folder)``, run once per test run.

    Without pytest-xdist that is once per session. Under xdist every worker runs the session fixtures: the first to
    get here builds into a folder of the run's base temp dir (shared by its workers, never by another run), the others
    wait on a file lock and load the pickled result, so the suite pays for each artifact once, not once per worker.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent / "shared"  # the run's base temp dir, above popen-gw<N>
    shared.mkdir(exist_ok=True)
    with open(shared / f".{name}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a worker dies
        done = shared / f"{name}.pickle"
        if done.is_file():
            return pickle.loads(done.read_bytes())
        folder = shared / name
        shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed half-way left
        folder.mkdir()
        result = build(folder)
        tmp = done.with_name(done.name + ".tmp")
        tmp.write_bytes(pickle.dumps(result))
        os.replace(tmp, done)
        return result


@contextmanager
def _kept_read_only(*paths: Path, what: str):
    from invpt.manifest import sha256_file

    files = [f for p in paths for f in (artifact_files(p) if p.is_file() else sorted(q for q in p.rglob("*")
                                                                                       if q.is_file()))]
    before = {f: sha256_file(f) for f in files}
    yield
    changed = [str(f) for f in files if not f.is_file() or sha256_file(f) != before[f]]
    assert not changed, f"a test changed the shared {what} (copy it first, e.g. with copy_artifact): {changed}"


@pytest.fixture(scope="session")
def tiny_pascal_official_ckpt(tiny_pascal, tmp_path_factory) -> Path:
    from invpt.checkpoint import save_official_checkpoint

    path = _once(tmp_path_factory, "ckpt_pascal",
                 lambda d: save_official_checkpoint(tiny_pascal, d / "tiny_pascal_official.pth.tar"))
    with _kept_read_only(path, what="checkpoint"):
        yield path


@pytest.fixture(scope="session")
def tiny_nyud_official_ckpt(tiny_nyud, tmp_path_factory) -> Path:
    from invpt.checkpoint import save_official_checkpoint

    path = _once(tmp_path_factory, "ckpt_nyud",
                 lambda d: save_official_checkpoint(tiny_nyud, d / "tiny_nyud_official.pth.tar"))
    with _kept_read_only(path, what="checkpoint"):
        yield path


@pytest.fixture(scope="session")
def calib_images(tmp_path_factory) -> Path:
    """12 photo crops (120x120, smaller than the tiny models: 'pad' applies as is) in two strata a/ and b/."""
    root = _once(tmp_path_factory, "calib_images", photo_crops)
    with _kept_read_only(root, what="calibration images"):
        yield root


@pytest.fixture(scope="session")
def pascal_onnx(tiny_pascal_official_ckpt, tmp_path_factory):
    """tiny PASCAL exported once: m.onnx + m.json, static batch 1, verified against PyTorch (an ExportResult)."""
    from invpt.export import run_export

    res = _once(tmp_path_factory, "pascal", lambda d: run_export(tiny_pascal_official_ckpt, d / "m.onnx"))
    with _kept_read_only(res.onnx_path, what="FP32 ONNX"):
        yield res


@pytest.fixture(scope="session")
def pascal_fp16(pascal_onnx, calib_images, tmp_path_factory):
    """m.fp16.onnx beside m.onnx, made and verified by invpt-quantize (a QuantizeResult)."""
    from invpt.calib import run_quantize

    res = _once(tmp_path_factory, "pascal_fp16", lambda d: run_quantize(
        pascal_onnx.onnx_path, "fp16", calib_data=calib_images, holdout_samples=2, cache_dir=d / "cache"))
    with _kept_read_only(res.onnx_path, what="FP16 ONNX"):
        yield res


@pytest.fixture(scope="session")
def pascal_int8(pascal_onnx, calib_images, tmp_path_factory):
    """m.int8.onnx beside m.onnx: the default policy and calibrator (entropy) on 4 images, 2 held out."""
    from invpt.calib import run_quantize

    res = _once(tmp_path_factory, "pascal_int8", lambda d: run_quantize(
        pascal_onnx.onnx_path, "int8", calib_data=calib_images, calib_samples=4, holdout_samples=2,
        cache_dir=d / "cache"))
    with _kept_read_only(res.onnx_path, what="INT8 ONNX"):
        yield res


@pytest.fixture(scope="session")
def pascal_dynamic_onnx(tiny_pascal_official_ckpt, tmp_path_factory):
    """tiny PASCAL with a dynamic batch, verified at batch 1 and 3 (an ExportResult)."""
    from invpt.export import run_export

    res = _once(tmp_path_factory, "pascal_dyn",
                lambda d: run_export(tiny_pascal_official_ckpt, d / "pascal.onnx", dynamic_batch=True))
    with _kept_read_only(res.onnx_path, what="dynamic-batch ONNX"):
        yield res


@pytest.fixture(scope="session")
def nyud_b2_onnx(tiny_nyud_official_ckpt, tmp_path_factory):
    """tiny NYUD at a static batch of 2, through onnxslim (--simplify), verified (an ExportResult)."""
    from invpt.export import run_export

    res = _once(tmp_path_factory, "nyud_b2",
                lambda d: run_export(tiny_nyud_official_ckpt, d / "nyud.onnx", batch=2, simplify=True))
    with _kept_read_only(res.onnx_path, what="batch-2 NYUD ONNX"):
        yield res


@pytest.fixture(scope="session")
def tiny_deploy(tiny_pascal_official_ckpt, tmp_path_factory) -> dict:
    """One ``invpt-deploy`` run on the tiny checkpoint (FP32 + FP16 ONNX, TensorRT-RTX engines built on CPU, parity
    and latency reports) in <folder>/deploy, the checkpoint beside it as <folder>/tiny.pth: a dict of their paths and
    the exit code. Shared read-only; a test that reruns or edits it works on a copy of the whole folder."""
    from invpt.runtime.deploy_cli import main

    def build(d: Path) -> dict:
        shutil.copy(tiny_pascal_official_ckpt, d / "tiny.pth")
        out = d / "deploy"
        code = main(["--ckpt", str(d / "tiny.pth"), "--precision", "fp32,fp16", "--data", str(REPO / "assets"),
                     "--samples", "2", "--iters", "3", "--warmup", "1", "--batch", "1,2", "--out", str(out), "-q"])
        return {"code": code, "out": out, "ckpt": d / "tiny.pth", "fp32": out / "tiny.onnx",
                "fp16": out / "tiny.fp16.onnx", "plan": out / "tiny.plan", "plan16": out / "tiny.fp16.plan"}

    res = _once(tmp_path_factory, "deploy", build)
    with _kept_read_only(res["ckpt"].parent, what="invpt-deploy folder"):
        yield res


@pytest.fixture
def copy_artifact(tmp_path):
    """``copy_artifact(artifact, sub="in", with_manifest=True)``: a private copy under tmp_path/sub (manifest and
    external data included) for a test that edits the artifact or writes beside it."""

    def _copy(artifact: Path, sub: str = "in", with_manifest: bool = True) -> Path:
        return copy_artifact_to(artifact, tmp_path / sub, with_manifest)

    return _copy


@pytest.fixture()
def no_load(monkeypatch):
    """Fail the test if a checkpoint is loaded (or a model built): a command's checks of its inputs and outputs must
    all come before that."""
    import invpt

    def _fail(*a, **k):
        raise AssertionError("the model was loaded before the command's input and output checks finished")

    monkeypatch.setattr(invpt, "load_model", _fail)
    monkeypatch.setattr(invpt, "build_model", _fail)
