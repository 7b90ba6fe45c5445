"""Libraries never touch the user's files; library logs follow -q/-v; library failures are ToolErrors (exit 4).

ModelOpt runs ONNX shape inference on its input path in place and, for a read-only input folder, copies the folder
to a temp dir it never removes; onnxruntime's quantizer writes ``<name>-inferred.onnx`` beside its input. invpt
hands them a private copy in the stage's staging folder instead (``invpt.artifacts.private_copy``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from invpt.artifacts import private_copy
from invpt.calib import run_quantize
from invpt.calib.cli import main as quantize_main
from invpt.errors import InputError, InvptError, ToolError
from tests.helpers import copy_artifact



@pytest.fixture(scope="module")
def fp32(pascal_onnx, tmp_path_factory):
    """A copy of the session's exported model in a folder of its own: these tests watch the input's folder (listing,
    mtime, a read-only mode), so no other test may write there."""
    path = copy_artifact(pascal_onnx.onnx_path, tmp_path_factory.mktemp("in"))
    return SimpleNamespace(onnx_path=path)


@pytest.fixture
def calib_dir(calib_images) -> Path:
    return calib_images


@pytest.fixture()
def private_tmp(tmp_path, monkeypatch) -> Path:
    """The process temp dir, redirected to an empty folder this test checks afterwards."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    return tmp


def _snapshot(model: Path) -> dict:
    st = model.stat()
    return {
        "inode": st.st_ino, "mtime_ns": st.st_mtime_ns, "size": st.st_size,
        "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
        "folder": sorted(p.name for p in model.parent.iterdir()),
        "folder_mtime_ns": model.parent.stat().st_mtime_ns,
    }


@pytest.mark.parametrize("precision,method", [("int8", "entropy"), ("int8", "percentile"), ("fp16", None)])
def test_quantize_never_touches_the_input(fp32, calib_dir, tmp_path, private_tmp, precision, method):
    before = _snapshot(fp32.onnx_path)
    out = tmp_path / "out" / f"m.{precision}.onnx"
    kw = dict(calib_data=calib_dir, calib_samples=2, holdout_samples=1, cache_dir=tmp_path / "cache", verify=False)
    if method:
        kw["calib_method"] = method
    res = run_quantize(fp32.onnx_path, precision, out, **kw)
    assert res.onnx_path == out and out.is_file()
    assert _snapshot(fp32.onnx_path) == before  # same inode, mtime, size, bytes; no file added or removed beside it
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.startswith(".")) == \
        sorted([out.name, out.with_suffix(".json").name])  # no private copy or library intermediate left behind
    assert list(private_tmp.iterdir()) == []


def test_read_only_input_folder_never_triggers_modelopt_temp_copy(fp32, calib_dir, tmp_path, private_tmp, monkeypatch):
    """ModelOpt copies a read-only input folder to a mkdtemp() it never removes; with the private copy it must not."""
    from invpt.calib.int8 import quantize_int8

    folder = fp32.onnx_path.parent
    before = _snapshot(fp32.onnx_path)
    mode = folder.stat().st_mode
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):  # root ignores the mode: make ModelOpt's own check see the folder read-only
            real_access = os.access

            def access(path, amode, *args, **kwargs):
                if amode & os.W_OK and os.path.realpath(path) == os.path.realpath(folder):
                    return False
                return real_access(path, amode, *args, **kwargs)

            monkeypatch.setattr(os, "access", access)
        assert not os.access(folder, os.W_OK)
        calib = np.random.default_rng(0).standard_normal((2, 3, 128, 128), dtype=np.float32)
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        out = quantize_int8(fp32.onnx_path, out_dir / "q.onnx", calib, "entropy", [])
        assert out.is_file() and onnx.load(str(out), load_external_data=False).graph.node
    finally:
        folder.chmod(mode)
    assert _snapshot(fp32.onnx_path) == before
    assert list(private_tmp.iterdir()) == []  # no leaked copy of the input folder
    assert sorted(p.name for p in out_dir.iterdir()) == ["q.onnx"]


def test_sensitivity_copies_the_input_once(fp32, calib_dir, tmp_path, private_tmp, monkeypatch):
    """One private copy for the whole stage (the sweep and the final model read it), not one per block."""
    import invpt.calib.int8 as int8_mod
    import invpt.calib.pipeline as pipeline_mod
    import invpt.calib.sensitivity as sens_mod

    copies = []

    def counting_copy(src, into_dir, **kw):
        copies.append(Path(src))
        return private_copy(src, into_dir, **kw)

    monkeypatch.setattr(sens_mod, "private_copy", counting_copy)
    monkeypatch.setattr(int8_mod, "private_copy", counting_copy)
    monkeypatch.setattr(pipeline_mod, "private_copy", counting_copy)
    # A sweep over one block proves the point in a fraction of the full sweep's time: a copy per block, or one per
    # sweep, would be a second copy.
    all_blocks = sens_mod.block_terms
    monkeypatch.setattr(sens_mod, "block_terms", lambda tasks, depth: all_blocks(tasks, depth)[:1])
    before = _snapshot(fp32.onnx_path)
    out = tmp_path / "out" / "s.int8.onnx"
    res = run_quantize(fp32.onnx_path, "int8", out, calib_data=calib_dir, calib_samples=2, holdout_samples=1,
                       calib_method="max", cache_dir=tmp_path / "cache", sensitivity=True, verify=False)
    assert len(res.sensitivity["per_block"]) == 1
    assert copies == [fp32.onnx_path]  # run_quantize's one verified copy; sweep and final quantization reuse it
    assert _snapshot(fp32.onnx_path) == before
    assert not [p for p in out.parent.iterdir() if "input" in p.name]


# --- private_copy -----------------------------------------------------------------------------------------------------

def _external_model(folder: Path, location: str = "w.data") -> Path:
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 64])
    graph = helper.make_graph([helper.make_node("MatMul", ["image", "w"], ["out"])], "g", [x], [y], [w])
    model = helper.make_model(graph)
    path = folder / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=0)
    return path


def test_private_copy_copies_external_data_into_new_inodes(tmp_path):
    src = _external_model(tmp_path / "user")
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in src.parent.iterdir()}
    copy = private_copy(src, tmp_path / "stage")
    assert copy == tmp_path / "stage" / "ext.onnx"
    assert sorted(p.name for p in copy.parent.iterdir()) == ["ext.onnx", "w.data"]
    for name in ("ext.onnx", "w.data"):
        assert (copy.parent / name).stat().st_ino != (src.parent / name).stat().st_ino  # a copy, not a hard link
        assert (copy.parent / name).read_bytes() == (src.parent / name).read_bytes()
    (copy.parent / "w.data").write_bytes(b"")  # a library truncating its copy ...
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in src.parent.iterdir()} == before
    weights = onnx.numpy_helper.to_array(onnx.load(str(src)).graph.initializer[0])  # ... leaves the user's intact
    assert weights[63, 63] == 4095


def test_private_copy_checks_the_sha256_in_the_same_read(tmp_path):
    """The stage hashes the model while copying it (one read of a 1.6 GB file, not two); a file that changed after
    the manifest check is refused."""
    from invpt.manifest import sha256_file

    src = _external_model(tmp_path / "user")
    good = sha256_file(src)
    copy = private_copy(src, tmp_path / "stage", expect_sha256=good)
    assert copy.read_bytes() == src.read_bytes() and sha256_file(copy) == good
    with pytest.raises(InputError, match=r"ext\.onnx' changed after invpt checked it.*nothing was written"):
        private_copy(src, tmp_path / "stage2", expect_sha256="0" * 64)


def test_private_copy_of_a_read_only_file_is_writable(tmp_path):
    src = _external_model(tmp_path / "user")
    for p in src.parent.iterdir():
        p.chmod(0o444)
    copy = private_copy(src, tmp_path / "stage")
    assert os.stat(copy).st_mode & 0o200 and os.stat(copy.parent / "w.data").st_mode & 0o200


def test_private_copy_refuses_external_data_outside_the_folder(tmp_path):
    src = _external_model(tmp_path / "user" / "sub", location="w.data")
    proto = onnx.load(str(src), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../w.data"
    (src.parent / "w.data").rename(src.parent.parent / "w.data")
    src.write_bytes(proto.SerializeToString())
    with pytest.raises(InputError, match=r"outside its own folder"):
        private_copy(src, tmp_path / "stage")


def test_private_copy_names_a_missing_external_data_file(tmp_path):
    src = _external_model(tmp_path / "user")
    (src.parent / "w.data").unlink()
    with pytest.raises(InputError, match=r"w\.data.*does not exist"):
        private_copy(src, tmp_path / "stage")


def test_private_copy_refuses_to_copy_onto_the_source(tmp_path):
    src = _external_model(tmp_path / "user")
    data = (src.parent / "w.data").read_bytes()
    with pytest.raises(ValueError, match="source file itself"):
        private_copy(src, src.parent)
    assert (src.parent / "w.data").read_bytes() == data and onnx.load(str(src)).graph.node


# --- logging ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("verbosity,level", [(-2, logging.ERROR), (-1, logging.ERROR), (0, logging.WARNING),
                                             (1, logging.INFO), (2, logging.DEBUG)])
def test_library_loggers_follow_verbosity(verbosity, level):
    from invpt.cli.common import LIBRARY_LOGGERS, configure_logging

    for _ in range(2):  # configuring twice does not stack handlers
        configure_logging(verbosity)
    for name in ("modelopt", "onnxruntime", "onnx_graphsurgeon", "polygraphy", "onnxscript", "onnx_ir"):
        assert name in LIBRARY_LOGGERS
        lg = logging.getLogger(name)
        ours = [h for h in lg.handlers if getattr(h, "_invpt_handler", False)]
        assert lg.level == level and not lg.propagate and len(ours) == 1, name
    assert len([h for h in logging.getLogger("invpt").handlers if not isinstance(h, logging.NullHandler)]) == 1
    from onnx_graphsurgeon.logger import G_LOGGER

    assert G_LOGGER.severity == level
    import torch  # noqa: F401  (invpt's CLIs import it before configuring; its loggers are set through its API)

    if not os.environ.get("TORCH_LOGS"):
        configure_logging(verbosity)
        assert logging.getLogger("torch.onnx").getEffectiveLevel() == level
    configure_logging(0)


QUIET_CASES = [("fp16", "entropy"), ("int8", "entropy"), ("int8", "max")]
# One fresh interpreter runs invpt-quantize -q once per case, each with its own stdout/stderr files (file
# descriptors 1 and 2 redirected, so native library output is caught too); the first case's run also imports
# everything, so what a first run in a new process prints is seen. One process instead of three saves two
# interpreter starts with torch and ModelOpt imports.
QUIET_CHILD = r"""
import json, os, sys, traceback

codes = []
for args, log in json.loads(sys.argv[1]):
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log + ".stdout", "wb") as out, open(log + ".stderr", "wb") as err:
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        try:
            from invpt.calib.cli import main
            codes.append(main(args))
        except BaseException as e:
            traceback.print_exc()
            codes.append(f"{type(e).__name__}: {e}")
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(saved[0], 1); os.dup2(saved[1], 2)
            os.close(saved[0]); os.close(saved[1])
print(json.dumps(codes))
"""


@pytest.fixture(scope="module")
def quiet_runs(fp32, calib_images, tmp_path_factory) -> dict:
    """(precision, method) -> (exit code, stdout, stderr, out path) of ``invpt-quantize -q``, plus what the process
    itself wrote outside the runs (key "process")."""
    d = tmp_path_factory.mktemp("quiet")
    cases, outs = [], {}
    for precision, method in QUIET_CASES:
        tag = f"{precision}-{method}"
        outs[tag] = d / tag / f"q.{precision}.onnx"
        cases.append(([ "--onnx", str(fp32.onnx_path), "--precision", precision, "--out", str(outs[tag]), "-q",
                        "--calib-data", str(calib_images), "--calib-samples", "2", "--holdout-samples", "1",
                        "--cache-dir", str(d / tag / "c"), "--calib-method", method], str(d / tag)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", QUIET_CHILD, json.dumps(cases)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.splitlines()[-1])
    runs = {tag: (code, Path(log + ".stdout").read_text(), Path(log + ".stderr").read_text(), outs[tag])
            for (tag, (_, log)), code in zip(zip(outs, cases), codes)}
    runs["process"] = ("\n".join(proc.stdout.splitlines()[:-1]), proc.stderr)
    return runs


@pytest.mark.parametrize("precision,method", QUIET_CASES)
def test_quiet_silences_libraries(quiet_runs, precision, method):
    """-q: no ModelOpt INFO (about 215 lines per FP16 run before), no calibration progress, no NVML probe error
    (ModelOpt's min-max calibrator probes NVML: 'max'), nothing on stdout."""
    code, stdout, stderr, out = quiet_runs[f"{precision}-{method}"]
    assert code == 0, stderr[-3000:]
    assert out.is_file()
    lines = stderr.splitlines()
    assert len(lines) <= 5, stderr[-3000:]
    assert not [ln for ln in lines if "NVML" in ln or "INFO" in ln], stderr[-3000:]
    assert stdout == ""
    assert quiet_runs["process"] == ("", "")  # nor anything outside the runs (at exit, say)


def test_verbose_shows_library_info_on_stderr(fp32, calib_dir, tmp_path, capsys):
    """(INT8 with 'max' on two samples: the cheapest ModelOpt run; FP16's AutoCast is the -q case above.)"""
    out = tmp_path / "v.int8.onnx"
    args = ["--onnx", str(fp32.onnx_path), "--precision", "int8", "--out", str(out), "--no-verify", "--calib-data",
            str(calib_dir), "--calib-samples", "2", "--holdout-samples", "1", "--calib-method", "max",
            "--cache-dir", str(tmp_path / "c")]
    assert quantize_main(args + ["-v"]) == 0
    cap = capsys.readouterr()
    assert "[modelopt.onnx" in cap.err and " INFO " in cap.err  # routed through invpt's handler at -v
    assert "[modelopt]" not in cap.out and cap.out == ""
    assert quantize_main(args) == 0
    cap = capsys.readouterr()
    library_lines = [ln for ln in cap.err.splitlines() if ln.startswith("[modelopt")]
    assert not [ln for ln in library_lines if " INFO " in ln or " DEBUG " in ln]  # default: their warnings only
    assert cap.out == ""


# --- tool failures ----------------------------------------------------------------------------------------------------

def _boom(*args, **kwargs):
    raise RuntimeError("calibrator exploded: tensor 'x' has no histogram\nsecond line of the library's message")


def _int8_args(fp32, calib_dir, tmp_path, out):
    return ["--onnx", str(fp32.onnx_path), "--precision", "int8", "--out", str(out), "--calib-data", str(calib_dir),
            "--calib-samples", "2", "--holdout-samples", "1", "--cache-dir", str(tmp_path / "c"), "--no-verify"]


def test_modelopt_failure_is_a_tool_error(fp32, calib_dir, tmp_path, monkeypatch, capsys):
    import modelopt.onnx.quantization as mq

    from invpt.errors import library_version

    import modelopt.onnx.quantization.int8 as mq_int8

    monkeypatch.setattr(mq, "quantize", _boom)  # ModelOpt calibrating itself (--calibrate-per-node ...)
    monkeypatch.setattr(mq_int8, "quantize", _boom)  # the default: invpt's ranges, ModelOpt's Q/DQ insertion
    out = tmp_path / "t.int8.onnx"
    before = _snapshot(fp32.onnx_path)
    log = tmp_path / "run.log"
    assert quantize_main(_int8_args(fp32, calib_dir, tmp_path, out) + ["--log-file", str(log)]) == 4
    err = capsys.readouterr().err
    assert "ModelOpt " + library_version("nvidia-modelopt") in err
    assert "calibrator exploded: tensor 'x' has no histogram" in err and "second line" not in err
    assert "-v" in err and "report" in err
    assert "Traceback" not in err  # no traceback without -v ...
    text = log.read_text()
    assert "Traceback" in text and "RuntimeError: calibrator exploded" in text  # ... but always in --log-file
    assert "direct cause" in text and "ToolError" in text  # the chain: library error, then ours
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert _snapshot(fp32.onnx_path) == before

    assert quantize_main(_int8_args(fp32, calib_dir, tmp_path, out) + ["-v"]) == 4
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: calibrator exploded" in err and "direct cause" in err
    assert not out.exists()


def test_autocast_failure_is_a_tool_error(fp32, tmp_path, monkeypatch, capsys):
    from modelopt.onnx.autocast.graphsanitizer import GraphSanitizer

    monkeypatch.setattr(GraphSanitizer, "sanitize", _boom)  # the first AutoCast step invpt's FP16 conversion runs
    out = tmp_path / "t.fp16.onnx"
    assert quantize_main(["--onnx", str(fp32.onnx_path), "--precision", "fp16", "--out", str(out), "--no-verify"]) == 4
    err = capsys.readouterr().err
    assert "ModelOpt AutoCast" in err and "calibrator exploded" in err and "Traceback" not in err
    assert not out.exists()


def test_onnxruntime_worker_failure_is_a_tool_error_with_its_traceback(tmp_path):
    from invpt.calib.int8 import _quantize_ort

    calib = np.zeros((1, 3, 8, 8), np.float32)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage, not a protobuf")
    with pytest.raises(ToolError, match=r"onnxruntime .* failed") as info:
        _quantize_ort(bad, tmp_path / "q.onnx", calib, [], "image", 1)
    assert info.value.exit_code == 4 and isinstance(info.value, InvptError)
    chain = []
    e = info.value.__cause__
    while e is not None:
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__
    assert any("Traceback" in c and "quantize_static" in c for c in chain)  # the worker's own traceback came back
    assert not (tmp_path / "q.onnx").exists()


def test_a_bug_keeps_its_traceback(fp32, tmp_path, monkeypatch):
    import invpt.calib.pipeline as pipeline

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug in invpt")

    monkeypatch.setattr(pipeline, "quantize", bug)  # what invpt-quantize calls
    log = tmp_path / "bug.log"
    with pytest.raises(ZeroDivisionError):
        quantize_main(["--onnx", str(fp32.onnx_path), "--precision", "fp16", "--log-file", str(log)])
    assert "Traceback" in log.read_text() and "ZeroDivisionError" in log.read_text()
