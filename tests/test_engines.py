"""invpt-trt-build: real engine builds with TensorRT-RTX on CPU, the pre-build precision check, refusals, no TensorRT.

Builds are real (tensorrt_rtx builds ahead of time without a GPU; ~5 s per tiny model). Tests that need a GPU
(the engine inspector, running an engine) are marked ``gpu`` and skip where none can load the engine.
"""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from invpt.engines.cli import main
from invpt.manifest import Manifest, load_manifest_for, manifest_path_for, sha256_file
from tests.helpers import copy_artifact

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install 'invpt[rtx]')")

REPO = Path(__file__).resolve().parents[1]


# ---- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture
def calib_dir(calib_images) -> Path:
    """Real photo crops (smaller than the tiny models, so the manifests' 'pad' mode applies)."""
    return calib_images


@pytest.fixture(scope="module")
def pascal(pascal_onnx, pascal_fp16, pascal_int8, tmp_path_factory) -> dict[str, Path]:
    """tiny PASCAL at FP32, FP16 and INT8, made by the export and calib stages (the session's, copied into one folder
    of this module's: builds write their engines beside the ONNX they start from). Names: m.onnx, m.fp16.onnx, ..."""
    d = tmp_path_factory.mktemp("engines_pascal")
    return {key: copy_artifact(res.onnx_path, d)
            for key, res in (("fp32", pascal_onnx), ("fp16", pascal_fp16), ("int8", pascal_int8))}


@pytest.fixture(scope="module")
def nyud_from_ckpt(tiny_nyud_official_ckpt, tmp_path_factory) -> tuple[int, Path, Path]:
    """invpt-trt-build --ckpt: exports the checkpoint next to --out, then builds FP32. (rc, plan, exported ONNX)."""
    d = tmp_path_factory.mktemp("engines_nyud")
    plan = d / "nyud.plan"
    rc = main(["--ckpt", str(tiny_nyud_official_ckpt), "--out", str(plan), "--no-progress"])
    return rc, plan, d / "tiny_nyud_official.onnx"


def _snapshot(*paths: Path) -> dict[Path, str]:
    out = {}
    for p in paths:
        for f in (p, manifest_path_for(p)):
            out[f] = sha256_file(f)
    return out


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".staging." in p.name or p.suffix in (".plan",) or
                  p.name.endswith(".plan.json"))


def _copy_with_manifest(model: onnx.ModelProto, like: Path, dst: Path) -> Path:
    """Save ``model`` at ``dst`` with a copy of ``like``'s manifest whose sha256/size describe the new file."""
    onnx.save(model, str(dst))
    man = load_manifest_for(like)
    man.replace(artifact=dst.name, sha256=sha256_file(dst), size_bytes=dst.stat().st_size).save(manifest_path_for(dst))
    return dst


def _check_engine(plan: Path, onnx_path: Path, precision: str) -> Manifest:
    assert plan.is_file() and plan.stat().st_size > 100_000
    man = Manifest.load(manifest_path_for(plan))
    assert manifest_path_for(plan).name == plan.name + ".json"
    assert man.kind == "engine" and man.precision == precision and man.artifact == plan.name
    assert man.sha256 == sha256_file(plan) and man.size_bytes == plan.stat().st_size
    assert man.parent["kind"] == "onnx" and man.parent["sha256"] == sha256_file(onnx_path)
    build = man.build
    assert build["backend"] == "tensorrt_rtx" and build["backend_version"] == trt.__version__
    assert build["plan"]["magic"] == plan.read_bytes()[:4].decode("latin-1")  # a plain plan: no header of ours
    assert build["timings_s"]["build_s"] > 0 and build["peak_rss_bytes"] > 0
    assert build["profile_shapes"]["image"]["opt"] == list(man.inputs[0].shape)
    check = man.verification["precision_check"]
    assert check["passed"] and not check["violations"]
    summary = check["summary"]
    assert summary["inputs"][0]["name"] == "image" and [o["name"] for o in summary["outputs"]] == list(man.tasks)
    if precision == "fp16":
        assert check["fp16_share"] >= check["policy_fp16_share"] - 0.005 and check["policy_fp16_share"] > 0.5
        assert summary["by_type_dtype"]["NORMALIZATION"] == {"fp32": summary["by_type"]["NORMALIZATION"]}
        assert summary["by_type_dtype"]["SOFTMAX"] == {"fp32": summary["by_type"]["SOFTMAX"]}
    elif precision == "int8":
        assert check["quantized_gemm_layers"] == check["onnx_quantized_nodes"] > 0
        assert summary["by_type"]["QUANTIZE"] == check["onnx_quantize_linear"]
    else:
        assert set(summary["matmul_conv_flop_share"]) == {"fp32"}
    insp = man.verification["engine_inspector"]
    assert insp["ran"] or "GPU" in insp["reason"]
    return man


# ---- real builds ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_pascal_builds_pass_the_check_and_match_their_manifest(pascal, precision, tmp_path):
    src = pascal[precision]
    before = _snapshot(*pascal.values())
    # fp16/int8 start from the FP32 ONNX: the build reuses the verified m.fp16.onnx / m.int8.onnx beside it.
    args = ["--onnx", str(pascal["fp32"]), f"--{precision}", "--no-progress"]
    if precision == "fp32":  # also: TensorRT-RTX compute-capability targets, recorded by name
        args += ["--out", str(tmp_path / "pascal.plan"), "--compute-capability", "86,89"]
    assert main(args) == 0
    # fp16/int8: the default name, next to the ONNX it was built from; its manifest is m.fp16.plan.json, so the
    # ONNX's own manifest m.fp16.json is untouched (checked by the snapshot).
    plan = tmp_path / "pascal.plan" if precision == "fp32" else src.with_suffix(".plan")
    man = _check_engine(plan, src, precision)
    assert _snapshot(*pascal.values()) == before  # inputs and their manifests untouched
    if precision == "fp32":
        build = man.build
        assert build["targets"]["compute_capabilities"] == ["86", "89"]
        assert build["options"]["compute_capabilities"] == ["86", "89"]
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [plan.name, plan.name + ".json"]
    else:
        assert man.build["prepared"]["quantize"]["reused"] is True


def test_nyud_from_checkpoint_exports_then_builds_fp32(nyud_from_ckpt):
    rc, plan, onnx_path = nyud_from_ckpt
    assert rc == 0
    man = _check_engine(plan, onnx_path, "fp32")
    assert man.tasks == load_manifest_for(onnx_path).tasks and "depth" in man.tasks
    assert load_manifest_for(onnx_path).parent["kind"] == "checkpoint"


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_nyud_reduced_precision_is_made_through_calib_then_built(nyud_from_ckpt, calib_dir, precision):
    rc, _, fp32 = nyud_from_ckpt
    assert rc == 0
    plan = fp32.with_name(f"nyud.{precision}.plan")
    made = fp32.with_name(f"{fp32.stem}.{precision}.onnx")
    assert not made.exists()
    args = ["--onnx", str(fp32), f"--{precision}", "--out", str(plan), "--no-progress"]
    if precision == "int8":
        args += ["--calib-data", str(calib_dir), "--calib-samples", "4"]
    assert main(args) == 0
    man = _check_engine(plan, made, precision)
    src = load_manifest_for(made)
    assert src.precision == precision and src.verification["passed"]  # made with calib's parity check
    assert man.precision_policy["name"] == "default"


def _strip_casts(path: Path) -> onnx.ModelProto:
    """The FP16 graph with every FP16/FP32 Cast removed and FP16 weights widened: an all-FP32 graph."""
    from onnx import numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    casts = [n for n in g.node if n.op_type == "Cast"]
    alias = {n.output[0]: n.input[0] for n in casts}

    def root(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    keep = [n for n in g.node if n.op_type != "Cast"]
    for n in keep:
        for i, name in enumerate(n.input):
            n.input[i] = root(name)
    outputs = {o.name for o in g.output}
    for n in casts:  # a Cast that produced a graph output: rename its source instead
        if n.output[0] in outputs:
            src = root(n.input[0])
            for k in keep:
                for i, o in enumerate(k.output):
                    if o == src:
                        k.output[i] = n.output[0]
                for i, name in enumerate(k.input):
                    if name == src:
                        k.input[i] = n.output[0]
    del g.node[:]
    g.node.extend(keep)
    for i, init in enumerate(list(g.initializer)):
        if init.data_type == onnx.TensorProto.FLOAT16:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    del g.value_info[:]
    return m


def test_fp16_asked_of_an_all_fp32_graph_fails_and_writes_nothing(pascal, tmp_path):
    stripped = _copy_with_manifest(_strip_casts(pascal["fp16"]), pascal["fp16"], tmp_path / "stripped.onnx")
    assert not any(n.op_type == "Cast" for n in onnx.load(str(stripped), load_external_data=False).graph.node)
    before = _snapshot(stripped)
    out = tmp_path / "out" / "stripped.plan"
    for extra in ([], ["--fp16"]):  # precision from the manifest, and asked for explicitly
        assert main(["--onnx", str(stripped), *extra, "--out", str(out), "--no-progress"]) == 3
    assert _snapshot(stripped) == before
    assert not out.parent.exists() or _leftovers(out.parent) == []
    assert not (tmp_path / "stripped.plan").exists()


def test_fp16_check_message_names_the_shortfall(pascal, tmp_path, capsys):
    stripped = _copy_with_manifest(_strip_casts(pascal["fp16"]), pascal["fp16"], tmp_path / "s.onnx")
    assert main(["--onnx", str(stripped), "--out", str(tmp_path / "s.plan"), "--no-progress"]) == 3
    msg = capsys.readouterr().err
    assert "Precision check failed" in msg and "0.0 % of MatMul/Conv work computes in FP16" in msg
    assert "invpt-quantize --precision fp16" in msg and "Nothing was built" in msg


def test_int8_with_a_missing_qdq_pair_fails(pascal, tmp_path, capsys):
    m = onnx.load(str(pascal["int8"]))
    g = m.graph
    inits = {i.name for i in g.initializer}
    q = None
    users = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    # an activation Q/DQ pair feeding a MatMul: remove both, feed the MatMul the FP32 tensor directly
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            dq = [u for u in users.get(n.output[0], []) if u.op_type == "DequantizeLinear"]
            if len(dq) == 1 and [u.op_type for u in users.get(dq[0].output[0], [])] == ["MatMul"]:
                q = n
                break
    assert q is not None
    dq = users[q.output[0]][0]
    target = users[dq.output[0]][0]
    for i, name in enumerate(target.input):
        if name == dq.output[0]:
            target.input[i] = q.input[0]
    g.node.remove(q)
    g.node.remove(dq)
    broken = _copy_with_manifest(m, pascal["int8"], tmp_path / "broken.onnx")
    before = _snapshot(broken)
    out = tmp_path / "broken.plan"
    assert main(["--onnx", str(broken), "--out", str(out), "--no-progress"]) == 3
    msg = capsys.readouterr().err
    assert "a Q/DQ pair is missing" in msg and "Nothing was built" in msg and target.name in msg
    assert _snapshot(broken) == before and _leftovers(tmp_path) == []


def test_io_that_differs_from_the_manifest_fails_the_check(pascal, tmp_path, capsys):
    onnx_path = tmp_path / "m.onnx"
    shutil.copy(pascal["fp32"], onnx_path)
    man = load_manifest_for(pascal["fp32"])
    outputs = (dataclasses.replace(man.outputs[0], shape=(1, 99, 128, 128)),) + man.outputs[1:]
    man.replace(outputs=outputs).save(manifest_path_for(onnx_path))
    assert main(["--onnx", str(onnx_path), "--out", str(tmp_path / "m.plan"), "--no-progress"]) == 3
    msg = capsys.readouterr().err
    assert f"output '{man.outputs[0].name}' is fp32 [1, {man.outputs[0].shape[1]}, 128, 128] in the network" in msg
    assert _leftovers(tmp_path) == []


# ---- parser errors, refusals, no TensorRT --------------------------------------------------------------------
def test_unparseable_op_names_node_op_and_model_term(pascal, tmp_path, capsys):
    m = onnx.load(str(pascal["fp32"]))
    node = next(n for n in m.graph.node if n.name.startswith("heads.semseg") and n.op_type == "Conv")
    node.op_type, node.domain = "FancyConv", "com.example.invpt"
    m.opset_import.append(onnx.helper.make_opsetid("com.example.invpt", 1))
    bad = _copy_with_manifest(m, pascal["fp32"], tmp_path / "bad.onnx")
    assert main(["--onnx", str(bad), "--out", str(tmp_path / "bad.plan"), "--no-progress"]) == 2
    msg = capsys.readouterr().err
    assert f"node '{node.name}'" in msg and "op FancyConv" in msg and "model term head.semseg" in msg
    assert "hint:" in msg and _leftovers(tmp_path) == []


@pytest.mark.parametrize("flags, words", [
    (["--hardware-compat", "ampere+"], "TensorRT-RTX has no hardware-compatibility levels"),
    (["--version-compatible"], "no lean runtime"),
    (["--timing-cache", "{tmp}/t.cache"], "ignores timing caches"),
    (["--dla-core", "0"], "--dla-core is not available"),
    (["--compute-capability", "42"], "not a target"),
    (["--opt-level", "9"], "--opt-level must be 0-5"),
    pytest.param(["--refittable"], "--refittable needs a CUDA GPU", marks=pytest.mark.skipif(
        bool(__import__("invpt.engines.build", fromlist=["_cuda_devices"])._cuda_devices()),
        reason="a CUDA GPU is present: TensorRT-RTX can build refittable engines here")),
    (["--batch", "4,2,1"], "1 <= MIN <= OPT <= MAX"),
])
def test_options_the_backend_lacks_are_refused(pascal, tmp_path, capsys, flags, words):
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    out = tmp_path / "x.plan"
    assert main(["--onnx", str(pascal["fp32"]), "--backend", "rtx", "--out", str(out), *flags]) == 2
    assert words in capsys.readouterr().err
    assert _leftovers(tmp_path) == [] and not (tmp_path / "t.cache").exists()


def test_a_failure_inside_tensorrt_is_exit_4_and_writes_nothing(pascal, tmp_path, capsys, monkeypatch):
    """Without invpt's refusal, TensorRT-RTX really fails a version-compatible build (it has no lean runtime)."""
    import invpt.engines.build as build

    monkeypatch.setattr(build, "validate_options", lambda backend, opts: None)
    out = tmp_path / "x.plan"
    assert main(["--onnx", str(pascal["fp32"]), "--backend", "rtx", "--version-compatible", "--out", str(out),
                 "--no-progress"]) == 4
    msg = capsys.readouterr().err
    assert "failed to build the engine" in msg and "lean" in msg and "failure inside TensorRT" in msg
    assert _leftovers(tmp_path) == []


def test_static_batch_onnx_refuses_a_batch_range(pascal, tmp_path, capsys):
    assert main(["--onnx", str(pascal["fp32"]), "--batch", "1,2,4", "--out", str(tmp_path / "x.plan")]) == 2
    msg = capsys.readouterr().err
    assert "static batch of 1" in msg and "--dynamic-batch" in msg
    assert _leftovers(tmp_path) == []


def test_dynamic_batch_onnx_gets_the_batch_profile(pascal_dynamic_onnx, tmp_path):
    onnx_path = pascal_dynamic_onnx.onnx_path  # read-only: the plans go to tmp_path
    plan = tmp_path / "dyn.plan"
    assert main(["--onnx", str(onnx_path), "--batch", "1,2,4", "--out", str(plan)]) == 0  # with the progress monitor
    man = Manifest.load(manifest_path_for(plan))
    assert man.sha256 == sha256_file(plan) and man.inputs[0].shape[0] == "batch"
    prof = man.build["profile_shapes"]["image"]
    assert [prof[k][0] for k in ("min", "opt", "max")] == [1, 2, 4] and prof["max"][1:] == [3, 128, 128]
    assert man.verification["precision_check"]["summary"]["inputs"][0]["shape"][0] == -1
    # Without --batch a dynamic-batch ONNX still needs a profile: batch 1 (as trtexec does), recorded as such.
    plan1 = tmp_path / "dyn1.plan"
    assert main(["--onnx", str(onnx_path), "--out", str(plan1)]) == 0
    prof1 = Manifest.load(manifest_path_for(plan1)).build
    assert [prof1["profile_shapes"]["image"][k][0] for k in ("min", "opt", "max")] == [1, 1, 1]


def test_config_without_ckpt_is_refused(pascal, tmp_path, capsys):
    assert main(["--onnx", str(pascal["fp32"]), "--config", "tiny_pascal", "--out", str(tmp_path / "x.plan")]) == 2
    assert "--config applies to --ckpt only" in capsys.readouterr().err and _leftovers(tmp_path) == []


@pytest.mark.parametrize("what", ["input", "json", "dir", "onnx_manifest"])
def test_bad_outputs_are_refused_before_any_work(pascal, tmp_path, what):
    out = {"input": pascal["fp32"], "json": tmp_path / "e.json", "dir": tmp_path,
           "onnx_manifest": manifest_path_for(pascal["fp32"])}[what]
    before = _snapshot(pascal["fp32"])
    assert main(["--onnx", str(pascal["fp32"]), "--out", str(out)]) == 2
    assert _snapshot(pascal["fp32"]) == before and _leftovers(tmp_path) == []


def test_int8_from_fp32_without_calib_data_is_refused(pascal, tmp_path, capsys):
    for f in (pascal["fp32"], manifest_path_for(pascal["fp32"])):
        shutil.copy(f, tmp_path / f.name)
    assert main(["--onnx", str(tmp_path / pascal["fp32"].name), "--int8", "--out", str(tmp_path / "x.plan")]) == 2
    assert "--calib-data" in capsys.readouterr().err and sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.onnx"]


def test_existing_precision_onnx_that_does_not_match_is_not_overwritten(pascal, tmp_path, capsys):
    for f in (pascal["fp32"], manifest_path_for(pascal["fp32"])):
        shutil.copy(f, tmp_path / f.name)
    other = tmp_path / "m.fp16.onnx"  # an FP16-named file that is something else (here: the FP32 model)
    _copy_with_manifest(onnx.load(str(pascal["fp32"])), pascal["fp32"], other)
    before = _snapshot(other)
    assert main(["--onnx", str(tmp_path / "m.onnx"), "--fp16", "--out", str(tmp_path / "x.plan")]) == 2
    assert "cannot be reused" in capsys.readouterr().err and _snapshot(other) == before


def test_precision_onnx_given_with_another_precision_is_refused(pascal, tmp_path, capsys):
    assert main(["--onnx", str(pascal["fp16"]), "--int8", "--out", str(tmp_path / "x.plan")]) == 2
    assert "needs the FP32 ONNX" in capsys.readouterr().err and _leftovers(tmp_path) == []


def test_without_any_tensorrt_module_says_what_to_install_and_where_the_onnx_is(pascal, tmp_path, monkeypatch,
                                                                                capsys):
    # A None entry in sys.modules makes ``import`` raise ImportError, as on a machine without the module.
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    out = tmp_path / "e.plan"
    assert main(["--onnx", str(pascal["fp32"]), "--fp16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert 'pip install "invpt[rtx]"' in err and "enterprise TensorRT" in err
    assert str(pascal["fp16"]) in err and "No engine was built" in err
    assert _leftovers(tmp_path) == []
    assert main(["--onnx", str(pascal["fp32"]), "--backend", "tensorrt", "--out", str(out)]) == 2
    assert "tensorrt" in capsys.readouterr().err and not out.exists()


def test_help_is_fast_and_imports_no_heavy_module():
    code = ("import sys\nfrom invpt.engines.cli import build_parser\nbuild_parser().format_help()\n"
            "print(sorted(m for m in ('torch', 'onnx', 'tensorrt', 'tensorrt_rtx') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# ---- GPU only ------------------------------------------------------------------------------------------------
def _gpu_that_loads_rtx_engines() -> str:
    from invpt.engines.build import _cuda_devices

    devices = _cuda_devices()
    if not devices:
        return "no CUDA GPU: loading an engine and the engine inspector need one"
    if not any(d["compute_capability"] in ("7.5", "8.0", "8.6", "8.9") or d["compute_capability"].startswith("12.")
               for d in devices):
        return f"TensorRT-RTX engines do not run on {devices[0]['name']} (RTX-class GPUs only)"
    return ""


@pytest.mark.gpu
@pytest.mark.skipif(bool(_gpu_that_loads_rtx_engines()), reason=_gpu_that_loads_rtx_engines() or "GPU present")
def test_engine_inspector_records_layer_precisions_on_a_gpu(pascal, tmp_path):
    plan = tmp_path / "g.plan"
    assert main(["--onnx", str(pascal["fp16"]), "--out", str(plan), "--no-progress"]) == 0
    insp = Manifest.load(manifest_path_for(plan)).verification["engine_inspector"]
    assert insp["ran"] and insp["layer_precision_histogram"].get("fp16", 0) > 0
