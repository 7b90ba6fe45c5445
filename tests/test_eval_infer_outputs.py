"""invpt-eval and invpt-infer never replace a file they did not write: an existing --out report (or the .md beside
it) that is not invpt-eval's own report, and a file under invpt-infer's --out that is not recorded in its own
infer.json, are refused with exit 2 before the model is loaded, naming the file; their own earlier outputs are
replaced on a rerun."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import invpt
from invpt.cli.infer import main as infer_main
from invpt.train.eval_cli import main as eval_main
from tests.helpers import tree_digest, write_test_image


@pytest.fixture(scope="module")
def pascal_data(tmp_path_factory) -> Path:
    from invpt.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("eval_infer_data")
    make_synthetic("pascal_context", root, n_train=1, n_val=1, seed=0)
    return root


def _eval(ckpt: Path, data: Path, out: Path) -> int:
    return eval_main(["--ckpt", str(ckpt), "--data", str(data), "--out", str(out), "--batch", "1", "--workers", "0",
                      "--device", "cpu", "-q"])


def _infer(ckpt: Path, src: Path, out: Path, *extra: str) -> int:
    return infer_main(["--ckpt", str(ckpt), str(src), "--out", str(out), "-q", *extra])


# ---- invpt-eval ----------------------------------------------------------------------------------------------------
def test_eval_refuses_to_replace_an_onnx_manifest(no_load, tiny_pascal_official_ckpt, pascal_data, pascal_onnx,
                                                  copy_artifact, capsys):
    """--out exp/m.json, where m.json is the exported ONNX's invpt manifest: was overwritten (and m.md written)."""
    onnx = copy_artifact(pascal_onnx.onnx_path, "exp")
    man = onnx.with_suffix(".json")
    assert json.loads(man.read_text())["schema"] == "invpt.manifest"
    before = tree_digest(onnx.parent)
    assert _eval(tiny_pascal_official_ckpt, pascal_data, man) == 2
    err = capsys.readouterr().err
    assert f"'{man}'" in err and "invpt manifest" in err and "Choose another --out" in err
    assert tree_digest(onnx.parent) == before  # byte-identical, and no m.md beside it


def test_eval_refuses_to_replace_a_users_markdown_beside_the_report(no_load, tiny_pascal_official_ckpt, pascal_data,
                                                                    tmp_path, capsys):
    """--out userdir/notes.json, where userdir/notes.md is the user's: notes.md was overwritten with the table."""
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "notes.md").write_text("# my notes\n\nkeep these\n")
    before = tree_digest(user)
    assert _eval(tiny_pascal_official_ckpt, pascal_data, user / "notes.json") == 2
    err = capsys.readouterr().err
    assert f"'{user / 'notes.md'}'" in err and "not an invpt-eval report" in err
    assert tree_digest(user) == before  # notes.md unchanged, no notes.json written


def test_eval_refuses_to_replace_a_users_json(no_load, tiny_pascal_official_ckpt, pascal_data, tmp_path, capsys):
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "r.json").write_text('{"title": "my own", "scores": {}}\n')
    before = tree_digest(user)
    assert _eval(tiny_pascal_official_ckpt, pascal_data, user / "r.json") == 2
    err = capsys.readouterr().err
    assert f"'{user / 'r.json'}'" in err and "not an invpt-eval report" in err
    assert tree_digest(user) == before


def test_eval_rerun_replaces_its_own_report_and_an_older_one_without_schema(tiny_pascal_official_ckpt, pascal_data,
                                                                            tmp_path, capsys):
    out = tmp_path / "rep" / "r.json"
    assert _eval(tiny_pascal_official_ckpt, pascal_data, out) == 0
    report = json.loads(out.read_text())
    assert report["schema"] == "invpt.eval" and out.with_suffix(".md").is_file()
    assert _eval(tiny_pascal_official_ckpt, pascal_data, out) == 0  # its own report and table: replaced
    # a report of an invpt-eval that wrote no schema field is recognised by its keys
    del report["schema"]
    out.write_text(json.dumps(report, indent=2) + "\n")
    assert _eval(tiny_pascal_official_ckpt, pascal_data, out) == 0
    assert json.loads(out.read_text())["schema"] == "invpt.eval"
    capsys.readouterr()


# ---- invpt-infer ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["overview.png", "semseg_ids.png"])
def test_infer_refuses_to_replace_a_users_file_in_an_image_folder(no_load, tiny_pascal_official_ckpt, tmp_path,
                                                                  capsys, name):
    """--out inf_user, where inf_user/<id>/overview.png is the user's: it was overwritten (exit 0)."""
    src = write_test_image(tmp_path / "in" / "astronaut.png")
    out = tmp_path / "inf_user"
    (out / "astronaut").mkdir(parents=True)
    (out / "astronaut" / name).write_bytes(b"the user's own file")
    before = tree_digest(out)
    assert _infer(tiny_pascal_official_ckpt, src, out) == 2
    err = capsys.readouterr().err
    assert f"'{out / 'astronaut' / name}'" in err and "not written by invpt-infer" in err
    assert tree_digest(out) == before  # byte-identical, nothing added (no infer.json either)


def test_infer_refuses_a_users_infer_json(no_load, tiny_pascal_official_ckpt, tmp_path, capsys):
    src = write_test_image(tmp_path / "in" / "x.png")
    out = tmp_path / "o"
    out.mkdir()
    (out / "infer.json").write_text('{"mine": true}\n')
    before = tree_digest(out)
    assert _infer(tiny_pascal_official_ckpt, src, out) == 2
    err = capsys.readouterr().err
    assert f"'{out / 'infer.json'}'" in err
    assert tree_digest(out) == before


def test_infer_rerun_into_its_own_output_folder(tiny_pascal_official_ckpt, tmp_path, capsys):
    src = write_test_image(tmp_path / "in" / "x.png")
    out = tmp_path / "o"
    assert _infer(tiny_pascal_official_ckpt, src, out) == 0
    record = json.loads((out / "infer.json").read_text())
    assert record["schema"] == "invpt.infer" and "x/overview.png" in record["files"]
    (out / "x" / "notes.txt").write_text("the user's notes beside the predictions\n")  # a name invpt never writes
    first = (out / "x" / "semseg.png").read_bytes()
    assert _infer(tiny_pascal_official_ckpt, src, out) == 0
    assert (out / "x" / "notes.txt").read_text() == "the user's notes beside the predictions\n"
    assert (out / "x" / "semseg.png").read_bytes() == first
    # a rerun with --save-raw adds the .npy files and records them too
    assert _infer(tiny_pascal_official_ckpt, src, out, "--save-raw") == 0
    record = json.loads((out / "infer.json").read_text())
    assert "x/semseg.npy" in record["files"] and "x/overview.png" in record["files"]
    assert _infer(tiny_pascal_official_ckpt, src, out, "--save-raw") == 0
    capsys.readouterr()


def test_infer_refuses_its_own_output_edited_since(tiny_pascal_official_ckpt, tmp_path, capsys, monkeypatch):
    """A file invpt-infer wrote and the user then changed holds the user's work: not replaced either."""
    src = write_test_image(tmp_path / "in" / "x.png")
    out = tmp_path / "o"
    assert _infer(tiny_pascal_official_ckpt, src, out) == 0
    (out / "x" / "semseg.png").write_bytes(b"annotated by hand")
    before = tree_digest(out)
    capsys.readouterr()

    def _fail(*a, **k):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(invpt, "load_model", _fail)
    assert _infer(tiny_pascal_official_ckpt, src, out) == 2
    err = capsys.readouterr().err
    assert f"'{out / 'x' / 'semseg.png'}'" in err and "changed since" in err
    assert tree_digest(out) == before


def test_infer_refuses_a_users_file_where_an_image_folder_goes(no_load, tiny_pascal_official_ckpt, tmp_path, capsys):
    src = write_test_image(tmp_path / "in" / "x.png")
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_bytes(b"the user's file named like the image")
    before = tree_digest(out)
    assert _infer(tiny_pascal_official_ckpt, src, out) == 2
    assert f"'{out / 'x'}' is a file" in capsys.readouterr().err
    assert tree_digest(out) == before
