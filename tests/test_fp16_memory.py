"""FP16 conversion without a copy of the model in memory, pinned on the tiny model.

invpt runs AutoCast's steps on the graph alone (weights left in the private copy's external-data file) and converts
the weights one at a time while the output is written (calib/fp16.py). The FP16 model must be exactly the one
AutoCast's ``convert_to_mixed_precision`` writes (same nodes, same initializers to the byte), the two weight-reading
rules (data range, ``init_max``) must select what AutoCast's would, and the stage must read the input once.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from invpt.manifest import sha256_file
from invpt.onnx_summary import read_summary

KEEP_OPS = ["LayerNormalization", "Softmax"]


def _autocast(onnx_path: Path, tmp: Path, keep_nodes=(), **kw) -> onnx.ModelProto:
    """What AutoCast itself makes of the model, called the way invpt called it before (a private copy without
    value_info, as one file for a model this small; data_max=inf; standalone type inference)."""
    from modelopt.onnx.autocast import convert_to_mixed_precision

    from invpt.calib.fp16 import _strip_value_info
    from invpt.calib.int8 import modelopt_logging
    from invpt.calib.policy import exact_name_regexes

    clean = tmp / "autocast_in" / "input.onnx"
    clean.parent.mkdir()
    _strip_value_info(onnx_path, clean)
    assert not (clean.parent / "input.onnx.data").exists()
    with modelopt_logging():
        return convert_to_mixed_precision(str(clean), "fp16", nodes_to_exclude=exact_name_regexes(keep_nodes),
                                          op_types_to_exclude=KEEP_OPS, keep_io_types=True, data_max=np.inf,
                                          use_standalone_type_inference=True, **kw)


def _assert_same_model(ours: onnx.ModelProto, theirs: onnx.ModelProto) -> None:
    assert (ours.ir_version, list(ours.opset_import), list(ours.metadata_props)) == \
        (theirs.ir_version, list(theirs.opset_import), list(theirs.metadata_props))
    for field in ("node", "input", "output", "value_info"):
        a = [m.SerializeToString() for m in getattr(ours.graph, field)]
        b = [m.SerializeToString() for m in getattr(theirs.graph, field)]
        assert a == b, field
    # Initializers in the same order, each the same message (name, type, dims and every byte of its data).
    assert [i.SerializeToString() for i in ours.graph.initializer] == \
        [i.SerializeToString() for i in theirs.graph.initializer]


@pytest.fixture(scope="module")
def big_weight(pascal_onnx, tmp_path_factory):
    """The tiny model with one MatMul weight beyond FP16's range (1e5 > 65504), so that the conversion compared with
    AutoCast exercises its initializer-range rule too: (path, the weight's name, its consumers)."""
    proto = onnx.load(str(pascal_onnx.onnx_path))
    big = next(i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2)
    arr = onnx.numpy_helper.to_array(big).copy()
    arr.flat[0] = 1e5
    big.CopyFrom(onnx.numpy_helper.from_array(arr, big.name))
    src = tmp_path_factory.mktemp("big") / "big.onnx"
    onnx.save(proto, str(src))
    consumers = [n.name for n in proto.graph.node if big.name in n.input]
    assert consumers
    return src, big.name, consumers


@pytest.fixture(scope="module")
def ours(big_weight, tmp_path_factory):
    """invpt's FP16 conversion of that model (data-range rule off: the graph depends only on the policy and the
    weights)."""
    from invpt.calib.fp16 import convert_fp16_model

    out = tmp_path_factory.mktemp("fp16") / "m.fp16.onnx"
    return convert_fp16_model(big_weight[0], out, [], KEEP_OPS, data_max=np.inf)


def test_graph_and_weights_identical_to_autocast(big_weight, ours, tmp_path):
    """Byte for byte what AutoCast writes; the weight beyond FP16's range keeps its consumers in FP32 and stays FP32
    itself, as AutoCast's own init_max rule decides."""
    src, big_name, consumers = big_weight
    converted = onnx.load(str(ours.path))
    _assert_same_model(converted, _autocast(src, tmp_path))
    fp16 = [i for i in converted.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(fp16) > 20 and sum(i.data_type == onnx.TensorProto.FLOAT for i in converted.graph.initializer)
    kept = {i.name: i.data_type for i in converted.graph.initializer}
    assert kept[big_name] == onnx.TensorProto.FLOAT  # its consumers stayed FP32, so did the weight
    assert all(big_name in n.input for n in converted.graph.node if n.name in consumers)  # read as is, no Cast


def test_what_was_written_is_recorded_without_reading_it_again(ours):
    """The sha256 hashed while writing and the summary are those of the file on disk (the manifest uses them)."""
    assert ours.written.sha256 == sha256_file(ours.path)
    on_disk = read_summary(ours.path)
    assert ours.written.summary == on_disk and on_disk.external_data == ()
    assert not list(ours.path.parent.glob(".invpt-input.*"))  # the private copy is gone
    # The graph kept for the audit has every initializer (names and types) but no weights: only the small tensors
    # that were never external (<= 1 KiB) keep their data, and nothing points into the deleted private copy.
    assert [(i.name, i.data_type) for i in ours.graph.graph.initializer] == \
        [(i.name, i.data_type) for i in onnx.load(str(ours.path), load_external_data=False).graph.initializer]
    assert not any(i.external_data for i in ours.graph.graph.initializer)
    assert max(len(i.raw_data) for i in ours.graph.graph.initializer) <= 1024
    assert ours.graph.ByteSize() < ours.path.stat().st_size / 4


@pytest.fixture(scope="module")
def external_run(big_weight, tmp_path_factory):
    """One conversion watched two ways: every onnx.load recorded, loading weights into a whole model refused, and
    the single-file size limit lowered so that the FP16 weights go to an external-data file."""
    import onnx.external_data_helper as edh

    import invpt.export.onnx_export as onnx_export
    from invpt.calib.fp16 import convert_fp16_model

    def refuse(*a, **k):
        raise AssertionError("the weights were loaded into a whole model")

    loads = []
    real_load = onnx.load

    def counting_load(f, *a, **k):
        loads.append((str(f), k.get("load_external_data", True)))
        return real_load(f, *a, **k)

    folder = tmp_path_factory.mktemp("fp16_external")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(edh, "load_external_data_for_model", refuse)
        mp.setattr(onnx, "load", counting_load)
        mp.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1024)
        out = convert_fp16_model(big_weight[0], folder / "m.fp16.onnx", [], KEEP_OPS, data_max=np.inf)
    return out, loads


def test_autocast_never_holds_the_weights(big_weight, external_run):
    """No step loads the weights into a model: neither AutoCast's loader nor onnx.load of the private copy."""
    out, loads = external_run
    assert out.path.is_file()
    # Read once: the input, to make the private copy whose graph every later step is handed.
    assert loads == [(str(big_weight[0]), True)]


def test_range_rule_with_held_graph_matches_reading_the_file(pascal_onnx, tmp_path):
    """The range pass on the graph the stage holds (no re-read) measures what it measures from the file, and hands
    the graph back with its outputs unchanged."""
    from invpt.calib.fp16 import _strip_value_info, activation_absmax, nodes_over_range, range_feeds

    clean = tmp_path / "input.onnx"
    graph = _strip_value_info(pascal_onnx.onnx_path, clean, external_over=0)
    outputs = [o.SerializeToString() for o in graph.graph.output]
    feeds, _ = range_feeds(clean, None, summary=read_summary(clean))
    held, _ = activation_absmax(clean, feeds, chunk_bytes=4 * 2**20, graph=graph)
    read, _ = activation_absmax(clean, feeds, chunk_bytes=4 * 2**20)
    assert held == read and len(held) > 100
    assert [o.SerializeToString() for o in graph.graph.output] == outputs
    assert nodes_over_range(clean, held, 5.0, graph=graph) == nodes_over_range(clean, read, 5.0)


def test_output_over_the_size_limit_keeps_its_weights_external(external_run, ours):
    """Above the single-file limit the FP16 weights go to <name>.data (the same weights as in the single file)."""
    out, _ = external_run
    folder = out.path.parent
    assert out.written.external_data == ("m.fp16.onnx.data",) and (folder / "m.fp16.onnx.data").is_file()
    assert out.written.sha256 == sha256_file(out.path)
    onnx.checker.check_model(str(out.path), full_check=True)
    ext, single = onnx.load(str(out.path)), onnx.load(str(ours.path))
    assert [n.SerializeToString() for n in ext.graph.node] == [n.SerializeToString() for n in single.graph.node]
    a = {i.name: onnx.numpy_helper.to_array(i) for i in ext.graph.initializer}
    b = {i.name: onnx.numpy_helper.to_array(i) for i in single.graph.initializer}
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
