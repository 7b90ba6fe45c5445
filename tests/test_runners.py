"""invpt.runners (PyTorch and ONNX Runtime on one interface), comparison of runners, and runner timing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import invpt
from invpt.compare import FP32_TOLERANCE, compare_runners
from invpt.errors import ConfigError, DependencyError, ExportError, InputError, ManifestError
from invpt.latency import time_interleaved, time_runner
from invpt.manifest import manifest_path_for, sha256_file
from invpt.runners import OnnxRuntimeRunner, PyTorchRunner, from_manifest
from tests.helpers import copy_artifact

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def exported(pascal_dynamic_onnx):
    """The session's tiny PASCAL model exported with a dynamic batch (read-only: tests that edit it copy it)."""
    return pascal_dynamic_onnx


@pytest.fixture(scope="module")
def model(tiny_pascal_official_ckpt):
    return invpt.load_model(tiny_pascal_official_ckpt, fused_attn=False)


@pytest.fixture(scope="module")
def images(model):
    h, w = model.cfg.image_size
    return np.random.default_rng(0).standard_normal((3, 3, h, w), dtype=np.float32)


@pytest.fixture(scope="module")
def static2(pascal_dynamic_onnx, tmp_path_factory) -> Path:
    """The same graph with its input fixed to batch 2 (no manifest: the runner reads the shape from the session)."""
    import onnx

    proto = onnx.load(str(pascal_dynamic_onnx.onnx_path))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    path = tmp_path_factory.mktemp("static") / "b2.onnx"
    onnx.save(proto, str(path))
    return path


def _copy_artifact(exported, folder: Path) -> Path:
    return copy_artifact(exported.onnx_path, folder)


# ----------------------------------------------------------------------------------------------- agreement

def test_pytorch_and_onnxruntime_runners_agree(model, exported, images):
    specs = model.cfg.task_specs
    res = compare_runners(PyTorchRunner(model), from_manifest(exported.onnx_path), [images[:1], images], specs,
                          FP32_TOLERANCE, task_level=True)
    assert res.passed and res.samples == 4, res.markdown()
    assert res.reference == "pytorch-cpu-fp32" and res.backend == "onnxruntime-cpu-fp32"
    assert set(res.tasks) == set(model.cfg.tasks)
    for t in res.tasks.values():
        assert t.rel_err <= 1e-4 and t.max_abs > 0  # two real backends: rounding differs, so not bit-identical
    assert res.task_agreement["semseg"]["pixel_agreement"] > 0.999
    with pytest.raises(InputError, match="at least one input"):
        compare_runners(PyTorchRunner(model), from_manifest(exported.onnx_path), [], specs)


def test_run_batches_concatenates_per_task(model, exported, images):
    with from_manifest(exported.onnx_path) as ort:
        assert ort.static_batch is None
        one_by_one = ort.run_batches(images)  # dynamic: batch 1 by default
        in_twos = ort.run_batches(images, 2)
    assert set(one_by_one) == set(model.cfg.tasks)
    for spec in model.cfg.task_specs:
        assert one_by_one[spec.name].shape == (3, spec.channels, *model.cfg.image_size)
        np.testing.assert_allclose(in_twos[spec.name], one_by_one[spec.name], rtol=1e-4, atol=1e-5)
    torch_out = PyTorchRunner(model, ["normals"]).run_batches(images)  # activates for the call
    assert list(torch_out) == ["normals"]
    np.testing.assert_allclose(torch_out["normals"], one_by_one["normals"], rtol=1e-4, atol=1e-4)


def test_static_batch_model_pads_the_last_chunk(exported, static2, images):
    runner = OnnxRuntimeRunner(static2, tasks=["semseg", "normals"])
    with runner:
        assert runner.static_batch == 2 and runner.inputs[0].shape[0] == 2
        out = runner.run_batches(images)  # 2 + 1 (padded to 2)
        with pytest.raises(InputError, match="built for batch 2"):
            runner.run_batches(images, 1)
    ref = from_manifest(exported.onnx_path, tasks=["semseg", "normals"]).run_batches(images)
    assert list(out) == ["semseg", "normals"] and out["semseg"].shape[0] == 3
    for t in out:
        np.testing.assert_allclose(out[t], ref[t], rtol=1e-4, atol=1e-5)


def test_activation_is_scoped_and_the_session_released(exported, images):
    runner = from_manifest(exported.onnx_path)
    with pytest.raises(RuntimeError, match="not active"):
        runner.infer({"image": images[:1]})
    with runner as active:
        assert active is runner and runner.is_active and runner._session is not None
        with runner.activated():  # nested use keeps it active
            pass
        assert runner.is_active
        out = runner.infer({"image": images[:1]})
    assert not runner.is_active and runner._session is None
    assert set(out) == set(runner.tasks) and runner.precision == "fp32" and runner.device == "cpu"
    runner.deactivate()  # twice is fine


# ----------------------------------------------------------------------------------------------- input checks

BAD_FEEDS = {
    "wrong height": (lambda x: {"image": x[:, :, :-1]}, "dimension 2 must be"),
    "wrong dtype": (lambda x: {"image": x.astype(np.float64)}, "dtype float64"),
    "wrong rank": (lambda x: {"image": x[0]}, "3 dims"),
    "missing input": (lambda x: {"img": x}, "missing image"),
    "extra input": (lambda x: {"image": x, "mask": x}, "unexpected mask"),
    "empty batch": (lambda x: {"image": x[:0]}, "at least 1"),
    "not finite": (lambda x: {"image": np.where(np.arange(x.shape[-1]) == 3, np.nan, x).astype(np.float32)}, "NaN"),
    "not an array": (lambda x: {"image": x.tolist()}, "numpy array"),
}


@pytest.mark.parametrize("case", sorted(BAD_FEEDS))
@pytest.mark.parametrize("backend", ["pytorch", "onnxruntime"])
def test_bad_feed_is_refused_in_one_line(case, backend, model, exported, images):
    make, match = BAD_FEEDS[case]
    runner = PyTorchRunner(model) if backend == "pytorch" else from_manifest(exported.onnx_path)
    feed = make(images[:1].copy())
    before = {k: np.array(v, copy=True) for k, v in feed.items()}
    with runner:
        with pytest.raises(InputError, match=match) as err:
            runner.infer(feed)
    msg = str(err.value)
    assert "\n" not in msg and runner.name in msg
    for k, v in feed.items():  # the caller's arrays are not touched
        np.testing.assert_array_equal(np.asarray(v), before[k])


def test_run_batches_refuses_no_samples(exported):
    with pytest.raises(InputError, match="at least one sample"):
        from_manifest(exported.onnx_path).run_batches(np.zeros((0, 3, 128, 128), np.float32))


# ----------------------------------------------------------------------------------------------- manifest checks

def test_from_manifest_refuses_a_changed_file(exported, tmp_path):
    path = _copy_artifact(exported, tmp_path / "a")
    with open(path, "ab") as f:
        f.write(b"\0")
    sha = sha256_file(path)
    with pytest.raises(ManifestError, match="does not match its manifest"):
        from_manifest(path)
    assert sha256_file(path) == sha  # nothing was rewritten


def test_from_manifest_refuses_a_manifest_that_does_not_describe_the_graph(exported, tmp_path):
    path = _copy_artifact(exported, tmp_path / "b")
    man_file = manifest_path_for(path)
    d = json.loads(man_file.read_text())
    d["inputs"][0]["shape"] = ["batch", 3, 64, 64]
    man_file.write_text(json.dumps(d))
    runner = from_manifest(path)  # the sha256 still matches: the file is the one the manifest names
    with pytest.raises(ManifestError, match="its manifest records"):
        runner.activate()
    assert not runner.is_active


def test_from_manifest_refuses_an_engine_manifest(exported, tmp_path):
    path = _copy_artifact(exported, tmp_path / "c")
    man_file = manifest_path_for(path)
    d = json.loads(man_file.read_text())
    d["kind"] = "engine"
    man_file.write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="TensorRT runner"):
        from_manifest(path)


def test_from_manifest_refuses_unknown_tasks(exported):
    with pytest.raises(InputError, match="depth"):
        from_manifest(exported.onnx_path, tasks=["depth"])


# ----------------------------------------------------------------------------------------------- missing backend/device

def test_missing_or_broken_onnx_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        OnnxRuntimeRunner(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    runner = OnnxRuntimeRunner(bad)
    with pytest.raises(InputError, match="cannot load"):
        runner.activate()
    assert not runner.is_active
    with pytest.raises(ExportError, match="cannot load"):
        OnnxRuntimeRunner(bad, error_cls=ExportError).activate()
    assert bad.read_bytes() == b"not an onnx model"


def test_unavailable_execution_provider_is_refused(exported):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(InputError, match="'cuda' is not available") as err:
        OnnxRuntimeRunner(exported.onnx_path, providers=("cuda",))
    assert "\n" not in str(err.value) and "CPUExecutionProvider" in str(err.value)
    with pytest.raises(InputError, match="no execution provider"):
        OnnxRuntimeRunner(exported.onnx_path, providers=())
    with pytest.raises(InputError, match="threads"):
        OnnxRuntimeRunner(exported.onnx_path, threads=0)
    assert OnnxRuntimeRunner(exported.onnx_path, providers="CPUExecutionProvider", threads=1).device == "cpu"


def test_unavailable_torch_device_and_cpu_autocast_are_refused(model):
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            PyTorchRunner(model, device="cuda")
    with pytest.raises(InputError, match="not a device name"):
        PyTorchRunner(model, device="gpu0")
    with pytest.raises(InputError, match="CUDA only"):
        PyTorchRunner(model, autocast="fp16")
    with pytest.raises(ConfigError, match="depth"):
        PyTorchRunner(model, tasks=["depth"])
    with pytest.raises(InputError, match="InvPT model"):
        PyTorchRunner(torch.nn.Identity())


def test_missing_onnxruntime_is_a_dependency_error(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(DependencyError, match=r"invpt\[export\]") as err:
        OnnxRuntimeRunner(exported.onnx_path)
    assert "\n" not in str(err.value)


def test_core_modules_import_no_backend():
    code = ("import sys, invpt.runners, invpt.compare, invpt.latency, invpt.export.parity; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------- timing

def test_time_runner(exported, images):
    runner = from_manifest(exported.onnx_path, tasks=["semseg"])
    seen = []
    stats = time_runner(runner, {"image": images[:2]}, warmup=2, iters=5,
                        on_iteration=lambda name, phase, i, dt: seen.append((phase, i)))
    assert not runner.is_active  # activated for the call only
    assert stats.n == 5 and len(stats.warmup_s) == 2 and stats.batch == 2
    assert seen == [("warmup", 0), ("warmup", 1)] + [("timed", i) for i in range(5)]
    assert 0 < stats.min <= stats.p50 <= stats.p99 <= stats.max
    assert stats.throughput == pytest.approx(2 / stats.mean)
    with pytest.raises(InputError, match="dtype float64"):  # the feed is checked before any timing
        time_runner(runner, {"image": images[:1].astype(np.float64)}, warmup=0, iters=1)
    with pytest.raises(InputError, match="iters"):
        time_runner(runner, {"image": images[:1]}, warmup=0, iters=0)


def test_time_interleaved_alternates_runners(model, exported, images):
    runners = [PyTorchRunner(model, ["edge"]), from_manifest(exported.onnx_path, tasks=["edge"])]
    order = []
    stats = time_interleaved(runners, {"image": images[:1]}, warmup=1, iters=3,
                             on_iteration=lambda name, phase, i, dt: order.append(name))
    names = [r.name for r in runners]
    assert set(stats) == set(names) and all(s.n == 3 and len(s.warmup_s) == 1 for s in stats.values())
    assert order == names * 4  # A, B, A, B, ... (warm-up round, then 3 timed rounds)
    assert not any(r.is_active for r in runners)
    with pytest.raises(InputError, match="distinct names"):
        time_interleaved([runners[1], runners[1]], {"image": images[:1]}, warmup=0, iters=1)


# ----------------------------------------------------------------------------------------------- calib on the runners

def test_calib_reference_label_says_the_onnx_was_not_verified(exported, tmp_path):
    """Without its checkpoint, invpt-quantize compares against the FP32 ONNX; one exported with --no-verify is
    recorded as such, never as 'verified against PyTorch'."""
    from invpt.calib import run_quantize
    from invpt.calib.evaluate import REFERENCE_ONNX_UNVERIFIED
    from invpt.manifest import Manifest

    path = _copy_artifact(exported, tmp_path / "q")
    man_file = manifest_path_for(path)
    d = json.loads(man_file.read_text())
    d["parent"]["sha256"] = "0" * 64  # the recorded checkpoint no longer matches: the FP32 ONNX is the reference
    d["verification"] = None  # what --no-verify records
    man_file.write_text(json.dumps(d))
    before = {p.name: sha256_file(p) for p in path.parent.iterdir()}
    res = run_quantize(path, "fp16", tmp_path / "q16" / "m.fp16.onnx", holdout_samples=1)
    assert res.parity.passed and res.parity.reference == REFERENCE_ONNX_UNVERIFIED
    assert res.parity.backend == "onnxruntime-cpu-fp16"
    rec = Manifest.load(res.manifest_path).verification
    assert rec["reference"] == REFERENCE_ONNX_UNVERIFIED and set(rec["task_agreement"]) == set(exported.manifest.tasks)
    assert {p.name: sha256_file(p) for p in path.parent.iterdir()} == before  # the input folder is untouched
