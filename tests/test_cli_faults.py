"""Bad input and faults in the newer command-line tools: one test per case the reliability review found handled badly.

Each test asserts the exit code, a message fragment naming the file or flag at fault, and that nothing the user owns
changed and nothing was left behind. The ids (T25, P19, B05, D08, E21, S05, ...) are the review's case numbers: T
invpt-trt-build, P invpt-parity, B invpt-bench, D invpt-deploy, E invpt-eval, R invpt-train, S invpt-synth-data.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import tree_digest

HUGE = "1000000000"  # images or batch: terabytes, on any machine


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def no_export(monkeypatch):
    """Fail the test if invpt-deploy reaches its export (seconds of tracing): its checks must all come before it."""
    import invpt.export.pipeline as pipeline

    def never(*a, **k):
        raise AssertionError("invpt-deploy exported before its checks refused the run")

    monkeypatch.setattr(pipeline, "run_export", never)


# ---- invpt-trt-build -----------------------------------------------------------------------------------------------
def test_trt_build_refuses_an_unverifiable_precision_onnx_left_beside_the_input(pascal_onnx, copy_artifact, capsys):
    """T25: a leftover m.fp16.onnx without a manifest: refused as a file invpt will not overwrite (was: 'export the
    model with invpt-export instead of using a bare ONNX file', which named the wrong file's fix)."""
    from invpt.engines.cli import main

    onnx = copy_artifact(pascal_onnx.onnx_path)
    leftover = onnx.with_name("m.fp16.onnx")
    leftover.write_bytes(b"partial")
    before = tree_digest(onnx.parent)
    assert main(["--onnx", str(onnx), "--fp16", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"'{leftover}' exists but cannot be reused" in err and "does not overwrite it" in err
    assert tree_digest(onnx.parent) == before  # no plan, no FP16 ONNX, no lock or staging folder


def test_trt_build_ckpt_refuses_an_unverifiable_onnx_at_the_export_target(tiny_pascal_official_ckpt, tmp_path,
                                                                          capsys):
    """T25 (--ckpt path): an ONNX where the export would go, with no manifest, is named and kept."""
    from invpt.engines.cli import main

    out = tmp_path / "e" / "m.plan"
    out.parent.mkdir()
    target = out.parent / "tiny_pascal_official.onnx"
    target.write_bytes(b"not an onnx")
    assert main(["--ckpt", str(tiny_pascal_official_ckpt), "--fp32", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"'{target}' exists but cannot be reused" in err and "Manifest" in err
    assert _files(out.parent) == ["tiny_pascal_official.onnx"] and target.read_bytes() == b"not an onnx"


@pytest.mark.parametrize("target", ["checkpoint", "other_manifest"])
def test_trt_build_never_writes_over_a_file_it_did_not_make(pascal_onnx, copy_artifact, tiny_pascal_official_ckpt,
                                                            capsys, target):
    """T05/T42: --out t.pth replaced the checkpoint with a plan (exit 0); --out m.fp16 wrote the plan's manifest
    over m.fp16.json, the manifest of m.fp16.onnx, which then no longer loaded."""
    from invpt.engines.cli import main

    onnx = copy_artifact(pascal_onnx.onnx_path)
    folder = onnx.parent
    if target == "checkpoint":
        out = folder / "t.pth"
        shutil.copyfile(tiny_pascal_official_ckpt, out)
        fragment = f"Output '{out}' already exists and is not an invpt artifact"
    else:
        copy_artifact(pascal_onnx.onnx_path)  # m.onnx + m.json again; m.fp16.json stands for another artifact's
        shutil.copyfile(folder / "m.json", folder / "m.fp16.json")
        out = folder / "m.fp16"
        fragment = f"'{folder / 'm.fp16.json'}' already exists and is the manifest of"
    before = tree_digest(folder)
    assert main(["--onnx", str(onnx), "--fp32", "--out", str(out), "--no-progress"]) == 2
    assert fragment in capsys.readouterr().err
    assert tree_digest(folder) == before


# ---- invpt-parity / invpt-bench ------------------------------------------------------------------------------------
def test_parity_refuses_samples_that_cannot_fit_in_memory(tiny_pascal_official_ckpt, pascal_onnx, tmp_path, capsys):
    """P19: --samples 10**9 without --data was a raw MemoryError traceback (exit 1)."""
    from invpt.runtime.parity_cli import main

    out = tmp_path / "rep"
    assert main(["--ckpt", str(tiny_pascal_official_ckpt), "--model", str(pascal_onnx.onnx_path), "--samples", HUGE,
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--samples {HUGE} needs at least" in err and "Pass a smaller --samples" in err
    assert "Traceback" not in err and not out.exists()


def test_bench_refuses_a_batch_that_cannot_fit_in_memory(pascal_dynamic_onnx, tmp_path, capsys):
    """B05: --batch 10**9 on a dynamic-batch ONNX was a raw MemoryError traceback (exit 1)."""
    from invpt.runtime.bench_cli import main

    out = tmp_path / "b"
    assert main(["--model", str(pascal_dynamic_onnx.onnx_path), "--batch", HUGE, "--iters", "1", "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--batch {HUGE} needs at least" in err and "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--autocast", "fp16"], "--autocast fp16 times PyTorch under CUDA autocast, but --device is 'cpu'"),  # B12
    (["--device", "bogus"], "Device 'bogus' is not a torch device"),  # B14
])
def test_bench_checks_the_pytorch_device_before_loading_the_checkpoint(tiny_pascal_official_ckpt, tmp_path, capsys,
                                                                       monkeypatch, argv, fragment):
    """B12/B14: --device / --autocast were checked only after the checkpoint was loaded (seconds for ViT-L)."""
    import invpt.runtime.load as load
    from invpt.runtime.bench_cli import main

    def never(*a, **k):
        raise AssertionError("the checkpoint was loaded before the flags were checked")

    monkeypatch.setattr(load, "reference_runner", never)
    out = tmp_path / "b"
    assert main(["--ckpt", str(tiny_pascal_official_ckpt), *argv, "--out", str(out)]) == 2
    assert fragment in capsys.readouterr().err and not out.exists()


def test_bench_refuses_device_flags_without_a_checkpoint(pascal_onnx, tmp_path, capsys):
    """B20: --device cuda with only --model artifacts was silently ignored."""
    from invpt.runtime.bench_cli import main

    out = tmp_path / "b"
    assert main(["--model", str(pascal_onnx.onnx_path), "--device", "cuda", "--out", str(out)]) == 2
    assert "needs --ckpt" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("case", ["out_is_data", "out_inside_data", "user_report_file", "user_visuals"])
def test_parity_report_folder_never_lands_on_files_it_did_not_make(tiny_pascal_official_ckpt, pascal_onnx, tmp_path,
                                                                  capsys, case):
    """P11/P12: --out equal to the --data image folder wrote the report among the images (and the next run compared
    its own PNGs as images); a folder holding the user's parity.md had it overwritten (both exit 0)."""
    from invpt.runtime.parity_cli import main

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copyfile(Path(__file__).resolve().parents[1] / "assets" / "chelsea.jpg", imgs / "cat.jpg")
    out = {"out_is_data": imgs, "out_inside_data": imgs / "rep"}.get(case, tmp_path / "rep")
    if case == "user_report_file":
        out.mkdir()
        (out / "parity.md").write_text("my notes")
    elif case == "user_visuals":
        (out / "visuals").mkdir(parents=True)
        (out / "visuals" / "x.png").write_bytes(b"mine")
    before = tree_digest(tmp_path)
    assert main(["--ckpt", str(tiny_pascal_official_ckpt), "--model", str(pascal_onnx.onnx_path), "--samples", "1",
                 "--data", str(imgs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert ("the image folder" in err) if case.startswith("out_") else ("which invpt did not write" in err)
    assert tree_digest(tmp_path) == before


def test_parity_and_bench_rerun_into_their_own_report_folder(tiny_pascal_official_ckpt, pascal_onnx, tmp_path,
                                                             capsys):
    """Their own earlier reports are replaced (the ownership check recognises them); a user's file is not."""
    from invpt.runtime.bench_cli import main as bench
    from invpt.runtime.parity_cli import main as parity

    rep = tmp_path / "rep"
    for _ in range(2):
        assert parity(["--ckpt", str(tiny_pascal_official_ckpt), "--model", str(pascal_onnx.onnx_path),
                       "--samples", "1", "--out", str(rep)]) == 0
        assert bench(["--model", str(pascal_onnx.onnx_path), "--iters", "1", "--warmup", "0",
                      "--out", str(rep / "b")]) == 0
    (rep / "c").mkdir()
    (rep / "c" / "bench.md").write_text("my notes")  # B15: was overwritten
    assert bench(["--model", str(pascal_onnx.onnx_path), "--iters", "1", "--out", str(rep / "c")]) == 2
    assert "bench.md, which invpt did not write" in capsys.readouterr().err
    assert (rep / "c" / "bench.md").read_text() == "my notes"


# ---- invpt-deploy --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, precision", [
    ("--iters", "0", "fp32"),  # D08
    ("--samples", "0", "fp32"),  # D09
    ("--calib-samples", "0", "fp32,fp16"),  # D10
    ("--warmup", "-1", "fp32"),  # D14
    ("--holdout-samples", "0", "fp32,fp16"),  # D15
])
def test_deploy_checks_every_count_before_the_export(tiny_pascal_official_ckpt, tmp_path, capsys, no_export,
                                                     flag, value, precision):
    """D08-D15: these were refused only after the export (and D08/D14 after the parity report), leaving ck.onnx,
    its manifest and parity/ in --out."""
    from invpt.runtime.deploy_cli import main

    out = tmp_path / "d"
    assert main(["--ckpt", str(tiny_pascal_official_ckpt), "--out", str(out), "--precision", precision,
                 "--no-engines", flag, value]) == 2
    assert f"{flag} must be an integer >= " in capsys.readouterr().err
    assert not out.exists()


def test_deploy_refuses_a_batch_that_cannot_fit_before_quantizing(tiny_pascal_official_ckpt, pascal_dynamic_onnx,
                                                                  tmp_path, capsys, monkeypatch):
    """D20: a huge --batch failed only in the latency stage, after the FP16 ONNX, engines and parity were made."""
    import invpt.calib.pipeline as calib
    from invpt.runtime.deploy_cli import main

    def never(*a, **k):
        raise AssertionError("quantized before --batch was checked")

    monkeypatch.setattr(calib, "run_quantize", never)
    out = tmp_path / "d"
    out.mkdir()
    # the FP32 ONNX a previous run exported from this checkpoint: reused after verification, so nothing is exported
    shutil.copyfile(pascal_dynamic_onnx.onnx_path, out / "tiny_pascal_official.onnx")
    shutil.copyfile(pascal_dynamic_onnx.manifest_path, out / "tiny_pascal_official.json")
    before = tree_digest(out)
    assert main(["--ckpt", str(tiny_pascal_official_ckpt), "--out", str(out), "--precision", "fp32,fp16",
                 "--no-engines", "--batch", HUGE]) == 2
    assert f"--batch {HUGE} needs at least" in capsys.readouterr().err
    after = tree_digest(out)
    assert {k: v for k, v in after.items() if not k.startswith(".")} == before  # only the publish lock file is new


@pytest.mark.parametrize("case", ["user_summary", "out_is_data"])
def test_deploy_report_folder_never_lands_on_files_it_did_not_make(tiny_pascal_official_ckpt, tmp_path, capsys,
                                                                   no_export, case):
    """D08: a folder holding the user's summary.md had it overwritten; D24: --out equal to --data wrote every artifact
    and report among the images (both exit 0). Both are refused before the export."""
    from invpt.runtime.deploy_cli import main

    out = tmp_path / "d"
    out.mkdir()
    data = tmp_path / "imgs"
    data.mkdir()
    shutil.copyfile(Path(__file__).resolve().parents[1] / "assets" / "chelsea.jpg", data / "cat.jpg")
    if case == "user_summary":
        (out / "summary.md").write_text("# my deployment notes")
    else:
        out = data
    before = tree_digest(tmp_path)
    assert main(["--ckpt", str(tiny_pascal_official_ckpt), "--out", str(out), "--data", str(data), "--precision",
                 "fp32", "--no-engines"]) == 2
    err = capsys.readouterr().err
    assert ("summary.md, which invpt did not write" in err) if case == "user_summary" else ("the image folder" in err)
    assert tree_digest(tmp_path) == before


def test_deploy_never_presents_another_checkpoint_as_the_embedded_default(tiny_nyud_official_ckpt,
                                                                         tiny_pascal_official_ckpt, tmp_path, capsys,
                                                                         no_export):
    """D07: without --ckpt, a NYUD checkpoint found at OUT/tiny_pascal.pth was deployed as 'the embedded tiny_pascal
    model' (exit 0, a NYUD ONNX named tiny_pascal.onnx, parity PASS). A checkpoint of the default's architecture is
    still used as it is (a rerun of the demo)."""
    from invpt.runtime.deploy import default_checkpoint
    from invpt.runtime.deploy_cli import main

    out = tmp_path / "d"
    out.mkdir()
    shutil.copyfile(tiny_nyud_official_ckpt, out / "tiny_pascal.pth")
    before = tree_digest(tmp_path)
    assert main(["--out", str(out), "--precision", "fp32", "--no-engines"]) == 2
    err = capsys.readouterr().err
    assert f"'{out / 'tiny_pascal.pth'}' exists but is not invpt-deploy's embedded default model" in err
    assert "nyud_v2 model" in err and "--ckpt" in err
    assert tree_digest(tmp_path) == before
    shutil.copyfile(tiny_pascal_official_ckpt, out / "tiny_pascal.pth")  # the same architecture: used as it is
    assert default_checkpoint(out) == out / "tiny_pascal.pth"


def test_deploy_refuses_to_reuse_a_static_batch_onnx(tiny_pascal_official_ckpt, pascal_onnx, tmp_path, capsys):
    """D04/D06: a static-batch ONNX from invpt-export was reused although invpt-deploy promises (and times) a
    dynamic-batch one; --batch 1,2 then failed after parity had rewritten the reports."""
    from invpt.runtime.deploy_cli import main

    out = tmp_path / "d"
    out.mkdir()
    shutil.copyfile(pascal_onnx.onnx_path, out / "tiny_pascal_official.onnx")
    shutil.copyfile(pascal_onnx.manifest_path, out / "tiny_pascal_official.json")
    before = tree_digest(out)
    assert main(["--ckpt", str(tiny_pascal_official_ckpt), "--out", str(out), "--precision", "fp32",
                 "--no-engines"]) == 2
    assert "static batch of 1" in capsys.readouterr().err
    assert {k: v for k, v in tree_digest(out).items() if not k.startswith(".")} == before


@pytest.mark.parametrize("flag", ["--data", "--calib-data"])
def test_deploy_refuses_an_empty_image_folder_before_the_export(tiny_pascal_official_ckpt, tmp_path, capsys,
                                                                no_export, flag):
    """D20/D22: an empty --data / --calib-data folder was found only after the export (its files left in --out)."""
    from invpt.runtime.deploy_cli import main

    (tmp_path / "empty").mkdir()
    out = tmp_path / "d"
    precision = "fp32,int8" if flag == "--calib-data" else "fp32"
    assert main(["--ckpt", str(tiny_pascal_official_ckpt), "--out", str(out), "--precision", precision,
                 "--no-engines", flag, str(tmp_path / "empty")]) == 2
    assert f"'{tmp_path / 'empty'}' contains no images" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# ---- invpt-eval ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pascal_data(tmp_path_factory) -> Path:
    from invpt.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synth_faults")
    make_synthetic("pascal_context", root, n_train=1, n_val=2, seed=0)
    return root


def test_eval_refuses_a_non_empty_predictions_folder(tiny_pascal_official_ckpt, pascal_data, tmp_path, capsys):
    """E21: predictions were written into a folder holding another run's files (mixed silently)."""
    from invpt.train.eval_cli import main

    preds = tmp_path / "p"
    (preds / "semseg").mkdir(parents=True)
    (preds / "semseg" / "old.png").write_bytes(b"old")
    before = tree_digest(tmp_path)
    assert main(["--ckpt", str(tiny_pascal_official_ckpt), "--data", str(pascal_data), "--out",
                 str(tmp_path / "r.json"), "--workers", "0", "--save-predictions", str(preds)]) == 2
    assert f"--save-predictions '{preds}' is not empty" in capsys.readouterr().err
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("argv, fragment", [
    (["--save-predictions", "P", "--save-tasks", "bogus"], "--save-tasks names unknown task(s) bogus"),  # E12
    (["--save-tasks", "edge"], "no --save-predictions folder was given"),  # E22
    (["--save-predictions", "P", "--save-tasks", "depth"], "does not predict it"),  # E12, the model's own tasks
])
def test_eval_checks_save_tasks_before_evaluating(tiny_pascal_official_ckpt, pascal_data, tmp_path, capsys,
                                                  monkeypatch, argv, fragment):
    """E12/E22: --save-tasks was checked after the model and the data were loaded, by the name 'save_tasks', and
    ignored without --save-predictions."""
    import invpt.data.multitask as multitask
    from invpt.train.eval_cli import main

    def never(*a, **k):
        raise AssertionError("the dataset was opened before --save-tasks was checked")

    monkeypatch.setattr(multitask, "MultiTaskDataset", never)
    argv = [str(tmp_path / "p") if a == "P" else a for a in argv]
    assert main(["--ckpt", str(tiny_pascal_official_ckpt), "--data", str(pascal_data), "--out",
                 str(tmp_path / "r.json"), "--workers", "0", *argv]) == 2
    assert fragment in capsys.readouterr().err
    assert _files(tmp_path) == []


def test_eval_names_a_checkpoint_of_the_other_dataset(tiny_nyud_official_ckpt, pascal_data, tmp_path, capsys):
    """E04 (and R09 for invpt-train): a NYUD-v2 model on PASCAL-Context data named a missing gt_sets/val.txt."""
    from invpt.train.eval_cli import main

    assert main(["--ckpt", str(tiny_nyud_official_ckpt), "--data", str(pascal_data), "--out",
                 str(tmp_path / "r.json"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert f"'{pascal_data}' holds PASCAL-Context data, but the model is a NYUD-v2 model" in err
    assert _files(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True])
def test_eval_that_fails_midway_leaves_no_partial_predictions(tiny_pascal_official_ckpt, tmp_path, capsys, existing):
    """E25: a corrupt validation image stopped the run (exit 2) after the first image's predictions were written;
    they stayed, a partial set an offline evaluation would read as the split (and the rerun was refused)."""
    from invpt.data.synthetic import make_synthetic
    from invpt.train.eval_cli import main

    root = make_synthetic("pascal_context", tmp_path / "data", n_train=1, n_val=2, seed=0)
    ids = (root / "ImageSets" / "Context" / "val.txt").read_text().split()
    (root / "JPEGImages" / f"{ids[-1]}.jpg").write_bytes(b"not a jpeg")
    preds = tmp_path / "p"
    if existing:
        preds.mkdir()  # an empty folder the user made: kept, empty
    assert main(["--ckpt", str(tiny_pascal_official_ckpt), "--data", str(tmp_path / "data"), "--out",
                 str(tmp_path / "r.json"), "--workers", "0", "--batch", "1", "--save-predictions", str(preds)]) == 2
    assert f"{ids[-1]}" in capsys.readouterr().err
    assert (list(preds.iterdir()) == []) if existing else not preds.exists()
    assert not (tmp_path / "r.json").exists()


# ---- invpt-synth-data ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, fragment", [
    (["--seed", "-1"], "--seed must be an integer >= 0"),  # S05: ValueError traceback, and left --out behind
    (["--size", "100000", "100000"], "both sides in 32..4096"),  # S09: MemoryError traceback
])
def test_synth_data_refuses_bad_numbers(tmp_path, capsys, argv, fragment):
    from invpt.data.synthetic import main

    out = tmp_path / "o"
    assert main(["--dataset", "nyud_v2", "--out", str(out), "--train", "1", "--val", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and not out.exists()


def test_synth_data_refuses_an_out_path_through_a_file(tmp_path, capsys):
    """S10: --out f/sub with f a file was a NotADirectoryError traceback (S06, a read-only folder, takes the same
    check_output_dir path)."""
    from invpt.data.synthetic import main

    (tmp_path / "f").write_text("keep")
    assert main(["--dataset", "pascal_context", "--out", str(tmp_path / "f" / "sub")]) == 2
    assert f"--out '{tmp_path / 'f' / 'sub'}' cannot be created" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "keep" and _files(tmp_path) == ["f"]


def test_synth_data_target_that_is_a_file(tmp_path, capsys):
    """S08: a file where the dataset folder goes was reported as 'already exists and is not empty'."""
    from invpt.data.synthetic import main

    (tmp_path / "NYUDv2").write_text("keep")
    assert main(["--dataset", "nyud_v2", "--out", str(tmp_path)]) == 2
    assert f"'{tmp_path / 'NYUDv2'}' exists and is not a folder" in capsys.readouterr().err
    assert (tmp_path / "NYUDv2").read_text() == "keep" and _files(tmp_path) == ["NYUDv2"]


def test_synth_data_removes_the_staging_folder_of_a_killed_run(tmp_path):
    """S07/S11: the staging folder a killed run leaves (its lock no longer held) is removed by the next run; before,
    every killed run left a hidden partial dataset in --out for good."""
    from invpt.data.synthetic import make_synthetic

    stale = tmp_path / ".PASCALContext.staging.dead"
    (stale / "data").mkdir(parents=True)
    (stale / ".lock").touch()
    (stale / "data" / "partial.jpg").write_bytes(b"x")
    make_synthetic("pascal_context", tmp_path, n_train=1, n_val=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PASCALContext"]


def test_synth_data_interrupted_leaves_nothing(tmp_path, monkeypatch):
    """S12: an interrupted run left the --out folder it had created (and, killed, its staging folder)."""
    import invpt.data.synthetic as synthetic

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_pascal_sample", interrupt)
    with pytest.raises(KeyboardInterrupt):
        synthetic.make_synthetic("pascal_context", tmp_path / "new" / "o", n_train=1, n_val=1)
    assert _files(tmp_path) == []
