"""A stage's steps that need only an ONNX graph's structure take its GraphSummary instead of parsing the file again:
the precision policy's node selection (``select_nodes``) and the private copy's external-data files
(``private_copy``). Each gives what it gives from the file itself."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from invpt.artifacts import private_copy
from invpt.calib.policy import select_nodes
from invpt.errors import InputError
from invpt.onnx_summary import GraphSummary, external_data_locations, read_summary

onnx = pytest.importorskip("onnx")


@pytest.mark.parametrize("precision, policy, extra", [
    ("fp16", "default", ()),
    ("fp16", "layernorm-only", ("head.normals",)),
    ("int8", "default", ()),
    ("int8", "backbone-only", ("op.Resize",)),
])
def test_selection_from_the_summary_equals_selection_from_the_file(pascal_onnx, precision, policy, extra):
    path = pascal_onnx.onnx_path
    cfg, tasks = pascal_onnx.manifest.model_config, pascal_onnx.manifest.tasks
    from_file = select_nodes(path, precision, policy, extra, tasks, cfg.backbone.depth)
    from_summary = select_nodes(path, precision, policy, extra, tasks, cfg.backbone.depth,
                                summary=read_summary(path))
    proto = onnx.load(str(path), load_external_data=False)
    from_proto = select_nodes(path, precision, policy, extra, tasks, cfg.backbone.depth,
                              summary=GraphSummary.from_proto(proto))
    assert from_file.kept_nodes  # a selection that keeps nothing would make the comparison empty
    for other in (from_summary, from_proto):
        assert other.kept == from_file.kept
        assert other.to_dict() == from_file.to_dict()


def test_selection_from_a_summary_does_not_read_the_file(pascal_onnx, tmp_path):
    """With a summary the path is only a name: a file that is not there is never opened."""
    cfg, tasks = pascal_onnx.manifest.model_config, pascal_onnx.manifest.tasks
    summary = read_summary(pascal_onnx.onnx_path)
    sel = select_nodes(tmp_path / "absent.onnx", "int8", "default", (), tasks, cfg.backbone.depth, summary=summary)
    names = {n for n, _ in summary.nodes}
    assert sel.kept_nodes and set(sel.kept_nodes) <= names
    assert select_nodes(pascal_onnx.onnx_path, "int8", "default", (), tasks, cfg.backbone.depth).kept == sel.kept


# ---- external data: the summary names every file, the private copy uses it ------------------------------------------

def _model_with_two_data_files(folder: Path) -> Path:
    """A model whose initializer ``w`` lives in ``w.bin`` and whose Constant node's tensor lives in ``c.bin``."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import set_external_data

    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8), "w")
    c = numpy_helper.from_array(np.full((1, 8), 2.0, dtype=np.float32), "c")
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8])
    nodes = [helper.make_node("Constant", [], ["c_out"], value=c),
             helper.make_node("MatMul", ["image", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "c_out"], ["out"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]))
    set_external_data(model.graph.initializer[0], "w.bin")
    set_external_data(model.graph.node[0].attribute[0].t, "c.bin")
    path = folder / "two.onnx"
    onnx.save_model(model, str(path))  # writes each tensor's raw data to its file
    return path


def test_summary_external_data_names_files_of_node_attributes_too(tmp_path):
    src = _model_with_two_data_files(tmp_path / "user")
    assert sorted(p.name for p in src.parent.iterdir()) == ["c.bin", "two.onnx", "w.bin"]
    proto = onnx.load(str(src), load_external_data=False)
    assert external_data_locations(proto) == ["w.bin", "c.bin"]
    assert read_summary(src).external_data == ("c.bin", "w.bin")


def test_private_copy_from_a_summary_copies_every_data_file_without_parsing(tmp_path, monkeypatch):
    src = _model_with_two_data_files(tmp_path / "user")
    summary = read_summary(src)

    def no_parse(*args, **kwargs):
        raise AssertionError("private_copy parsed the model although it was given its summary")

    monkeypatch.setattr(onnx, "load", no_parse)
    monkeypatch.setattr(onnx, "load_model", no_parse)
    copy = private_copy(src, tmp_path / "stage", summary=summary)
    monkeypatch.undo()
    assert sorted(p.name for p in copy.parent.iterdir()) == ["c.bin", "two.onnx", "w.bin"]
    for name in ("c.bin", "two.onnx", "w.bin"):
        assert (copy.parent / name).read_bytes() == (src.parent / name).read_bytes()
    parsed = private_copy(src, tmp_path / "stage2")  # without a summary: the same files
    assert sorted(p.name for p in parsed.parent.iterdir()) == ["c.bin", "two.onnx", "w.bin"]
    out = onnx.reference.ReferenceEvaluator(str(copy)).run(None, {"image": np.ones((1, 8), np.float32)})[0]
    assert np.allclose(out, np.arange(64, dtype=np.float32).reshape(8, 8).sum(0) + 2.0)


def test_private_copy_from_a_summary_still_names_a_missing_data_file(tmp_path):
    src = _model_with_two_data_files(tmp_path / "user")
    summary = read_summary(src)
    (src.parent / "c.bin").unlink()
    with pytest.raises(InputError, match=r"c\.bin.*does not exist"):
        private_copy(src, tmp_path / "stage", summary=summary)
