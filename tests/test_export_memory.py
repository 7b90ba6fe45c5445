"""What keeps the export of the real (ViT-L) model small and quick, pinned on the tiny model.

All export checks here watch one export (``export_run``), processed the way ViT-L is (weights in an external-data
file until they are written back at the end):

* It reads its ONNX file once: the graph comes from the proto it just saved, the checker runs once by path, the file
  is hashed while its weights are written back into it; ``export_graph`` hands back the graph without its weights.
* The artifact is still the one self-contained file 'auto' promises, the same graph and weights as the session's
  export of the same checkpoint processed with its weights inline.
* The PyTorch model is freed before the ONNX Runtime session opens, and nothing keeps its weights alive after the
  export (onnxscript's rewrite rules held the last graph).
* It raises no ``torch.distributed.reduce_op`` FutureWarning (invpt's own gc walk used to touch that object).
* The shared phase timer records seconds and memory per phase (benchmarks read it instead of patching the stage).
* The streamed writer writes the same model ``onnx`` would, one tensor at a time.
"""
from __future__ import annotations

import gc
import shutil
import sys
import warnings
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from invpt.manifest import sha256_file
from invpt.onnx_summary import GraphSummary, read_summary
from invpt.timing import PhaseTimer, rss_bytes

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")


def _mapped(path: Path) -> bool:
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(str(path)) for line in f)


@pytest.fixture(scope="module")
def export_run(tiny_pascal_official_ckpt, tmp_path_factory):
    """One verified export (static batch 1, like the session's ``pascal_onnx``) processed the way ViT-L is: weights
    external until the end. Watched for: every ONNX read, check and hash; what ``export_graph`` returned and the file
    it had just written; whether the PyTorch model was alive when ONNX Runtime opened a session; every warning."""
    import onnxruntime

    import invpt.checkpoint
    import invpt.export.pipeline as pipeline
    import invpt.manifest as manifest

    folder = tmp_path_factory.mktemp("export_memory")
    ckpt = folder / "own.pth.tar"  # a checkpoint no other test maps
    shutil.copyfile(tiny_pascal_official_ckpt, ckpt)
    calls: dict[str, list] = {"load": [], "checker": [], "sha256": [], "graph": [], "model_alive_at_session": []}
    real_load, real_check, real_sha = onnx.load, onnx.checker.check_model, manifest.sha256_file
    real_export_graph, real_load_model = pipeline.export_graph, invpt.checkpoint.load_model
    real_session = onnxruntime.InferenceSession
    models: list = []
    snapshot = folder / "as_exported"

    def export_graph(model, path, **kw):
        proto, summary = real_export_graph(model, path, **kw)
        snapshot.mkdir()  # the staged files as export_graph left them (the stage rewrites them at the end)
        for f in [Path(path), *(Path(path).parent / loc for loc in summary.external_data)]:
            shutil.copyfile(f, snapshot / f.name)
        calls["graph"].append((proto, summary, kw))
        return proto, summary

    def load_model(*a, **k):
        model = real_load_model(*a, **k)
        models.append(weakref.ref(model))
        return model

    def session(path, *a, **k):
        gc.collect()
        calls["model_alive_at_session"].append(any(m() is not None for m in models))
        return real_session(path, *a, **k)

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.setattr(pipeline, "WORK_EXTERNAL_BYTES", 0)
        mp.setattr(pipeline, "export_graph", export_graph)
        mp.setattr(invpt.checkpoint, "load_model", load_model)
        mp.setattr(onnxruntime, "InferenceSession", session)  # what the core ONNX Runtime runner opens
        mp.setattr(onnx, "load", lambda f, *a, **k: calls["load"].append(str(f)) or real_load(f, *a, **k))
        mp.setattr(onnx, "load_model", lambda f, *a, **k: calls["load"].append(str(f)) or real_load(f, *a, **k))
        mp.setattr(onnx.checker, "check_model",
                   lambda m, *a, **k: calls["checker"].append(m if isinstance(m, (str, Path)) else "proto")
                   or real_check(m, *a, **k))
        for mod in (pipeline, manifest):
            mp.setattr(mod, "sha256_file", lambda p, *a, **k: calls["sha256"].append(Path(p)) or real_sha(p, *a, **k))
        res = pipeline.run_export(ckpt, folder / "out" / "m.onnx", timer=PhaseTimer(reset_peak=True))
    # What the timer says when the run ends (as a benchmark reads it): its process peak also covers the kernel's
    # current window, which later tests in this worker would raise.
    calls["timer"] = res.timer.to_dict()
    calls["warnings"] = [(w.category, str(w.message)) for w in caught]
    gc.collect()
    return res, calls, ckpt, snapshot


def test_one_export_reads_its_onnx_once(export_run):
    res, calls, ckpt, _ = export_run
    assert res.parity.passed
    assert calls["load"] == []  # every step used the graph the exporter had just saved, or its summary
    assert len(calls["checker"]) == 1 and str(calls["checker"][0]).endswith("m.onnx")  # by path, once
    assert calls["sha256"] == [ckpt]  # the ONNX file was hashed while it was written
    assert res.manifest.sha256 == sha256_file(res.onnx_path)
    assert res.manifest.external_data == () and res.manifest.size_bytes == res.onnx_path.stat().st_size
    assert res.manifest.export["op_census"] == read_summary(res.onnx_path).op_census


@linux_only
def test_nothing_keeps_the_weights_alive_after_the_export(export_run):
    """The checkpoint is memory-mapped; once the export returned, no tensor of it (nor the exporter's graph) lives."""
    from onnxscript.rewriter import _matcher

    _, calls, ckpt, _ = export_run
    assert calls["model_alive_at_session"] == [False]  # freed before ONNX Runtime opened its (one) session
    assert not _mapped(ckpt)
    held = [m for m in gc.get_objects() if issubclass(type(m), _matcher.PatternMatcher) and getattr(m, "_graph", None)]
    assert held == []


def test_processed_with_external_weights_it_is_still_one_file(export_run, pascal_onnx):
    """Above WORK_EXTERNAL_BYTES the staged ONNX keeps its weights external for the checks and verification, and the
    artifact is still the single self-contained file 'auto' promises below 1.8 GB: the same graph and weights as the
    session's export of the same checkpoint, which was processed the default way (weights inline)."""
    big, calls, _, _ = export_run
    (_, _, kw), = calls["graph"]
    assert kw["external_data"] == "always"  # really processed with external weights
    assert big.parity.passed and big.manifest.external_data == ()
    assert sorted(p.name for p in big.onnx_path.parent.iterdir() if not p.name.startswith(".")) == ["m.json", "m.onnx"]
    a, b = onnx.load(str(pascal_onnx.onnx_path)), onnx.load(str(big.onnx_path))
    assert all(i.data_location == TensorProto.DEFAULT and not i.external_data for i in b.graph.initializer)
    assert [(n.op_type, n.name) for n in a.graph.node] == [(n.op_type, n.name) for n in b.graph.node]
    wa = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer}
    wb = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer}
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert big.manifest.export["op_census"] == pascal_onnx.manifest.export["op_census"]


def test_export_graph_returns_the_saved_graph_without_its_weights(export_run):
    """With external data the returned proto is the graph alone (a compact copy), and its summary is the file's."""
    _, calls, _, snapshot = export_run
    (proto, summary, _), = calls["graph"]
    assert summary == read_summary(snapshot / "m.onnx") == GraphSummary.from_proto(proto)
    assert summary.external_data == ("m.onnx.data",)
    assert max(len(i.raw_data) for i in proto.graph.initializer) <= 1024
    assert proto.ByteSize() < (snapshot / "m.onnx.data").stat().st_size / 4


def test_the_export_raises_no_reduce_op_future_warning(export_run):
    """invpt's gc walk after the export (release_exporter_state) used to touch the deprecated
    torch.distributed.reduce_op (tests/test_warnings.py shows that touching it warns)."""
    _, calls, _, _ = export_run
    assert [m for c, m in calls["warnings"] if issubclass(c, FutureWarning) and "reduce_op" in m] == []


def test_the_phase_timer_lands_in_the_result_and_the_manifest(export_run):
    res, calls, _, _ = export_run
    t = calls["timer"]
    phases = ["check_s", "load_checkpoint_s", "torch_onnx_export_s", "graph_checks_s", "verification_pytorch_s",
              "verification_onnxruntime_s", "write_s"]
    assert list(t["seconds"]) == phases and t["seconds"] == res.timings
    if sys.platform.startswith("linux"):
        assert set(t["phase_peak_rss_bytes"]) == set(phases)  # exact for every phase (reset_peak)
        assert set(t["start_rss_bytes"]) == set(phases)
        assert t["process_peak_rss_bytes"] == max(t["peak_rss_bytes"].values()) >= max(t["phase_peak_rss_bytes"].values())
    recorded = res.manifest.timings  # written inside the last phase: every phase before it
    assert recorded["seconds"] == {k: v for k, v in res.timings.items() if k != "write_s"}
    assert recorded["phase_peak_rss_bytes"].keys() <= set(phases)


@linux_only
@pytest.mark.parametrize("reset", [True, False])
def test_phase_timer_peak_within_a_phase(reset):
    timer = PhaseTimer(reset_peak=reset)
    big = 192 * 2**20
    with timer.phase("small"):
        pass
    with timer.phase("outer"):
        with timer.phase("alloc"):
            block = np.ones(big, dtype=np.uint8)  # touched: resident
            del block
        with timer.phase("after"):
            pass
    t = timer.to_dict()
    peaks, start = t["phase_peak_rss_bytes"], t["start_rss_bytes"]
    assert peaks["alloc_s"] >= start["alloc_s"] + 0.9 * big
    assert peaks["outer_s"] >= peaks["alloc_s"]  # a nested phase's peak is its parent's too
    assert t["process_peak_rss_bytes"] >= peaks["alloc_s"]
    if reset:  # a new window per phase: the phase after the allocation did not reach its peak
        assert peaks["after_s"] < peaks["alloc_s"] - 0.5 * big
        assert "small_s" in peaks
    else:  # only where the process's peak rose is the phase's own peak known
        assert "after_s" not in peaks
    assert rss_bytes() is not None


def _small_model(tmp: Path) -> Path:
    """A model built in code with weights large enough to go external (and one small inline constant)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w2")
    b = numpy_helper.from_array(np.arange(8, dtype=np.float32), "b")  # 32 bytes: stays inline
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "w2"], ["y0"], name="mm2"),
             helper.make_node("Add", ["y0", "b"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [w1, w2, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    path = tmp / "ext" / "m.onnx"
    path.parent.mkdir()
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=1024)
    return path


@pytest.mark.parametrize("external_over", [None, 0])
def test_streamed_writer_writes_the_model_onnx_would(tmp_path, external_over):
    from invpt.export.onnx_export import inline_plan, write_streamed

    src = _small_model(tmp_path)
    graph = onnx.load(str(src), load_external_data=False)
    assert sum(i.data_location == TensorProto.EXTERNAL for i in graph.graph.initializer) == 2
    out = tmp_path / "out" / "w.onnx"
    out.parent.mkdir()
    written = write_streamed(graph, out, inline_plan(src.parent), external_over=external_over)
    assert written.sha256 == sha256_file(out)
    assert written.summary == read_summary(out)
    want = onnx.load(str(src))  # the model with its weights, as onnx loads it
    got = onnx.load(str(out))
    onnx.checker.check_model(str(out), full_check=True)
    assert [n.SerializeToString() for n in got.graph.node] == [n.SerializeToString() for n in want.graph.node]
    for a, b in zip(got.graph.initializer, want.graph.initializer):
        assert a.name == b.name and np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    if external_over is None:
        assert written.external_data == () and sorted(p.name for p in out.parent.iterdir()) == ["w.onnx"]
        assert written.summary.initializer_bytes == read_summary(src).initializer_bytes
    else:
        assert written.external_data == ("w.onnx.data",) and (out.parent / "w.onnx.data").is_file()


def test_streamed_writer_refuses_data_that_changed_size(tmp_path):
    from invpt.errors import ExportError
    from invpt.export.onnx_export import inline_plan, write_streamed

    src = _small_model(tmp_path)
    graph = onnx.load(str(src), load_external_data=False)
    plan = inline_plan(src.parent)

    def short(t):
        meta, n, data = plan(t)
        return (meta, n, (lambda: data()[:-4])) if n else (meta, n, data)

    with pytest.raises(ExportError, match="changed size"):
        write_streamed(graph, tmp_path / "bad.onnx", short)
