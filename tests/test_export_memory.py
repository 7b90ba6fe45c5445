"""What keeps the export of the real (ViT-L) model small and quick, pinned on the tiny model.

* One export reads its ONNX file once: the graph comes from the proto it just saved, the checker runs once by path,
  the file is hashed while its weights are written back into it.
* Nothing keeps the model's weights alive after the export (onnxscript's rewrite rules held the last graph).
* The shared phase timer records seconds and memory per phase (benchmarks read it instead of patching the stage).
* The streamed writer writes the same model ``onnx`` would, one tensor at a time.
"""
from __future__ import annotations

import gc
import shutil
import sys
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
    """One dynamic-batch, verified export the way ViT-L is processed (weights external until the end), with every
    ONNX read, check and hash counted."""
    import invpt.export.pipeline as pipeline
    import invpt.manifest as manifest

    folder = tmp_path_factory.mktemp("export_memory")
    ckpt = folder / "own.pth.tar"  # a checkpoint no other test maps
    shutil.copyfile(tiny_pascal_official_ckpt, ckpt)
    calls: dict[str, list] = {"load": [], "checker": [], "sha256": []}
    real_load, real_check, real_sha = onnx.load, onnx.checker.check_model, manifest.sha256_file
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "WORK_EXTERNAL_BYTES", 0)
        mp.setattr(onnx, "load", lambda f, *a, **k: calls["load"].append(str(f)) or real_load(f, *a, **k))
        mp.setattr(onnx, "load_model", lambda f, *a, **k: calls["load"].append(str(f)) or real_load(f, *a, **k))
        mp.setattr(onnx.checker, "check_model",
                   lambda m, *a, **k: calls["checker"].append(m if isinstance(m, (str, Path)) else "proto")
                   or real_check(m, *a, **k))
        for mod in (pipeline, manifest):
            mp.setattr(mod, "sha256_file", lambda p, *a, **k: calls["sha256"].append(Path(p)) or real_sha(p, *a, **k))
        res = pipeline.run_export(ckpt, folder / "out" / "m.onnx", dynamic_batch=True,
                                  timer=PhaseTimer(reset_peak=True))
    gc.collect()
    return res, calls, ckpt


def test_one_export_reads_its_onnx_once(export_run):
    res, calls, ckpt = export_run
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

    _, _, ckpt = export_run
    assert not _mapped(ckpt)
    held = [m for m in gc.get_objects() if issubclass(type(m), _matcher.PatternMatcher) and getattr(m, "_graph", None)]
    assert held == []


def test_the_phase_timer_lands_in_the_result_and_the_manifest(export_run):
    res, _, _ = export_run
    t = res.timer.to_dict()
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


def test_export_graph_returns_the_saved_graph_without_its_weights(tiny_pascal, tmp_path):
    """With external data the returned proto is the graph alone (a compact copy), and its summary is the file's."""
    from invpt.export.onnx_export import export_graph

    proto, summary = export_graph(tiny_pascal, tmp_path / "g.onnx", external_data="always", tasks=["sal"])
    assert summary == read_summary(tmp_path / "g.onnx") == GraphSummary.from_proto(proto)
    assert summary.external_data == ("g.onnx.data",)
    assert max(len(i.raw_data) for i in proto.graph.initializer) <= 1024
    assert proto.ByteSize() < (tmp_path / "g.onnx.data").stat().st_size / 4
