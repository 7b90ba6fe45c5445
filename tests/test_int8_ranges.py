"""INT8 ranges measured by invpt with bounded memory (invpt.calib.ranges), pinned on the tiny model.

* Exposing the measured tensors a few per session (bounded memory) gives exactly the ranges of one session over all.
* The Q/DQ model made from invpt's ranges is ModelOpt's own (ModelOpt calibrating the whole graph itself, same samples
  and steps): same nodes, same weights, same scales, for ``max`` and ``entropy``.
* ModelOpt asking for other ranges than invpt measured, or a failure while measuring, stops with a ToolError and
  leaves nothing behind.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from invpt.errors import ToolError
from invpt.export import run_export
from tests.test_memory import _photo_batch

BATCH = 2


@pytest.fixture(scope="module")
def tiny_dynamic(pascal_dynamic_onnx) -> Path:
    """The session's dynamic-batch tiny PASCAL export (shared read-only: outputs go under tmp_path)."""
    return pascal_dynamic_onnx.onnx_path


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    return _photo_batch(4)


@pytest.fixture(scope="module")
def prepared(tiny_dynamic, tmp_path_factory):
    """The tiny model as the range sessions and ModelOpt read it (weights in an external file), and its plan."""
    from invpt.calib.int8 import modelopt_logging
    from invpt.calib.policy import QUANTIZABLE_OPS
    from invpt.calib.ranges import plan_quantization, prepare_model

    with modelopt_logging():
        model = prepare_model(tiny_dynamic, tmp_path_factory.mktemp("prep") / "input.onnx", external_over=0)
        plan = plan_quantization(model, QUANTIZABLE_OPS, [], {"image": [BATCH, 3, 128, 128]})
    assert (model.parent / "input.onnx.data").is_file()
    return model, plan


def _steps(calib: np.ndarray) -> list[dict]:
    return [{"image": calib[i:i + BATCH]} for i in range(0, len(calib), BATCH)]


def test_plan_measures_the_inputs_of_the_quantized_nodes(prepared):
    model, plan = prepared
    g = onnx.load(str(model), load_external_data=False).graph
    by_name = {n.name: n for n in g.node}
    inits = {i.name for i in g.initializer}
    assert len(plan.nodes) > 50 and all(by_name[n].op_type in ("Conv", "MatMul", "Gemm") for n in plan.nodes)
    assert set(plan.tensors) == {t for n in plan.nodes for t in by_name[n].input if t and t not in inits}
    assert plan.gemv_excluded and not set(plan.gemv_excluded) & set(plan.nodes)  # the decoder's small attention
    assert plan.groups and all(t in plan.groups[m] for t, g_ in plan.groups.items() for m in g_)  # concat groups
    assert plan.step_bytes() > 0


@pytest.mark.parametrize("method", ["max", "entropy"])
def test_ranges_in_bounded_chunks_equal_one_session(prepared, calib, method):
    """Each tensor's accumulator sees the same steps whichever session exposes it: min/max and the merged histograms
    (hence the KL thresholds) are identical, not just close."""
    from invpt.calib.int8 import modelopt_logging
    from invpt.calib.ranges import compute_ranges

    model, plan = prepared
    with modelopt_logging():
        whole, one = compute_ranges(model, plan, _steps(calib), method, chunk_bytes=2**40)
        chunked, many = compute_ranges(model, plan, _steps(calib), method, chunk_bytes=plan.step_bytes() // 3)
    assert one.sessions == 1 and many.sessions >= 3 and many.steps == 2
    assert whole.keys() == chunked.keys() == set(plan.tensors)
    for t in plan.tensors:
        a, b = whole[t], chunked[t]
        assert np.array_equal(a.range_value, b.range_value), t
        if method == "entropy":
            assert np.array_equal(a.hist, b.hist) and np.array_equal(a.bins, b.bins), t
        else:
            assert a.range_value[0].shape == (1,) and a.range_value[0].dtype == np.float32  # ModelOpt's form
    for t, group in plan.groups.items():  # a concat group shares one range (ModelOpt's concat elimination)
        assert all(np.array_equal(whole[t].range_value, whole[m].range_value) for m in group)


def _graph(path: Path) -> tuple[list, dict]:
    proto = onnx.load(str(path))
    nodes = sorted((n.op_type, n.name, tuple(n.input), tuple(n.output), str(n.attribute)) for n in proto.graph.node)
    return nodes, {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}


@pytest.mark.parametrize("method", ["max", "entropy"])
def test_qdq_model_from_invpt_ranges_is_modelopts_own(tiny_dynamic, calib, method, tmp_path, caplog):
    """invpt's ranges + ModelOpt's Q/DQ insertion == ModelOpt calibrating the whole graph itself, same steps."""
    from invpt.calib.int8 import ENGINE_MODELOPT_WHOLE, ENGINE_RANGES, quantize_int8

    exclude = ["backbone.blocks.0.mlp.fc1/MatMul", "backbone.patch_embed.proj/Conv"]  # exercise the exclusions
    theirs, ours = tmp_path / "modelopt" / "m.onnx", tmp_path / "invpt" / "m.onnx"
    theirs.parent.mkdir()
    ours.parent.mkdir()
    rep_theirs, rep_ours = {}, {}
    with caplog.at_level("INFO", logger="invpt.calib"):
        quantize_int8(tiny_dynamic, theirs, calib, method, exclude, per_node=False, samples_per_step=BATCH,
                      report=rep_theirs)
        quantize_int8(tiny_dynamic, ours, calib, method, exclude, samples_per_step=BATCH, report=rep_ours)
    assert rep_theirs["engine"] == ENGINE_MODELOPT_WHOLE and rep_ours["engine"] == ENGINE_RANGES
    assert "ranges measured by invpt" in caplog.text
    assert rep_ours["ranges"]["steps"] == 2 and rep_ours["plan"]["nodes"] > 50
    nodes_a, inits_a = _graph(theirs)
    nodes_b, inits_b = _graph(ours)
    assert nodes_a == nodes_b
    assert sum(op == "QuantizeLinear" for op, *_ in nodes_a) > 50
    weights_dq = {out for op, _, ins, outs, _ in nodes_a if op == "DequantizeLinear" and ins[0] in inits_a
                  for out in outs}
    assert {name for _, name, *_ in nodes_a} >= set(exclude)
    for op, name, inputs, *_ in nodes_a:
        if name in exclude:  # excluded: still there, its weight not quantized
            assert not weights_dq & set(inputs), name
    assert inits_a.keys() == inits_b.keys()
    for k, a in inits_a.items():
        b = inits_b[k]
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), k
    assert sorted(p.name for p in ours.parent.iterdir()) == ["m.onnx"]  # no work files left beside the output


def test_range_cache_serves_the_models_quantize_int8_writes_alone(tiny_dynamic, calib, tmp_path):
    """The sensitivity sweep's cache: ranges measured once serve later plans, and each model equals the one
    quantize_int8 writes without the cache. Excluding one mix_proj Conv takes relu_1 out of the concat group ModelOpt
    gives one scale (its range is then its own, not the group's): that one tensor is measured again, nothing else."""
    from invpt.artifacts import private_copy
    from invpt.calib.int8 import RangeCache, quantize_int8

    src = private_copy(tiny_dynamic, tmp_path / "private")
    cache_dir = tmp_path / "cache"
    reports = []
    with RangeCache(cache_dir) as cache:
        for i, exclude in enumerate([[], ["multi_task_decoder.invpt.mix_proj.semseg.0/Conv"]]):
            alone, cached = tmp_path / f"alone{i}" / "m.onnx", tmp_path / f"cached{i}" / "m.onnx"
            alone.parent.mkdir()
            cached.parent.mkdir()
            quantize_int8(src, alone, calib, "entropy", exclude, samples_per_step=BATCH, input_is_private=True)
            rep: dict = {}
            quantize_int8(src, cached, calib, "entropy", exclude, samples_per_step=BATCH, input_is_private=True,
                          range_cache=cache, report=rep)
            reports.append(rep["ranges"])
            nodes_a, inits_a = _graph(alone)
            nodes_b, inits_b = _graph(cached)
            assert nodes_a == nodes_b, exclude
            assert inits_a.keys() == inits_b.keys()
            assert all(np.array_equal(inits_a[k], inits_b[k]) for k in inits_a), exclude
        assert cache_dir.is_dir()
        with pytest.raises(ValueError, match="one model, one set of calibration samples and one method"):
            quantize_int8(src, tmp_path / "m.onnx", calib, "max", [], samples_per_step=BATCH, input_is_private=True,
                          range_cache=cache)
        # The range relu_1 got alone is its own (a ReLU: nothing below 0), not its group's (the Concat with a Conv's
        # output). INT8 scales are symmetric, so on this graph both give the same scale and the models above cannot
        # tell them apart: hence this direct look at what the cache holds.
        grouped = next(g for (t, g) in cache._ranges if t == "relu_1" and g is not None)
        assert "cat_1" in grouped and cache._ranges[("relu_1", grouped)].range_value[0] < 0
        assert cache._ranges[("relu_1", None)].range_value[0] == 0
    first, second = reports
    assert first["measured"] == first["tensors"] > 50 and first["reused"] == 0
    assert second["measured"] == 1 and second["reused"] == second["tensors"] - 1 and second["sessions"] == 1
    assert cache.sessions == first["sessions"] + 1
    assert not cache_dir.exists()  # removed with the cache


def test_range_cache_bookkeeping(tmp_path):
    """What the cache measures and serves, with a stand-in for the measuring step: the warm-up plan is measured once
    (more tensors than the first plan needs: measured, none 'reused'), later plans are served, a tensor whose concat
    group differs is measured again, and the counts are never negative."""
    from types import SimpleNamespace

    from onnxruntime.quantization.calibrate import CalibrationMethod

    from invpt.calib.int8 import RangeCache
    from invpt.calib.ranges import QuantPlan

    from onnxruntime.quantization.calibrate import TensorsData

    calls = []

    def measure(p):  # measurement k gives tensor number i the range (-k, 10 k + i): which one served is visible
        calls.append(list(p.tensors))
        k = len(calls)
        data = TensorsData(CalibrationMethod.MinMax, {t: (np.float32(-k), np.float32(10 * k + i))
                                                      for i, t in enumerate(p.tensors)})
        return data, SimpleNamespace(sessions=1, steps=2, seconds=0.0)

    def got(data) -> dict:
        return {t: tuple(float(v) for v in d.range_value) for t, d in data.data.items()}

    g = frozenset({"a", "b"})
    warm = QuantPlan(nodes=["n1", "n2", "n3"], tensors=["a", "b", "c"], groups={"a": g, "b": g})
    first = QuantPlan(nodes=["n3"], tensors=["c"])
    regrouped = QuantPlan(nodes=["n1"], tensors=["a"])  # "a" alone: its own range, not the group's
    with RangeCache(tmp_path / "c") as cache:
        data, info = cache.ranges_for(first, measure, lambda: warm)
        assert calls == [["a", "b", "c"]] and got(data) == {"c": (-1.0, 12.0)}
        assert (info["tensors"], info["measured"], info["reused"], info["sessions"]) == (1, 3, 0, 1)
        data, info = cache.ranges_for(QuantPlan(nodes=["n1", "n2"], tensors=["a", "b"], groups={"a": g, "b": g}),
                                      measure, lambda: warm)
        assert len(calls) == 1 and got(data) == {"a": (-1.0, 10.0), "b": (-1.0, 11.0)}
        assert (info["measured"], info["reused"], info["sessions"]) == (0, 2, 0)
        data, info = cache.ranges_for(regrouped, measure, lambda: warm)
        assert calls[-1] == ["a"] and got(data) == {"a": (-2.0, 20.0)}
        assert (info["measured"], info["reused"], info["sessions"]) == (1, 0, 1)
        assert (cache.sessions, cache.measured, cache.served) == (2, 4, 2)


def test_modelopt_asking_for_other_ranges_is_a_tool_error(prepared, calib, tmp_path):
    """Never ranges for other tensors: if ModelOpt's node choice differs from the plan, the calibrator refuses."""
    from dataclasses import replace

    from invpt.calib.int8 import modelopt_logging
    from invpt.calib.policy import QUANTIZABLE_OPS
    from invpt.calib.ranges import compute_ranges, quantize_with_ranges

    model, plan = prepared
    with modelopt_logging():
        ranges, _ = compute_ranges(model, plan, _steps(calib[:BATCH]), "max")
        wrong = replace(plan, nodes=plan.nodes[1:])
        with pytest.raises(ToolError, match="asked for other ranges than invpt measured"):
            quantize_with_ranges(model, tmp_path / "q.onnx", wrong, ranges, "max", [], QUANTIZABLE_OPS,
                                 {"image": [BATCH, 3, 128, 128]})
    assert list(tmp_path.iterdir()) == []


def test_failure_while_measuring_is_a_tool_error_and_leaves_nothing(tiny_dynamic, calib, tmp_path, monkeypatch):
    from invpt.calib import ranges
    from invpt.calib.int8 import quantize_int8

    def broken(*a, **k):
        raise RuntimeError("session could not be created")

    monkeypatch.setattr(ranges, "_open_session", broken)
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    with pytest.raises(ToolError, match="measuring INT8 max ranges"):
        quantize_int8(tiny_dynamic, out, calib, "max", [], samples_per_step=BATCH)
    assert list(out.parent.iterdir()) == []


def test_engine_choice(tiny_dynamic, tmp_path):
    from invpt.calib.int8 import (
        ENGINE_MODELOPT_PER_NODE,
        ENGINE_MODELOPT_WHOLE,
        ENGINE_ORT,
        ENGINE_RANGES,
        calibration_engine,
    )

    assert calibration_engine(tiny_dynamic, "entropy") == ENGINE_RANGES
    assert calibration_engine(tiny_dynamic, "max", None) == ENGINE_RANGES
    assert calibration_engine(tiny_dynamic, "max", True) == ENGINE_MODELOPT_PER_NODE
    assert calibration_engine(tiny_dynamic, "entropy", False) == ENGINE_MODELOPT_WHOLE
    assert calibration_engine(tiny_dynamic, "percentile", None) == ENGINE_ORT
    old = onnx.load(str(tiny_dynamic))
    old.opset_import[0].version = 17  # ModelOpt converts such a model first: it calibrates it itself
    onnx.save(old, str(tmp_path / "old.onnx"))
    assert calibration_engine(tmp_path / "old.onnx", "entropy") == ENGINE_MODELOPT_WHOLE
