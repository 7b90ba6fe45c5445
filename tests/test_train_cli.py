"""invpt-train and invpt-eval end to end (in-process ``main([...])``) on a micro model and synthetic data: outputs,
reports, cropped predictions, and every bad input refused with exit 2 and a message that names the problem."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from invpt.train.cli import main as train_main
from invpt.train.eval_cli import main as eval_main

REPO = Path(__file__).resolve().parents[1]
MICRO = {
    "name": "micro_pascal",
    "dataset": "pascal_context",
    "image_size": [64, 64],
    "backbone": {"depth": 3, "embed_dim": 48, "num_heads": 2, "taps": [1, 2, 3], "drop_path_rate": 0.1},
    "decoder": {"embed_dim": 32, "pred_channels": 16},
}
FAST = ["--workers", "0", "--progress", "none", "--tensorboard", "off", "--eval-batch", "2", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Synthetic PASCAL data (images smaller than the model: padded), the micro config as YAML, one short run."""
    from invpt.data.synthetic import make_synthetic

    base = tmp_path_factory.mktemp("cli")
    data = base / "data"
    make_synthetic("pascal_context", data, n_train=4, n_val=3, size=(64, 64), seed=7)
    cfg = base / "micro.yaml"
    cfg.write_text(yaml.safe_dump(MICRO))
    run = base / "run"
    code = train_main(["--config", str(cfg), "--data", str(data), "--out", str(run), "--max-iter", "4",
                       "--checkpoint-every", "2", "--eval-every", "2", *FAST])
    assert code == 0
    return {"data": data, "cfg": cfg, "run": run, "base": base}


def test_train_cli_writes_the_run(setup, capsys):
    run = setup["run"]
    for name in ("last.pth", "ckpt_000002.pth", "ckpt_000004.pth", "final.pth", "final_official.pth.tar",
                 "train_log.csv", "eval/iter_000002.json", "eval/iter_000004.md"):
        assert (run / name).is_file(), name
    header = (run / "train_log.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["iteration", "epoch", "lr", "seconds", "total"] and "inter_edge" in header
    report = json.loads((run / "eval" / "iter_000004.json").read_text())
    assert report["iteration"] == 4 and report["images"] == 3
    assert set(report["scores"]) == {"semseg", "human_parts", "sal", "normals", "edge"}


def test_eval_cli_reports_and_cropped_predictions(setup, tmp_path, capsys):
    data, run = setup["data"], setup["run"]
    out = tmp_path / "rep" / "eval.json"
    preds = tmp_path / "preds"
    code = eval_main(["--ckpt", str(run / "last.pth"), "--data", str(data), "--out", str(out), "--workers", "0",
                      "--batch", "2", "--save-predictions", str(preds)])
    assert code == 0
    report = json.loads(out.read_text())
    scores = report["scores"]
    assert {"mIoU", "IoU"} <= set(scores["semseg"]) and "mIoU" in scores["human_parts"]
    assert {"maxF", "maxF_prob"} <= set(scores["sal"]) and "mean" in scores["normals"] and "loss" in scores["edge"]
    assert report["images"] == 3 and report["split"] == "val"
    # the same weights and data as the run's final evaluation: the same numbers
    final = json.loads((run / "eval" / "iter_000004.json").read_text())["scores"]
    assert scores["semseg"]["mIoU"] == pytest.approx(final["semseg"]["mIoU"], rel=1e-9)
    assert scores["normals"]["mean"] == pytest.approx(final["normals"]["mean"], rel=1e-6)
    md = out.with_suffix(".md").read_text()
    assert "| semseg | mIoU |" in md and "| normals | mean |" in md
    # predictions are cropped back to each image's own (unpadded) size
    ids = (data / "PASCALContext" / "ImageSets" / "Context" / "val.txt").read_text().split()
    for image_id in ids:
        h, w = cv2.imread(str(data / "PASCALContext" / "JPEGImages" / f"{image_id}.jpg")).shape[:2]
        for task in ("semseg", "edge", "sal"):
            png = cv2.imread(str(preds / task / f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
            assert png.shape[:2] == (h, w), (task, image_id)
        assert cv2.imread(str(preds / "normals" / f"{image_id}.png")).shape == (h, w, 3)
    sizes = [cv2.imread(str(data / "PASCALContext" / "JPEGImages" / f"{i}.jpg")).shape[:2] for i in ids]
    assert any(s != (64, 64) for s in sizes)  # the synthetic images really are padded


def test_eval_cli_default_report_path_and_summary(setup, capsys):
    run = setup["run"]
    code = eval_main(["--ckpt", str(run / "final.pth"), "--data", str(setup["data"]), "--workers", "0"])
    assert code == 0
    assert (run / "final.eval_val.json").is_file() and (run / "final.eval_val.md").is_file()
    err = capsys.readouterr().err
    assert "eval ok" in err and "semseg mIoU" in err


def test_cli_modules_import_without_torch():
    """``--help`` stays fast: the CLI modules and the package face import no torch (checked in a fresh interpreter)."""
    code = ("import sys; import invpt.train.cli, invpt.train.eval_cli, invpt.train; "
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


def test_help_of_both_explains_every_flag(capsys):
    for main, flags in ((train_main, ["--config", "--data", "--out", "--resume", "--max-iter", "--batch",
                                       "--backbone-weights", "--bf16", "--grad-checkpointing", "--freeze-bn-stats",
                                       "torchrun --nproc_per_node 4", "--nnodes 2"]),
                        (eval_main, ["--ckpt", "--data", "--split", "--save-predictions", "--out", "--config"])):
        with pytest.raises(SystemExit) as exc:
            main(["--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        for flag in flags:
            assert flag in text, flag


# ---- bad inputs: exit 2, one message naming the problem, before any training step -------------------------------

def _train(setup, out, *extra):
    return train_main(["--config", str(setup["cfg"]), "--data", str(setup["data"]), "--out", str(out),
                       "--max-iter", "2", "--eval-every", "0", "--no-final-eval", *FAST, *extra])


def test_missing_label_file_is_named(setup, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    victim = sorted((data / "PASCALContext" / "sal_distill").iterdir())[0]
    victim.unlink()
    code = train_main(["--config", str(setup["cfg"]), "--data", str(data), "--out", str(tmp_path / "o"), *FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert "missing" in err and victim.name in err
    assert not (tmp_path / "o").exists()


def test_label_out_of_range_names_the_file_even_from_a_worker(setup, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    for png in (data / "PASCALContext" / "semseg" / "VOC12").glob("*.png"):
        cv2.imwrite(str(png), np.full((50, 50), 60, np.uint8))  # class 60 of 21 (and the wrong size)
    for png in (data / "PASCALContext" / "semseg" / "pascal-context").glob("*.png"):
        cv2.imwrite(str(png), np.full((50, 50), 60, np.uint8))
    code = train_main(["--config", str(setup["cfg"]), "--data", str(data), "--out", str(tmp_path / "o"),
                       "--max-iter", "2", "--eval-every", "0", "--no-final-eval", *FAST[2:], "--workers", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "semseg" in err and ("outside the valid range" in err or "size" in err)
    assert "Original Traceback" not in err  # the worker's traceback text is unwrapped into the one message


def test_out_that_is_a_file_or_inside_the_data_is_refused(setup, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert _train(setup, f) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert _train(setup, setup["data"] / "PASCALContext" / "runs") == 2
    assert "inside the data folder" in capsys.readouterr().err


def test_existing_run_needs_resume(setup, capsys):
    assert _train(setup, setup["run"]) == 2
    assert "already holds a training run" in capsys.readouterr().err


def test_resume_with_other_tasks_is_refused(setup, tmp_path, capsys):
    cfg = tmp_path / "other.yaml"
    cfg.write_text(yaml.safe_dump(dict(MICRO, tasks=["semseg", "sal"])))
    code = train_main(["--config", str(cfg), "--data", str(setup["data"]), "--out", str(tmp_path / "r"),
                       "--resume", str(setup["run"] / "ckpt_000002.pth"), *FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert "differs from the config stored in the resumed checkpoint" in err and "tasks" in err


def test_resume_without_out_or_a_model_checkpoint(setup, tmp_path, capsys):
    assert train_main(["--data", str(setup["data"]), "--resume"]) == 2
    assert "--resume without a checkpoint path needs --out" in capsys.readouterr().err
    assert train_main(["--data", str(setup["data"]), "--out", str(tmp_path / "o"),
                       "--resume", str(setup["run"] / "final.pth")]) == 2
    assert "not a training checkpoint" in capsys.readouterr().err
    assert train_main(["--data", str(setup["data"]), "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "last.pth' does not exist" in capsys.readouterr().err


def test_eval_config_that_disagrees_with_the_checkpoint(setup, tmp_path, capsys):
    cfg = tmp_path / "other.yaml"
    cfg.write_text(yaml.safe_dump(dict(MICRO, tasks=["semseg", "normals"])))
    code = eval_main(["--ckpt", str(setup["run"] / "last.pth"), "--config", str(cfg), "--data", str(setup["data"]),
                      "--out", str(tmp_path / "r.json"), "--workers", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "disagrees with the config stored in checkpoint" in err and "tasks" in err
    # an official checkpoint (no stored config): the shape check names the task mismatch
    code = eval_main(["--ckpt", str(setup["run"] / "final_official.pth.tar"), "--config", str(cfg), "--data",
                      str(setup["data"]), "--out", str(tmp_path / "r.json"), "--workers", "0"])
    assert code == 2
    assert "wrong dataset or tasks" in capsys.readouterr().err


def test_eval_bad_outputs(setup, tmp_path, capsys):
    ckpt = str(setup["run"] / "last.pth")
    data = str(setup["data"])
    assert eval_main(["--ckpt", ckpt, "--data", data, "--out", str(tmp_path / "r.pth")]) == 2
    assert "must end in .json" in capsys.readouterr().err
    assert eval_main(["--ckpt", ckpt, "--data", data, "--out", str(Path(data) / "r.json")]) == 2
    assert "inside the data folder" in capsys.readouterr().err
    assert eval_main(["--ckpt", ckpt, "--data", data, "--out", str(tmp_path / "r.json"),
                      "--save-predictions", str(Path(data) / "PASCALContext" / "preds")]) == 2
    assert "overlaps the data folder" in capsys.readouterr().err
    (tmp_path / "d.json").mkdir()
    assert eval_main(["--ckpt", ckpt, "--data", data, "--out", str(tmp_path / "d.json")]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_nan_loss_exits_2_naming_the_iteration(setup, tmp_path, capsys, monkeypatch):
    from invpt.train.losses import MultiTaskLoss

    original = MultiTaskLoss.forward

    def poisoned(self, outputs, targets):
        out = original(self, outputs, targets)
        out["total"] = out["total"] + float("inf")
        return out

    monkeypatch.setattr(MultiTaskLoss, "forward", poisoned)
    assert _train(setup, tmp_path / "n") == 2
    err = capsys.readouterr().err
    assert "Training diverged at iteration 1" in err and "--lr" in err
    assert "No checkpoint was written yet" in err
