"""invpt-infer and invpt-init end to end (in-process ``main([...])``) on the tiny presets: unique ids, bad images,
atomic outputs, device and input checks before the model is loaded, and init's refusal of bad --out paths."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.helpers import write_test_image
import torch

import invpt
from invpt.cli.infer import main as infer_main
from invpt.cli.init import main as init_main

PASCAL_LABEL_TASKS = ("semseg", "human_parts")


def _tree(root: Path) -> dict[str, bytes]:
    """Every file below root (hidden ones too) -> its bytes: to show inputs unchanged / nothing left behind."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _expected_files(tasks=("semseg", "human_parts", "sal", "normals", "edge"), raw=False) -> set[str]:
    names = {"overview.png"}
    for t in tasks:
        names.add(f"{t}.png")
        if t in PASCAL_LABEL_TASKS:
            names.add(f"{t}_ids.png")
        if raw:
            names.add(f"{t}.npy")
    return names


def _assert_complete(folder: Path, size_hw: tuple[int, int], raw: bool = False) -> None:
    """Every output of one image exists, decodes, has the image's size; no temporary file is left."""
    assert {p.name for p in folder.iterdir()} == _expected_files(raw=raw)
    for p in folder.iterdir():
        if p.suffix == ".png":
            img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            assert img is not None, p
            if p.name != "overview.png":
                assert img.shape[:2] == size_hw, p
        else:
            arr = np.load(p)
            assert arr.shape[-2:] == size_hw and np.isfinite(arr).all()


# ---- ids and outputs ------------------------------------------------------------------------------------------

def test_same_name_in_two_subfolders_gives_two_outputs(tiny_pascal_official_ckpt, tmp_path, capsys):
    src = tmp_path / "photos"
    write_test_image(src / "a" / "x.jpg", 30)
    write_test_image(src / "b" / "x.jpg", 200, h=48, w=32)
    before = _tree(src)
    out = tmp_path / "preds"
    assert infer_main(["--ckpt", str(tiny_pascal_official_ckpt), str(src), "--out", str(out), "--save-raw"]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/*") if p.is_dir()) == ["a/x", "b/x"]
    _assert_complete(out / "a" / "x", (40, 56), raw=True)
    _assert_complete(out / "b" / "x", (48, 32), raw=True)
    # the two images got different predictions (not one folder written twice)
    assert (out / "a/x/overview.png").read_bytes() != (out / "b/x/overview.png").read_bytes()
    assert _tree(src) == before
    assert "2 image(s)" in capsys.readouterr().err


def test_outputs_get_the_normal_file_mode(tiny_pascal_official_ckpt, tmp_path):
    write_test_image(tmp_path / "in" / "x.png", 10)
    old = os.umask(0o022)
    try:
        assert infer_main(["--ckpt", str(tiny_pascal_official_ckpt), str(tmp_path / "in" / "x.png"),
                           "--out", str(tmp_path / "o"), "--save-raw", "--tasks", "sal"]) == 0
    finally:
        os.umask(old)
    npy = tmp_path / "o" / "x" / "sal.npy"
    assert stat.S_IMODE(npy.stat().st_mode) == 0o644
    assert np.load(npy).shape == (2, 40, 56)  # sal: 2 logits at image size


def test_one_corrupt_image_is_skipped_and_reported(tiny_pascal_official_ckpt, tmp_path, capsys):
    src = tmp_path / "in"
    write_test_image(src / "good1.png", 20)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole JPEG")
    write_test_image(src / "sub" / "good2.jpg", 220)
    before = _tree(src)
    out = tmp_path / "out"
    assert infer_main(["--ckpt", str(tiny_pascal_official_ckpt), str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 of 3 image(s) skipped" in err and str(src / "broken.jpg") in err
    assert "could not be decoded" in err  # the warning says why
    _assert_complete(out / "good1", (40, 56))
    _assert_complete(out / "sub" / "good2", (40, 56))
    assert not (out / "broken").exists()
    assert not [p for p in out.rglob(".*")]  # no temporary files left
    assert _tree(src) == before


# ---- checks before the model is loaded ------------------------------------------------------------------------

def test_missing_input_folder_is_refused_before_loading(no_load, tiny_pascal_official_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    code = infer_main(["--ckpt", str(tiny_pascal_official_ckpt), str(tmp_path / "nope"), "--out", str(out)])
    assert code == 2 and not out.exists()
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_empty_input_folder_is_refused_before_loading(no_load, tiny_pascal_official_ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    assert infer_main(["--ckpt", str(tiny_pascal_official_ckpt), str(tmp_path / "empty"),
                       "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tasks", ["", "semseg,bogus"])
def test_bad_tasks_are_refused_before_loading(no_load, tiny_pascal_official_ckpt, tmp_path, tasks, capsys):
    write_test_image(tmp_path / "in" / "x.png", 1)
    assert infer_main(["--ckpt", str(tiny_pascal_official_ckpt), str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                       "--tasks", tasks]) == 2
    assert "--tasks" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_tasks_not_in_the_given_config_are_refused_before_loading(no_load, tiny_pascal_official_ckpt, tmp_path, capsys):
    write_test_image(tmp_path / "in" / "x.png", 1)
    assert infer_main(["--ckpt", str(tiny_pascal_official_ckpt), "--config", "tiny_pascal", str(tmp_path / "in"),
                       "--out", str(tmp_path / "o"), "--tasks", "depth"]) == 2  # a NYUD task
    assert "depth" in capsys.readouterr().err


def test_missing_checkpoint_is_refused_before_reading_images(no_load, tmp_path, capsys):
    write_test_image(tmp_path / "in" / "x.png", 1)
    assert infer_main(["--ckpt", str(tmp_path), str(tmp_path / "in"), "--out", str(tmp_path / "o")]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_out_inside_the_input_folder_is_refused(no_load, tiny_pascal_official_ckpt, tmp_path, capsys):
    src = tmp_path / "in"
    write_test_image(src / "x.png", 1)
    before = _tree(src)
    for out in (src / "preds", src):
        assert infer_main(["--ckpt", str(tiny_pascal_official_ckpt), str(src), "--out", str(out)]) == 2
        assert "inside the input folder" in capsys.readouterr().err
    assert _tree(src) == before


def test_out_that_is_an_input_file_is_refused(no_load, tiny_pascal_official_ckpt, tmp_path, capsys):
    img = write_test_image(tmp_path / "x.png", 1)
    before = img.read_bytes()
    assert infer_main(["--ckpt", str(tiny_pascal_official_ckpt), str(img), "--out", str(img)]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert img.read_bytes() == before


def test_out_symlinked_into_an_input_folder_is_refused(tiny_pascal_official_ckpt, tmp_path, capsys):
    src = tmp_path / "in"
    write_test_image(src / "x.png", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").symlink_to(src, target_is_directory=True)  # out/x/overview.png would land in the input folder
    before = _tree(src)
    assert infer_main(["--ckpt", str(tiny_pascal_official_ckpt), str(src), "--out", str(out)]) == 2
    assert "input folder" in capsys.readouterr().err
    assert _tree(src) == before


@pytest.mark.parametrize("device, patch, expect", [
    ("bogus", None, "not a torch device"),
    ("cuda", {"is_available": False}, "no CUDA GPU"),
    ("cuda:3", {"is_available": True, "device_count": 1}, "sees 1 CUDA GPU"),
])
def test_unusable_device_is_refused_before_loading(no_load, monkeypatch, tiny_pascal_official_ckpt, tmp_path, capsys,
                                                   device, patch, expect):
    for name, value in (patch or {}).items():
        monkeypatch.setattr(torch.cuda, name, lambda v=value: v)
    write_test_image(tmp_path / "in" / "x.png", 1)
    assert infer_main(["--ckpt", str(tiny_pascal_official_ckpt), str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                       "--device", device]) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_nonfinite_checkpoint_fails_infer_with_exit_2(tiny_pascal, tmp_path, capsys):
    sd = {k: v.clone() for k, v in tiny_pascal.state_dict().items()}
    sd["heads.semseg.linear_pred.bias"][3] = float("nan")
    ckpt = tmp_path / "nan.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, ckpt)
    write_test_image(tmp_path / "in" / "x.png", 1)
    assert infer_main(["--ckpt", str(ckpt), str(tmp_path / "in"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "heads.semseg.linear_pred.bias" in err
    assert not (tmp_path / "o").exists()


def test_random_init_with_ckpt_is_refused(no_load, tiny_pascal_official_ckpt, tmp_path):
    write_test_image(tmp_path / "in" / "x.png", 1)
    assert infer_main(["--config", "tiny_pascal", "--random-init", "--ckpt", str(tiny_pascal_official_ckpt),
                       str(tmp_path / "in"), "--out", str(tmp_path / "o")]) == 2


def test_help_documents_skipping_and_exit_codes(capsys):
    with pytest.raises(SystemExit):
        infer_main(["--help"])
    text = capsys.readouterr().out
    assert "skipped with a warning" in text and "exit code 2" in text



# ---- --mode letterbox -----------------------------------------------------------------------------------------

def test_letterbox_writes_outputs_at_the_original_size(tiny_pascal_official_ckpt, tiny_pascal, tmp_path, capsys):
    """Images larger than the 128x128 model (which --mode pad skips) are letterboxed; every output, raw ones
    included, is at the image's own size, and the raw maps are the model's letterboxed outputs restored."""
    from invpt.data.transforms import preprocess, read_image, restore_geometry

    src = tmp_path / "in"
    write_test_image(src / "wide.png", 60, h=150, w=300)
    write_test_image(src / "tall.jpg", 140, h=260, w=90)
    before = _tree(src)
    out = tmp_path / "o"
    assert infer_main(["--ckpt", str(tiny_pascal_official_ckpt), str(src), "--out", str(out), "--mode", "letterbox",
                       "--save-raw"]) == 0
    _assert_complete(out / "wide", (150, 300), raw=True)
    _assert_complete(out / "tall", (260, 90), raw=True)
    assert _tree(src) == before
    # the raw semseg map is the model's output on the letterboxed input, mapped back (crop, then bilinear)
    x, info = preprocess(read_image(src / "wide.png"), tiny_pascal.cfg.image_size, "letterbox")
    assert info.scaled and info.resized_hw == (64, 128)
    tiny = invpt.load_model(tiny_pascal_official_ckpt)
    with torch.no_grad():
        raw = tiny(torch.from_numpy(x)[None], tasks=["semseg"])["semseg"][0].numpy()
    np.testing.assert_allclose(np.load(out / "wide" / "semseg.npy"), restore_geometry(raw, info), atol=1e-4)
    ids = cv2.imread(str(out / "wide" / "semseg_ids.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(ids, restore_geometry(raw, info).argmax(axis=0))

    # the same images in pad mode are skipped (too large) with advice naming letterbox
    capsys.readouterr()
    assert infer_main(["--ckpt", str(tiny_pascal_official_ckpt), str(src / "wide.png"), "--out",
                       str(tmp_path / "p"), "--mode", "pad"]) == 2
    err = capsys.readouterr().err
    assert "--mode letterbox" in err and "never crops" in err
    assert not (tmp_path / "p" / "wide").exists()


def test_letterbox_equals_pad_for_an_image_that_fits(tiny_pascal_official_ckpt, tmp_path):
    img = write_test_image(tmp_path / "in" / "x.png", 90, h=100, w=70)
    outs = {}
    for mode in ("pad", "letterbox"):
        assert infer_main(["--ckpt", str(tiny_pascal_official_ckpt), str(img), "--out", str(tmp_path / mode),
                           "--mode", mode, "--save-raw", "--tasks", "semseg,normals"]) == 0
        outs[mode] = _tree(tmp_path / mode)
    assert outs["pad"].keys() == outs["letterbox"].keys() and outs["pad"]
    for name in outs["pad"]:
        if name.endswith(".npy"):
            np.testing.assert_array_equal(np.load(tmp_path / "pad" / name), np.load(tmp_path / "letterbox" / name))
        else:
            assert outs["pad"][name] == outs["letterbox"][name], name


def test_help_explains_when_to_choose_each_mode(capsys):
    with pytest.raises(SystemExit):
        infer_main(["--help"])
    text = capsys.readouterr().out
    assert "{resize,pad,letterbox}" in text and "Choosing --mode" in text
    for mode in ("resize", "pad", "letterbox"):
        assert f"\n  {mode} " in text, mode


def test_unknown_mode_is_refused(no_load, tiny_pascal_official_ckpt, tmp_path, capsys):
    write_test_image(tmp_path / "in" / "x.png", 1)
    with pytest.raises(SystemExit) as exc:
        infer_main(["--ckpt", str(tiny_pascal_official_ckpt), str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                    "--mode", "fit"])
    assert exc.value.code == 2 and "letterbox" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

# ---- invpt-init -----------------------------------------------------------------------------------------------

def test_init_writes_a_loadable_checkpoint_with_the_normal_mode(tmp_path):
    out = tmp_path / "new" / "tiny.pth"
    old = os.umask(0o022)
    try:
        assert init_main(["--config", "tiny_pascal", "--out", str(out)]) == 0
        mode_022 = stat.S_IMODE(out.stat().st_mode)
        os.umask(0o027)
        assert init_main(["--config", "tiny_pascal", "--out", str(out), "--official-format", "--seed", "3"]) == 0
        mode_027 = stat.S_IMODE(out.stat().st_mode)
    finally:
        os.umask(old)
    assert (mode_022, mode_027) == (0o644, 0o640)
    assert invpt.load_model(out).cfg.name == "tiny_pascal"  # the replaced file is the new, official one
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.pth"]  # no temporary file left


def test_init_to_a_directory_is_refused(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    assert init_main(["--config", "tiny_pascal", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "Traceback" not in err
    assert list((tmp_path / "d").iterdir()) == []


def test_init_to_a_read_only_directory_is_refused(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user (root) for whom a read-only folder is writable")
        assert init_main(["--config", "tiny_pascal", "--out", str(ro / "m.pth")]) == 2
        assert "not writable" in capsys.readouterr().err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_init_when_the_write_itself_fails_is_a_paragraph(tmp_path, monkeypatch, capsys):
    """A read-only file system (or a folder that turns read-only after the checks) fails at the write: exit 2."""
    import invpt.atomic as atomic

    def read_only(path, *args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(atomic, "open_temp_beside", read_only)  # the one writer every file goes through
    assert init_main(["--config", "tiny_pascal", "--out", str(tmp_path / "m.pth")]) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and str(tmp_path / "m.pth") in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_init_below_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    assert init_main(["--config", "tiny_pascal", "--out", str(f / "m.pth")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert f.read_text() == "keep me"


def test_init_to_a_fifo_is_refused(tmp_path, capsys):
    fifo = tmp_path / "pipe.pth"
    os.mkfifo(fifo)
    assert init_main(["--config", "tiny_pascal", "--out", str(fifo)]) == 2
    assert "FIFO" in capsys.readouterr().err
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


@pytest.mark.parametrize("name", ["model.json", "tiny_pascal.yaml", "m.onnx"])
def test_init_to_a_non_checkpoint_name_is_refused(tmp_path, capsys, name):
    assert init_main(["--config", "tiny_pascal", "--out", str(tmp_path / name)]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_init_never_overwrites_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    notes = tmp_path / "notes.pth"
    notes.write_text("my notes, not weights")
    assert init_main(["--config", "tiny_pascal", "--out", str(notes)]) == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err
    assert notes.read_text() == "my notes, not weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.pth"]


def test_init_with_a_bad_config_writes_nothing(tmp_path, capsys):
    assert init_main(["--config", "no_such_preset", "--out", str(tmp_path / "m.pth")]) == 2
    assert "no_such_preset" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_preset_name_still_works_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    """A folder called tiny_pascal in the working directory (e.g. an earlier --out) does not shadow the preset."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny_pascal").mkdir()
    assert init_main(["--config", "tiny_pascal", "--out", "m.pth"]) == 0
    assert invpt.load_model(tmp_path / "m.pth").cfg.name == "tiny_pascal"


def test_config_that_is_a_fifo_says_so(tmp_path, capsys):
    os.mkfifo(tmp_path / "cfg.yaml")
    assert init_main(["--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "m.pth")]) == 2
    assert "is a FIFO" in capsys.readouterr().err and not (tmp_path / "m.pth").exists()
