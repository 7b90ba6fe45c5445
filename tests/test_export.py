"""invpt-export: graph structure, Resize conformance, ORT parity, manifest, and failure paths."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from invpt.artifacts import verified_manifest
from invpt.errors import ExportError, InputError, VerificationError
from invpt.export import expected_resize_sizes, resize_sites, run_export
from invpt.export.cli import main as export_main
from invpt.export.ort import ort_session, run_session
from invpt.export.parity import Tolerance
from invpt.manifest import Manifest, sha256_file


# The session's run_export(..., dynamic_batch=True) of tiny PASCAL to pascal.onnx (tests/conftest.py), verified at
# batch 1 and 3. Read-only here.
@pytest.fixture
def pascal_dynamic(pascal_dynamic_onnx):
    return pascal_dynamic_onnx


@pytest.fixture
def nyud_static(nyud_b2_onnx):
    """The session's tiny NYUD export: static batch 2, through onnxslim (tests/conftest.py). Read-only here."""
    return nyud_b2_onnx


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize("which", ["pascal_dynamic", "nyud_static"])
def test_resize_conformance(which, request):
    """Every interpolate call site is one linear, half-pixel Resize of the size the spec derives."""
    result = request.getfixturevalue(which)
    cfg = result.manifest.model_config
    sites = resize_sites(result.onnx_path)
    assert len(sites) == 1 + 11 * len(cfg.tasks)  # 56 for PASCAL, 45 for NYUD (no inter_preds exported)
    assert all(s.mode == "linear" for s in sites)
    assert all(s.coordinate_transformation_mode in ("half_pixel", "pytorch_half_pixel") for s in sites)
    assert sorted(s.output_hw for s in sites) == expected_resize_sizes(cfg)
    by_module = Counter(s.module.split(".blocks.0")[0].split(".patch_embed")[0] for s in sites)
    t = len(cfg.tasks)
    # attention output x2 (3 stages) + message passing (stages 1, 2) live in the stage blocks; UpEmbed in patch_embed.
    for stage, expected in (("multi_task_decoder.invpt.invpt_stages.0", t),
                            ("multi_task_decoder.invpt.invpt_stages.1", 3 * t),
                            ("multi_task_decoder.invpt.invpt_stages.2", 3 * t)):
        assert by_module[stage] == expected, (stage, by_module)
    assert by_module["multi_task_decoder"] == 1  # decoder input to H/32
    assert by_module["multi_task_decoder.invpt"] == 3 * t  # multi-scale aggregation to H/4
    assert by_module[""] == t or by_module["model"] == t  # final upsample to input size


def test_graph_hygiene(pascal_dynamic):
    ops = _ops(pascal_dynamic.onnx_path)
    assert ops["Einsum"] == 0
    assert ops["LayerNormalization"] == 4 * 2 + 1 + 6 + 3  # ViT depth 4 (+final norm), 3 decoder blocks x2, norm_mts
    assert ops["ConvTranspose"] == 1
    onnx.checker.check_model(str(pascal_dynamic.onnx_path), full_check=True)
    names = [n.name for n in onnx.load(str(pascal_dynamic.onnx_path)).graph.node]
    assert any(n.startswith("multi_task_decoder.invpt.invpt_stages.1.blocks.0.attn/") for n in names)
    # Dead computation is not exported: scale_embed.2 has no node.
    assert not any(n.startswith("multi_task_decoder.scale_embed.2/") for n in names)


def test_dynamic_batch_parity(pascal_dynamic):
    """Batch 1 and 3 through a dynamic-batch model match PyTorch to rel err <= 1e-4."""
    parity = pascal_dynamic.parity
    assert parity.passed and parity.samples == 4  # batch 1 + batch 3
    for t in parity.tasks.values():
        assert t.rel_err <= 1e-4 and t.cosine > 0.99999
    graph_input = onnx.load(str(pascal_dynamic.onnx_path)).graph.input[0]
    assert graph_input.name == "image" and graph_input.type.tensor_type.shape.dim[0].dim_param


def test_static_batch_parity_nyud(nyud_static, tiny_nyud):
    assert nyud_static.parity.passed
    simplified = nyud_static.manifest.export["simplified"]  # onnxslim ran; kept only if it shrank the graph
    assert simplified["nodes_before"] > 0 and simplified["applied"] == (simplified["nodes_after"] < simplified["nodes_before"])
    sess = ort_session(nyud_static.onnx_path)
    assert [o.name for o in sess.get_outputs()] == ["semseg", "depth", "normals", "edge"]
    assert sess.get_inputs()[0].shape == [2, 3, 128, 192]
    import torch

    x = np.random.default_rng(5).standard_normal((2, 3, 128, 192), dtype=np.float32)
    got = run_session(sess, {"image": x})
    with torch.no_grad():
        ref = tiny_nyud(torch.from_numpy(x))
    for t in ref:
        err = np.abs(got[t] - ref[t].numpy()).max() / np.abs(ref[t].numpy()).max()
        assert err <= 1e-4, (t, err)


def test_manifest(pascal_dynamic, tiny_pascal_official_ckpt):
    m = Manifest.load(pascal_dynamic.manifest_path)
    assert m.artifact == "pascal.onnx" and m.precision == "fp32" and m.kind == "onnx"
    assert m.sha256 == sha256_file(pascal_dynamic.onnx_path)
    assert m.parent["sha256"] == sha256_file(tiny_pascal_official_ckpt)
    assert m.inputs[0].name == "image" and m.inputs[0].shape == ("batch", 3, 128, 128)
    assert [o.name for o in m.outputs] == ["semseg", "human_parts", "sal", "normals", "edge"]
    assert m.outputs[0].class_names[0] == "background" and m.outputs[3].decode == "normals"
    assert m.preprocessing.mean == (0.485, 0.456, 0.406) and m.preprocessing.mode == "pad"
    assert m.verification["passed"] is True
    assert {"torch", "onnx", "onnxruntime"} <= set(m.versions)
    meta = {p.key: p.value for p in onnx.load(str(pascal_dynamic.onnx_path), load_external_data=False).metadata_props}
    assert json.loads(meta["invpt.config"])["name"] == "tiny_pascal"


def test_task_subset_drops_other_heads(tiny_pascal, tmp_path, pascal_dynamic):
    """One export from a model held in memory (training's path: no checkpoint file) for four things: the task subset,
    external data on request, the letterbox preprocessing recorded, and the phase timer in the manifest."""
    from invpt.export.pipeline import ExportOptions, export_model

    res = export_model(tiny_pascal, tmp_path / "sub.onnx", ExportOptions(
        tasks=("normals", "semseg"), external_data="always", simplify=False, preprocess_mode="letterbox"))
    m = Manifest.load(res.manifest_path)
    assert m.preprocessing.mode == "letterbox"
    sess = ort_session(res.onnx_path)
    assert [o.name for o in sess.get_outputs()] == ["semseg", "normals"] == [o.name for o in m.outputs]
    assert res.manifest.external_data == ("sub.onnx.data",) and (tmp_path / "sub.onnx.data").exists()
    assert res.parity.passed and m.parent is None and sha256_file(res.onnx_path) == m.sha256
    full, sub = _ops(pascal_dynamic.onnx_path), _ops(res.onnx_path)
    # mt_proj, heads, redu_chan and aggregation resizes of the 3 other tasks are gone.
    assert full["Conv"] - sub["Conv"] == 3 * (1 + 1 + 2)
    assert full["Resize"] - sub["Resize"] == 3 * 4
    # The manifest is written inside the last phase ("write"), so it records every phase before that one.
    assert m.timings["seconds"] == {k: v for k, v in res.timings.items() if k != "write_s"}
    assert {"torch_onnx_export_s", "graph_checks_s", "verification_onnxruntime_s", "write_s"} <= set(res.timings)


def test_failed_verification_leaves_nothing(tmp_path, tiny_pascal_official_ckpt, pascal_onnx, monkeypatch):
    """The export step is the session's graph of the same checkpoint, copied (the stage's failure path is under test,
    not torch.onnx): verification against the impossible tolerance fails, and nothing is left behind."""
    import shutil

    import invpt.export.pipeline as pipeline
    from invpt.onnx_summary import read_summary

    def exported(model, path, **kw):
        assert kw["tasks"] == tuple(pascal_onnx.manifest.tasks) and kw["batch"] == 1 and not kw["dynamic_batch"]
        shutil.copyfile(pascal_onnx.onnx_path, path)
        return onnx.load(str(path)), read_summary(path)

    monkeypatch.setattr(pipeline, "export_graph", exported)
    impossible = Tolerance(max_rel_err=0.0, min_cosine=1.0, min_agreement=1.0)
    with pytest.raises(VerificationError, match="was not written") as err:
        run_export(tiny_pascal_official_ckpt, tmp_path / "m.onnx", tolerance=impossible, simplify=False)
    msg = str(err.value)
    assert "--no-verify" in msg and "onnxruntime versions" in msg and "custom tolerance" not in msg
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def ckpt_copy(tiny_pascal_official_ckpt, tmp_path) -> Path:
    """A private copy of the checkpoint (the tests below try to overwrite it)."""
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "c.pth.tar"
    path.write_bytes(tiny_pascal_official_ckpt.read_bytes())
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the checkpoint is loaded: bad input must be refused before any model work."""
    import invpt

    def boom(*a, **kw):
        raise AssertionError("load_model was called before the inputs were validated")

    monkeypatch.setattr(invpt, "load_model", boom)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("how", ["same", "hardlink", "symlink"])
def test_export_refuses_to_overwrite_the_checkpoint(ckpt_copy, tmp_path, no_model_load, capsys, how):
    folder, ckpt = ckpt_copy.parent, ckpt_copy
    if how == "same":
        out = ckpt
    elif how == "hardlink":
        out = folder / "alias.onnx"
        os.link(ckpt, out)
    else:
        out = folder / "sym.onnx"
        out.symlink_to(ckpt)
    before = _files(folder)
    assert export_main(["--ckpt", str(ckpt), "--no-verify", "--out", str(out)]) == 2
    assert "never writes into its inputs" in capsys.readouterr().err
    assert _files(folder) == before and sorted(p.name for p in folder.iterdir()) == sorted(before)


@pytest.mark.parametrize("out, needle", [("dir", "is an existing directory"), ("m.json", "ends in .json")])
def test_export_refuses_bad_output_before_loading(ckpt_copy, tmp_path, no_model_load, capsys, out, needle):
    (tmp_path / "dir").mkdir()
    assert export_main(["--ckpt", str(ckpt_copy), "--out", str(tmp_path / out)]) == 2
    assert needle in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "in"] and not list((tmp_path / "dir").iterdir())


def test_export_refuses_empty_task_list(ckpt_copy, tmp_path, no_model_load, capsys):
    assert export_main(["--ckpt", str(ckpt_copy), "--tasks", "", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "names no task" in capsys.readouterr().err
    with pytest.raises(InputError, match="names no task"):
        run_export(ckpt_copy, tmp_path / "m.onnx", tasks=[" "])
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("kind, needle", [("dir", "is a directory"), ("fifo", "is a FIFO"), ("missing", "does not exist")])
def test_export_checkpoint_path_problems(tmp_path, no_model_load, capsys, kind, needle):
    ckpt = tmp_path / "c.pth"
    if kind == "dir":
        ckpt.mkdir()
    elif kind == "fifo":
        os.mkfifo(ckpt)
    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "m.onnx")]) == 2
    assert f"Checkpoint '{ckpt}' {needle}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if kind == "missing" else ["c.pth"])


def test_manifest_parent_is_relative_to_its_folder(pascal_dynamic, tiny_pascal_official_ckpt, tmp_path, monkeypatch):
    m = pascal_dynamic.manifest
    assert not Path(m.parent["path"]).is_absolute()
    monkeypatch.chdir(tmp_path)  # a different working directory
    assert m.parent_path(pascal_dynamic.manifest_path).resolve() == tiny_pascal_official_ckpt.resolve()
    assert verified_manifest(pascal_dynamic.onnx_path).sha256 == m.sha256


def test_killed_export_is_cleaned_up_by_the_next_run(ckpt_copy, tmp_path):
    """SIGKILL mid-export leaves a staging folder; the next run of the same output removes it and succeeds."""
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    args = ["--ckpt", str(ckpt_copy), "--out", str(out), "--no-verify", "--tasks", "sal", "-q"]  # one task: quicker
    proc = subprocess.Popen([sys.executable, "-m", "invpt.export.cli", *args], env=env)
    deadline = time.monotonic() + 120
    try:
        while not list(out.parent.glob(".m.onnx.staging.*/.lock")):  # the run is live inside its staging folder
            assert proc.poll() is None, "export ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert [p for p in out.parent.iterdir() if ".staging." in p.name]  # the killed run left its folder
    assert not out.exists()
    assert export_main(args) == 0  # the same command, in-process, succeeds
    assert not [p for p in out.parent.iterdir() if ".staging." in p.name]
    assert verified_manifest(out).parent["sha256"] == sha256_file(ckpt_copy)
    assert verified_manifest(out).verification is None  # --no-verify is recorded as no verification
    assert sorted(p.name for p in out.parent.iterdir()) == [".m.onnx.lock", "m.json", "m.onnx"]


@pytest.mark.slow
def test_vitl_pascal_export(tmp_path):
    """Full-size ViT-L PASCAL (random weights): export and verify (minutes, ~10 GB RAM)."""
    import invpt
    from invpt.checkpoint import save_official_checkpoint

    ckpt = save_official_checkpoint(invpt.build_model("pascal_vitl").eval(), tmp_path / "vitl.pth")
    res = run_export(ckpt, tmp_path / "vitl.onnx")
    assert res.parity.passed and len(resize_sites(res.onnx_path)) == 56


@pytest.mark.parametrize("attr,value,needle", [("coordinate_transformation_mode", b"align_corners", "coordinate mode"),
                                               ("coordinate_transformation_mode", b"asymmetric", "coordinate mode"),
                                               ("mode", b"nearest", "not linear")])
def test_resize_conformance_checks_mode_and_coordinate_mode(pascal_dynamic, tmp_path, attr, value, needle):
    from invpt.export.graph_checks import check_resize_conformance

    cfg = pascal_dynamic.manifest.model_config
    assert len(check_resize_conformance(pascal_dynamic.onnx_path, cfg)) == 1 + 11 * len(cfg.tasks)
    proto = onnx.load(str(pascal_dynamic.onnx_path))
    node = next(n for n in proto.graph.node if n.op_type == "Resize")
    for a in node.attribute:
        if a.name == attr:
            a.s = value
            break
    else:
        node.attribute.append(onnx.helper.make_attribute(attr, value.decode()))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(ExportError, match=needle) as err:
        check_resize_conformance(bad, cfg)
    assert node.name in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_a_checkpoint_error_not_a_parity_failure(tiny_pascal, tmp_path, capsys, bad):
    """Before: exit 3 'ONNX Runtime disagrees'. Now: exit 2 naming the tensor, before any export work."""
    import torch

    sd = {k: v.clone() for k, v in tiny_pascal.state_dict().items()}
    sd["heads.semseg.linear_pred.weight"].view(-1)[3] = bad
    ckpt = tmp_path / "nan.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, ckpt)
    out = tmp_path / "nan.onnx"
    assert export_main(["--ckpt", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "heads.semseg.linear_pred.weight" in err and ("NaN" in err or "Inf" in err)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["nan.pth"]


def test_unknown_preprocessing_mode_is_refused(tiny_pascal_official_ckpt, tmp_path, no_model_load):
    """(An export with --preprocess letterbox is test_task_subset_drops_other_heads.)"""
    with pytest.raises(InputError, match="pad, resize, letterbox"):
        run_export(tiny_pascal_official_ckpt, tmp_path / "x.onnx", preprocess_mode="fit", verify=False)
    assert list(tmp_path.iterdir()) == []


def test_every_export_flag_reaches_the_options(tmp_path):
    from invpt.export.cli import build_parser, options_from_args

    args = build_parser().parse_args(["--ckpt", "c.pth", "--opset", "20", "--dynamic-batch", "--tasks", "sal, edge",
                                      "--no-verify", "--simplify", "--external-data", "always",
                                      "--preprocess", "letterbox"])
    o = options_from_args(args)
    assert (o.opset, o.dynamic_batch, o.tasks, o.verify, o.simplify, o.external_data, o.preprocess_mode) == \
        (20, True, ("sal", "edge"), False, True, "always", "letterbox")
    assert o.command.startswith("invpt-export")
