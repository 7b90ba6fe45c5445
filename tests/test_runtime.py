"""invpt.runtime: runners from artifacts, invpt-parity, invpt-bench and invpt-deploy on the tiny model.

One invpt-deploy run (FP32 + FP16 ONNX, TensorRT-RTX engines built on CPU) is made once per test run (tests/conftest.py:
tiny_deploy) and every other test uses its artifacts. Engines cannot run without a CUDA GPU: the tests that run them skip
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from invpt.manifest import manifest_path_for, sha256_file

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"


def _snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (files or folders)."""
    out = {}
    for r in roots:
        files = [r] if r.is_file() else sorted(p for p in r.rglob("*") if p.is_file())
        out.update({str(p): sha256_file(p) for p in files})
    return out


# ---- the module's one deploy run -----------------------------------------------------------------------------
@pytest.fixture
def deployed(tiny_deploy) -> dict:
    """The session's one invpt-deploy run (tests/conftest.py: tiny_deploy), shared read-only."""
    return tiny_deploy


def _copy_of_the_run(deployed: dict, tmp_path: Path) -> dict:
    """The run's folder (checkpoint and deploy output, same layout) copied under tmp_path, for a test that reruns
    invpt-deploy on it (a rerun rewrites the reports): the shared run stays as it was."""
    work = tmp_path / "work"
    shutil.copytree(deployed["ckpt"].parent, work)
    return {**deployed, **{k: work / Path(deployed[k]).relative_to(deployed["ckpt"].parent)
                           for k in ("ckpt", "out", "fp32", "fp16", "plan", "plan16")}}


def _no_gpu_reason(plan: Path):
    """Why the engine ``plan`` cannot run here (its backend module, a CUDA GPU), or None."""
    from invpt.manifest import load_manifest_for
    from invpt.runtime.tensorrt_runner import tensorrt_unavailable_reason

    return tensorrt_unavailable_reason(load_manifest_for(plan))


# ---- invpt-deploy ----------------------------------------------------------------------------------------------
def test_deploy_writes_every_artifact_and_report(deployed):
    assert deployed["code"] == 0
    out = deployed["out"]
    for p in ("fp32", "fp16", "plan", "plan16"):
        assert deployed[p].is_file() and manifest_path_for(deployed[p]).is_file(), p
        man = json.loads(manifest_path_for(deployed[p]).read_text())
        assert man["sha256"] == sha256_file(deployed[p])
    assert json.loads(manifest_path_for(deployed["plan16"]).read_text())["build"]["backend"] in ("tensorrt",
                                                                                                   "tensorrt_rtx")
    summary = (out / "summary.md").read_text()
    page = (out / "index.html").read_text()
    assert "## Parity" in summary and "## Latency" in summary
    assert 'src="bench/bench.png"' in page and 'src="parity/visuals/tiny.fp16.onnx__semseg.png"' in page
    parity = json.loads((out / "parity" / "parity.json").read_text())
    status = {c["label"]: c["status"] for c in parity["candidates"]}
    assert status["tiny.onnx"] == "passed" and status["tiny.fp16.onnx"] == "passed"
    if _no_gpu_reason(deployed["plan16"]):  # engines were built, but their parity needs a GPU: the report says so
        assert status["tiny.plan"] == status["tiny.fp16.plan"] == "not run"
        assert "GPU" in next(c["reason"] for c in parity["candidates"] if c["label"] == "tiny.plan")
        assert "not run" in summary.lower() or "NOT RUN" in summary
    bench = json.loads((out / "bench" / "bench.json").read_text())
    assert {r["runner"] for r in bench["results"]} >= {"pytorch-cpu-fp32", "tiny.onnx", "tiny.fp16.onnx"}
    assert any(c["command"].startswith(("trtexec ", "tensorrt_rtx ")) and "--loadEngine=" in c["command"]
               for c in bench["commands"])
    assert not [p.name for p in out.iterdir() if ".staging." in p.name]


def test_deploy_rerun_reuses_the_verified_artifacts(deployed, tmp_path):
    from invpt.runtime.deploy import run_deploy

    copied = _copy_of_the_run(deployed, tmp_path)
    before = _snapshot(*(copied[k] for k in ("fp32", "fp16", "plan", "plan16")))
    res = run_deploy(copied["ckpt"], copied["out"], precisions=["fp32", "fp16"], samples=1, iters=2, warmup=0)
    stages = {s["stage"]: s["reused"] for s in res.steps}
    assert stages == {"export": True, "quantize-fp16": True, "engine-fp32": True, "engine-fp16": True,
                      "parity": False, "bench": False}
    assert _snapshot(*(copied[k] for k in ("fp32", "fp16", "plan", "plan16"))) == before


def test_deploy_never_overwrites_an_artifact_it_cannot_verify(deployed, tmp_path):
    from invpt.runtime.deploy_cli import main

    out = tmp_path / "d"
    out.mkdir()
    shutil.copy(deployed["fp32"], out / "tiny.onnx")
    shutil.copy(manifest_path_for(deployed["fp32"]), out / "tiny.json")
    with open(out / "tiny.onnx", "ab") as f:  # the file no longer matches its manifest
        f.write(b"\0")
    before = _snapshot(out, deployed["ckpt"])
    assert main(["--ckpt", str(deployed["ckpt"]), "--out", str(out), "--precision", "fp32", "--no-engines"]) == 2
    assert _snapshot(out, deployed["ckpt"]) == before
    assert sorted(p.name for p in out.iterdir()) == ["tiny.json", "tiny.onnx"]


@pytest.mark.parametrize("case", ["out-is-file", "int8-without-calib", "missing-data"])
def test_deploy_bad_inputs_exit_2_before_any_work(deployed, tmp_path, case, capsys):
    from invpt.runtime.deploy_cli import main

    args = ["--ckpt", str(deployed["ckpt"]), "--out", str(tmp_path / "o")]
    if case == "out-is-file":
        (tmp_path / "o").write_text("mine")
    elif case == "int8-without-calib":
        args += ["--precision", "fp32,int8"]
    else:
        args += ["--data", str(tmp_path / "nope")]
    before = _snapshot(tmp_path, deployed["ckpt"])
    assert main(args) == 2
    assert _snapshot(tmp_path, deployed["ckpt"]) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == (["o"] if case == "out-is-file" else [])
    err = capsys.readouterr().err
    assert {"out-is-file": "not a folder", "int8-without-calib": "--calib-data", "missing-data": "does not exist"}[case] in err


def test_parity_with_no_candidate_that_can_run_here_is_not_a_pass(deployed, tmp_path, capsys):
    """P30: an engine alone on a machine that cannot load it: the report said 'Overall: FAIL' and the exit code was 0,
    which a script reads as verified. Now: NOT RUN in the report, exit 2 with the reason."""
    from invpt.runtime.parity_cli import main

    reason = _no_gpu_reason(deployed["plan16"])
    if reason is None:
        pytest.skip("the engine can run on this machine")
    out = tmp_path / "rep"
    assert main(["--ckpt", str(deployed["ckpt"]), "--model", str(deployed["plan16"]), "--samples", "1",
                 "--out", str(out)]) == 2
    assert "No candidate could run on this machine, so nothing was verified" in capsys.readouterr().err
    md = (out / "parity.md").read_text()
    assert "**Overall: NOT RUN**" in md and "FAIL" not in md.split("\n\n")[2]
    assert json.loads((out / "parity.json").read_text())["passed"] is False


# ---- runners ---------------------------------------------------------------------------------------------------
def test_onnxruntime_runners_from_artifacts_match_pytorch(deployed):
    from invpt.compare import compare_runners, tolerance_for
    from invpt.runtime import load_artifact, load_runner, reference_runner

    ref = reference_runner(deployed["ckpt"])
    feeds = [np.random.default_rng(3).standard_normal((2, 3, 128, 128), dtype=np.float32)]
    specs = ref.model.cfg.task_specs
    for key, precision in (("fp32", "fp32"), ("fp16", "fp16")):
        art = load_artifact(deployed[key])
        runner = load_runner(art)
        assert (runner.backend, runner.device, runner.precision) == ("onnxruntime", "cpu", precision)
        res = compare_runners(ref, runner, feeds, specs, tolerance_for(precision))
        assert res.passed, res.summary()
        assert res.tasks["semseg"].max_abs > 0  # really two backends
    with load_runner(load_artifact(deployed["fp32"]), spinning=False) as quiet:  # what invpt-bench times
        opts = quiet._session.get_session_options()
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert quiet.run_batches(feeds[0])["semseg"].shape == (2, 21, 128, 128)
    with load_runner(load_artifact(deployed["fp32"])) as r:  # inputs are checked against the manifest
        from invpt.errors import InputError

        with pytest.raises(InputError, match="dimension 2 must be 128"):
            r.infer({"image": np.zeros((1, 3, 64, 128), np.float32)})


def test_engine_artifact_says_in_one_line_why_it_cannot_run(deployed):
    reason = _no_gpu_reason(deployed["plan16"])
    if not reason:
        pytest.skip("a CUDA GPU is present: the engine can run here")
    from invpt.errors import InputError
    from invpt.runtime import TensorRTRunner, load_artifact, load_runner

    art = load_artifact(deployed["plan16"])
    assert art.unavailable and "\n" not in art.unavailable
    with pytest.raises(InputError, match="cannot run here"):
        load_runner(art)
    with pytest.raises(InputError, match="TensorRT runner"):
        TensorRTRunner(art.path, art.manifest)


def test_tensorrt_runner_matches_pytorch(deployed):
    reason = _no_gpu_reason(deployed["plan16"])
    if reason:
        pytest.skip(f"TensorRT runner: {reason}")
    from invpt.compare import compare_runners, tolerance_for
    from invpt.runtime import load_artifact, load_runner, reference_runner

    art = load_artifact(deployed["plan16"])
    if art.unavailable:
        pytest.skip(f"TensorRT runner: {art.unavailable}")
    ref = reference_runner(deployed["ckpt"])
    feeds = [np.random.default_rng(4).standard_normal((1, 3, 128, 128), dtype=np.float32)]
    for graph in (False, True):
        res = compare_runners(ref, load_runner(art, cuda_graph=graph), feeds, ref.model.cfg.task_specs,
                              tolerance_for("fp16"))
        assert res.passed, res.summary()


def test_pytorch_cuda_runner_matches_cpu(deployed):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("PyTorch CUDA runner: no CUDA GPU visible to torch")
    from invpt.compare import compare_runners, tolerance_for
    from invpt.runtime import reference_runner

    ref = reference_runner(deployed["ckpt"])
    gpu = reference_runner(deployed["ckpt"], device="cuda", autocast="fp16", name="cuda-fp16")
    feeds = [np.random.default_rng(5).standard_normal((1, 3, 128, 128), dtype=np.float32)]
    assert compare_runners(ref, gpu, feeds, ref.model.cfg.task_specs, tolerance_for("fp16")).passed


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_onnxruntime_gpu_providers(deployed, provider):
    import onnxruntime as ort

    from invpt.runners import PROVIDER_ALIASES

    if PROVIDER_ALIASES[provider] not in ort.get_available_providers():
        pytest.skip(f"ONNX Runtime {ort.__version__} has no {PROVIDER_ALIASES[provider]} (install onnxruntime-gpu)")
    from invpt.compare import compare_runners, tolerance_for
    from invpt.runtime import load_artifact, load_runner, reference_runner

    ref = reference_runner(deployed["ckpt"])
    runner = load_runner(load_artifact(deployed["fp32"]), providers=(provider,))
    feeds = [np.random.default_rng(6).standard_normal((1, 3, 128, 128), dtype=np.float32)]
    assert compare_runners(ref, runner, feeds, ref.model.cfg.task_specs, tolerance_for("fp16")).passed


# ---- invpt-parity ------------------------------------------------------------------------------------------------
def test_parity_cli_writes_the_documented_report(deployed, tmp_path):
    from invpt.runtime.parity_cli import main

    out = tmp_path / "rep"
    inputs = _snapshot(deployed["fp32"], deployed["fp16"], deployed["ckpt"])
    code = main(["--ckpt", str(deployed["ckpt"]), "--model", str(deployed["fp32"]), "--model", str(deployed["fp16"]),
                 "--data", str(ASSETS), "--samples", "2", "--visual-samples", "1", "--out", str(out), "-q"])
    assert code == 0
    assert _snapshot(deployed["fp32"], deployed["fp16"], deployed["ckpt"]) == inputs
    rep = json.loads((out / "parity.json").read_text())
    assert {"schema", "version", "created", "passed", "reference", "inputs", "tolerances", "candidates",
            "ground_truth"} <= set(rep)
    assert rep["schema"] == "invpt.parity" and rep["passed"] is True and rep["inputs"]["samples"] == 2
    assert rep["reference"]["sha256"] == sha256_file(deployed["ckpt"])
    for cand in rep["candidates"]:
        assert {"artifact", "label", "kind", "precision", "runner", "status", "reason", "comparison",
                "visuals"} <= set(cand)
        tasks = cand["comparison"]["tasks"]
        assert set(tasks) == {"semseg", "human_parts", "sal", "normals", "edge"}
        for t in tasks.values():
            assert {"max_abs", "mean_abs", "p99_abs", "rel_err", "cosine", "agreement", "passed"} <= set(t)
        agree = cand["comparison"]["task_agreement"]
        assert set(agree["semseg"]) == {"pixel_agreement", "miou_vs_reference"} and "mean_angle_deg" in agree["normals"]
        assert cand["comparison"]["tolerance"] == rep["tolerances"][cand["precision"]]
        assert len(cand["visuals"]) == 5 and all((out / v).is_file() for v in cand["visuals"])
    import cv2

    png = cv2.imread(str(out / rep["candidates"][0]["visuals"][0]))
    assert png.shape[1] > 4 * 128  # input, PyTorch, candidate and heatmap side by side
    md = (out / "parity.md").read_text()
    assert "| semseg | PASS |" in md and "![" in md


class _Perturbed:
    """Wraps a runner and perturbs its outputs in ways whose metrics are known in closed form."""

    def __init__(self, inner, angle_deg: float = 10.0, depth_shift: float = 0.5):
        self.inner, self.angle, self.shift = inner, math.radians(angle_deg), depth_shift
        self.name, self.backend, self.device, self.precision = "perturbed", "test", "cpu", "fp32"

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def activated(self):
        return self.inner.activated()

    def run_batches(self, x, batch=None):
        out = self.inner.run_batches(x, batch)
        sem = out["semseg"].copy()  # one pixel's label flipped
        c = int(sem[0, :, 0, 0].argmax())
        sem[0, (c + 1) % sem.shape[1], 0, 0] = sem[0, c, 0, 0] + 10.0
        out["semseg"] = sem
        n = out["normals"].astype(np.float64)  # every normal turned by exactly `angle` (in the plane of n and u)
        v = n / np.linalg.norm(n, axis=1, keepdims=True)
        u = np.cross(v, np.array([1.0, 0.0, 0.0])[None, :, None, None], axis=1)
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        out["normals"] = (math.cos(self.angle) * v + math.sin(self.angle) * u).astype(np.float32)
        out["depth"] = np.maximum(out["depth"], 0) + self.shift  # decoded depth differs by exactly `shift`
        return out


def test_parity_report_metrics_on_constructed_differences(tiny_nyud_official_ckpt, tmp_path, monkeypatch):
    import invpt.runtime.load as load
    from invpt.manifest import Manifest, Preprocessing, io_for_config
    from invpt.runtime.parity import run_parity

    ref = load.reference_runner(tiny_nyud_official_ckpt)
    cfg = ref.model.cfg
    ins, outs = io_for_config(cfg, "batch")
    man = Manifest("fake.onnx", "onnx", "fp32", cfg.to_dict(), ins, outs, Preprocessing(tuple(cfg.image_size)))
    art = load.Artifact(tmp_path / "fake.onnx", man, "fake")
    monkeypatch.setattr(load, "load_runner", lambda a, **k: _Perturbed(load.reference_runner(tiny_nyud_official_ckpt)))
    rep = run_parity(tiny_nyud_official_ckpt, [], tmp_path / "rep", artifacts=[art], reference=ref, samples=1,
                     visual_samples=0)
    cand = rep.data["candidates"][0]
    agree = cand["comparison"]["task_agreement"]
    h, w = cfg.image_size
    assert agree["semseg"]["pixel_agreement"] == pytest.approx(1 - 1 / (h * w), abs=1e-12)
    assert agree["normals"]["mean_angle_deg"] == pytest.approx(10.0, abs=1e-3)
    assert agree["depth"]["rmse_m"] == pytest.approx(0.5, abs=1e-6)
    assert agree["edge"]["pixel_agreement"] == 1.0  # untouched task: identical
    assert cand["comparison"]["tasks"]["edge"]["max_abs"] == 0.0 and cand["comparison"]["tasks"]["edge"]["passed"]
    assert cand["status"] == "failed" and not rep.passed
    assert "normals" in cand["reason"] and "depth" in cand["reason"]
    assert json.loads(rep.json_path.read_text())["candidates"][0]["status"] == "failed"


def test_parity_failure_is_exit_3(deployed, tmp_path, monkeypatch):
    import invpt.runtime.load as load
    from invpt.runtime.parity_cli import main

    monkeypatch.setattr(load, "load_runner", lambda a, **k: _Perturbed(load.reference_runner(deployed["ckpt"])))
    # the pascal model has no depth: perturb only what it has
    monkeypatch.setattr(_Perturbed, "run_batches", lambda self, x, batch=None: {
        k: (v + 1.0 if k == "sal" else v) for k, v in self.inner.run_batches(x, batch).items()})
    code = main(["--ckpt", str(deployed["ckpt"]), "--model", str(deployed["fp32"]), "--samples", "1",
                 "--visual-samples", "0", "--out", str(tmp_path / "rep"), "-q"])
    assert code == 3
    rep = json.loads((tmp_path / "rep" / "parity.json").read_text())
    assert rep["passed"] is False and "sal" in rep["candidates"][0]["reason"]


def _copy_artifact(src: Path, dst_dir: Path, with_manifest: bool = True) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst_dir / src.name)
    if with_manifest:
        shutil.copy(manifest_path_for(src), manifest_path_for(dst_dir / src.name))
    return dst_dir / src.name


@pytest.mark.parametrize("case", ["no-manifest", "sha256-mismatch", "output-name", "output-shape", "out-is-file"])
def test_parity_bad_inputs_exit_2_and_write_nothing(deployed, tmp_path, case, capsys):
    from invpt.runtime.parity_cli import main

    model = _copy_artifact(deployed["fp32"], tmp_path / "in", with_manifest=case != "no-manifest")
    out = tmp_path / "rep"
    if case == "sha256-mismatch":
        with open(model, "ab") as f:
            f.write(b"\0")
    elif case in ("output-name", "output-shape"):
        m = json.loads(manifest_path_for(model).read_text())
        if case == "output-name":
            m["outputs"][0]["name"] = m["outputs"][0]["task"] = "segmentation"
        else:
            m["outputs"][0]["shape"][1] = 40
        manifest_path_for(model).write_text(json.dumps(m))
    elif case == "out-is-file":
        out.write_text("mine")
    before = _snapshot(tmp_path, deployed["ckpt"])
    assert main(["--ckpt", str(deployed["ckpt"]), "--model", str(model), "--out", str(out)]) == 2
    assert _snapshot(tmp_path, deployed["ckpt"]) == before
    assert out.exists() == (case == "out-is-file")
    err = capsys.readouterr().err
    assert {"no-manifest": "does not exist", "sha256-mismatch": "does not match its manifest",
            "output-name": "'segmentation'", "output-shape": "instead of [batch, 21, 128, 128]",
            "out-is-file": "not a folder"}[case] in err
    assert "Traceback" not in err


# ---- invpt-bench ---------------------------------------------------------------------------------------------------
def test_bench_cli_writes_stats_that_match_numpy(deployed, tmp_path, capsys):
    from invpt.runtime.bench_cli import main

    out = tmp_path / "b"
    code = main(["--model", str(deployed["fp32"]), "--model", str(deployed["fp16"]), "--model", str(deployed["plan16"]),
                 "--ckpt", str(deployed["ckpt"]), "--batch", "1,2", "--iters", "4", "--warmup", "1",
                 "--out", str(out), "-q"])
    assert code == 0
    rep = json.loads((out / "bench.json").read_text())
    assert {"schema", "version", "created", "machine", "settings", "results", "not_run", "commands",
            "peak_rss_bytes"} <= set(rep)
    assert rep["schema"] == "invpt.bench" and rep["settings"]["batches"] == [1, 2]
    runners = {(r["runner"], r["batch"]) for r in rep["results"]}
    assert {("pytorch-cpu-fp32", 1), ("tiny.onnx", 2), ("tiny.fp16.onnx", 1)} <= runners
    for r in rep["results"]:
        st, t = r["stats"], np.asarray(r["stats"]["times_s"])
        assert len(t) == 4 and len(st["warmup_s"]) == 1
        for q in (50, 90, 95, 99):
            assert st[f"p{q}_ms"] == pytest.approx(np.percentile(t, q) * 1e3, rel=1e-12)
        assert st["mean_ms"] == pytest.approx(t.mean() * 1e3) and st["max_ms"] == pytest.approx(t.max() * 1e3)
        assert st["throughput_ips"] == pytest.approx(r["batch"] / t.mean())
    cmds = [c["command"] for c in rep["commands"]]
    assert len(cmds) == 2 and all(f"--loadEngine={deployed['plan16']}" in c for c in cmds)
    assert "--shapes=image:2x3x128x128" in cmds[1]
    assert capsys.readouterr().out.strip().splitlines() == cmds  # printed for the user
    if _no_gpu_reason(deployed["plan16"]):
        assert rep["not_run"] and rep["not_run"][0]["artifact"] == str(deployed["plan16"])
    assert (out / "bench.md").read_text().count("| `") >= 6 and (out / "bench.png").stat().st_size > 1000


def test_bench_batch_outside_the_engine_profile_is_refused(deployed, tmp_path, capsys):
    from invpt.runtime.bench_cli import main

    out = tmp_path / "b"
    assert main(["--model", str(deployed["plan16"]), "--batch", "1,4", "--out", str(out)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert "--batch 4 is outside the optimisation profile" in err and "invpt-trt-build" in err


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--batch", "a"], ["--iters", "0"]])
def test_bench_bad_options_exit_2(deployed, tmp_path, argv):
    from invpt.runtime.bench_cli import main

    assert main(["--model", str(deployed["fp32"]), "--out", str(tmp_path / "b"), *argv]) == 2
    assert not (tmp_path / "b").exists()


def test_trtexec_command_for_each_backend(deployed):
    from invpt.runtime import load_artifact, trtexec_command

    art = load_artifact(deployed["plan"])
    cmd = trtexec_command(art.path, art.manifest, batch=1, iters=7, cuda_graph=True)
    tool = {"tensorrt_rtx": "tensorrt_rtx", "tensorrt": "trtexec"}[art.manifest.build["backend"]]
    assert cmd.split()[0] == tool and "--iterations=7" in cmd and "--useCudaGraph" in cmd


def test_unavailable_onnxruntime_provider_is_exit_2(deployed, tmp_path, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA execution provider")
    from invpt.runtime.parity_cli import main

    assert main(["--ckpt", str(deployed["ckpt"]), "--model", str(deployed["fp32"]), "--provider", "cuda",
                 "--out", str(tmp_path / "rep")]) == 2
    assert not (tmp_path / "rep").exists() and "provider 'cuda' is not available" in capsys.readouterr().err


def test_embedded_default_checkpoint_is_written_once_then_reused(tmp_path):
    from invpt import load_model
    from invpt.runtime.deploy import bundled_images, default_checkpoint

    path = default_checkpoint(tmp_path / "o")
    assert path == tmp_path / "o" / "tiny_pascal.pth" and load_model(path).cfg.name == "tiny_pascal"
    sha = sha256_file(path)
    assert default_checkpoint(tmp_path / "o") == path and sha256_file(path) == sha  # reused, not rewritten
    assert bundled_images() == ASSETS


def test_deploy_without_a_tensorrt_module_stops_at_onnx_and_says_so(deployed, monkeypatch, tmp_path):
    deployed = _copy_of_the_run(deployed, tmp_path)  # the rerun rewrites the reports (the artifacts are reused)
    import invpt.engines.backend as backend
    from invpt.errors import DependencyError
    from invpt.runtime.deploy import run_deploy

    def missing(choice: str = "auto"):
        raise DependencyError("No TensorRT Python module could be imported (tensorrt: missing; tensorrt_rtx: missing).")

    monkeypatch.setattr(backend, "load_backend", missing)
    before = _snapshot(deployed["fp32"], deployed["fp16"], deployed["plan"])
    res = run_deploy(deployed["ckpt"], deployed["out"], precisions=["fp32", "fp16"], samples=1, iters=1, warmup=0)
    assert [s["stage"] for s in res.steps] == ["export", "quantize-fp16", "parity", "bench"]
    assert {a.kind for a in res.artifacts} == {"onnx"} and res.passed
    assert "no engines built" in res.summary_path.read_text()
    assert _snapshot(deployed["fp32"], deployed["fp16"], deployed["plan"]) == before
