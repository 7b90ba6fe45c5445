"""invpt-train's output folder: the user's files are never replaced, a new run never mixes with an earlier run's
files, a run that fails before its first checkpoint leaves nothing of its own behind, the divergence advice matches
what is on disk, and an empty split file is named as it is (micro model, 2+2 synthetic images, 2 iterations)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from invpt.train.cli import main as train_main

MICRO = {
    "name": "micro_pascal",
    "dataset": "pascal_context",
    "image_size": [64, 64],
    "backbone": {"depth": 3, "embed_dim": 48, "num_heads": 2, "taps": [1, 2, 3], "drop_path_rate": 0.0},
    "decoder": {"embed_dim": 32, "pred_channels": 16},
}
NYUD_MICRO = {
    "name": "micro_nyud",
    "dataset": "nyud_v2", "tasks": ["depth"], "image_size": [64, 64],
    "backbone": {"depth": 3, "embed_dim": 48, "num_heads": 2, "taps": [1, 2, 3], "drop_path_rate": 0.0},
    "decoder": {"embed_dim": 32, "pred_channels": 16},
}
FAST = ["--workers", "0", "--progress", "none", "--tensorboard", "off", "--eval-batch", "2", "--device", "cpu",
        "--eval-every", "0", "--no-final-eval"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from invpt.data.synthetic import make_synthetic

    base = tmp_path_factory.mktemp("outs")
    make_synthetic("pascal_context", base / "data", n_train=2, n_val=2, size=(64, 64), seed=5)
    make_synthetic("nyud_v2", base / "nyud", n_train=2, n_val=2, size=(64, 64), seed=5)
    (base / "micro.yaml").write_text(yaml.safe_dump(MICRO))
    (base / "nyud.yaml").write_text(yaml.safe_dump(NYUD_MICRO))
    return base


def _train(env, out, *extra, data=None, cfg="micro.yaml"):
    return train_main(["--config", str(env / cfg), "--data", str(data or env / "data"), "--out", str(out),
                       "--max-iter", "2", "--lr", "1e-3", *FAST, *extra])


def _digests(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (relative path -> sha256)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _user_files(folder: Path) -> dict[str, str]:
    """The user's own files named like invpt-train's outputs (trn21), plus an unrelated note."""
    (folder / "eval").mkdir(parents=True)
    (folder / "final.pth").write_bytes(b"my own weights")
    (folder / "final_official.pth.tar").write_bytes(b"my own official weights")
    (folder / "eval" / "iter_000002.json").write_text('{"mine": true}\n')
    (folder / "notes.txt").write_text("keep me\n")
    return _digests(folder)


def _log_iterations(out: Path) -> list[int]:
    lines = (out / "train_log.csv").read_text().splitlines()[1:]
    return [int(line.split(",")[0]) for line in lines]


# ---- 1: files the tool did not write are never replaced ------------------------------------------------------------

def test_new_run_refuses_a_folder_with_the_users_files(env, tmp_path, capsys):
    out = tmp_path / "userdir4"
    before = _user_files(out)
    assert _train(env, out) == 2
    err = capsys.readouterr().err
    assert "final.pth" in err and str(out) in err and "did not write" in err
    assert _digests(out) == before  # byte-identical, nothing added


def test_resume_into_a_folder_with_the_users_files_is_refused(env, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(env, run, "--checkpoint-every", "1", "--keep-checkpoints", "0") == 0
    out = tmp_path / "userdir"
    before = _user_files(out)
    code = train_main(["--data", str(env / "data"), "--out", str(out), "--resume", str(run / "ckpt_000001.pth"),
                       "--max-iter", "2", "--lr", "1e-3", *FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert "final.pth" in err and "did not write" in err
    assert _digests(out) == before


def test_empty_folder_and_resume_of_its_own_run_still_work(env, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert _train(env, out, "--checkpoint-every", "1") == 0
    assert (out / "final.pth").is_file() and _log_iterations(out) == [1, 2]
    assert train_main(["--data", str(env / "data"), "--out", str(out), "--resume", "--max-iter", "3",
                       "--lr", "1e-3", *FAST]) == 0
    assert _log_iterations(out) == [1, 2, 3]
    capsys.readouterr()


# ---- 2: a new run never mixes with an earlier run's logs -----------------------------------------------------------

def test_new_run_after_a_diverged_one_starts_a_clean_log(env, tmp_path, capsys):
    out = tmp_path / "div"
    assert _train(env, out, "--lr", "1e30") == 2
    assert _train(env, out) == 0
    assert _log_iterations(out) == [1, 2]  # one run's rows, not two "iteration 1" rows
    capsys.readouterr()


def test_new_run_refuses_an_earlier_runs_leftover_log(env, tmp_path, capsys):
    out = tmp_path / "killed"
    out.mkdir()
    header = "iteration,epoch,lr,seconds,total,semseg,human_parts,sal,normals,edge,inter_semseg,inter_human_parts," \
             "inter_sal,inter_normals,inter_edge"
    (out / "train_log.csv").write_text(header + "\n1,0,0.5,0.1" + ",1.0" * 11 + "\n")
    before = _digests(out)
    assert _train(env, out) == 2
    err = capsys.readouterr().err
    assert "train_log.csv" in err and str(out) in err
    assert _digests(out) == before


def test_help_documents_the_output_folder_rules(capsys):
    with pytest.raises(SystemExit):
        train_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "never writes into a folder" in text and "did not write" in text


# ---- 3: a run that fails before its first checkpoint leaves nothing of its own ----------------------------------

def _corrupt_image(env, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(env / "data", data)
    first = (data / "PASCALContext" / "ImageSets" / "Context" / "train.txt").read_text().split()[0]
    (data / "PASCALContext" / "JPEGImages" / f"{first}.jpg").write_bytes(b"not a jpeg at all")
    return {"data": data}


def _nan_depth(env, tmp_path):
    import shutil

    data = tmp_path / "nyud"
    shutil.copytree(env / "nyud", data)
    for npy in (data / "NYUDv2" / "depth").glob("*.npy"):
        arr = np.load(npy)
        arr[0, 0] = np.nan
        np.save(npy, arr)
    return {"data": data, "cfg": "nyud.yaml"}


@pytest.mark.parametrize("case", ["corrupt_image", "nan_depth", "lr_1e30"])
@pytest.mark.parametrize("existing", [False, True])
def test_failure_before_the_first_checkpoint_leaves_nothing_behind(env, tmp_path, capsys, case, existing):
    kw = {"corrupt_image": _corrupt_image, "nan_depth": _nan_depth, "lr_1e30": lambda e, t: {}}[case](env, tmp_path)
    extra = ["--lr", "1e30"] if case == "lr_1e30" else []
    out = tmp_path / "new" / "run"
    if existing:
        out.mkdir(parents=True)
        (out / "notes.txt").write_text("keep me\n")
    before = _digests(out) if existing else None
    assert _train(env, out, *extra, **kw) == 2
    capsys.readouterr()
    if existing:
        assert _digests(out) == before  # the user's note stays, nothing of the run does
    else:
        assert not (tmp_path / "new").exists()


# ---- 4: the divergence advice matches the state on disk -------------------------------------------------------

def test_divergence_without_a_checkpoint_advises_a_new_run_with_a_sane_lr(env, tmp_path, capsys):
    out = tmp_path / "lr"
    assert _train(env, out, "--lr", "1e30") == 2
    err = capsys.readouterr().err
    assert "No checkpoint was written" in err and "--resume" not in err and "5e+29" not in err
    assert "--lr 2e-05" in err  # far above the default: the default, not a tenth


def test_divergence_after_a_checkpoint_advises_resume(env, tmp_path, capsys, monkeypatch):
    from invpt.train.losses import MultiTaskLoss

    original, calls = MultiTaskLoss.forward, []

    def poisoned(self, outputs, targets):
        out = original(self, outputs, targets)
        calls.append(1)
        if len(calls) >= 3:
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(MultiTaskLoss, "forward", poisoned)
    out = tmp_path / "ck"
    assert _train(env, out, "--max-iter", "4", "--checkpoint-every", "2") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "iteration 3" in err and "last.pth" in err and "--resume --lr 0.0005" in err
    assert (out / "last.pth").is_file() and (out / "train_log.csv").is_file()  # the resumable run is kept


# ---- 5: an empty split file is named as it is ---------------------------------------------------------------

def test_empty_split_file_is_named_with_its_real_path_and_cause(env, tmp_path, capsys):
    split_dir = tmp_path / "emptyds" / "PASCALContext" / "ImageSets" / "Context"
    split_dir.mkdir(parents=True)
    (split_dir / "train.txt").write_text("")
    (split_dir / "val.txt").write_text("")
    before = _digests(tmp_path / "emptyds")
    assert _train(env, tmp_path / "o", data=tmp_path / "emptyds") == 2
    err = capsys.readouterr().err
    assert str(split_dir / "train.txt") in err and "does not exist" not in err
    assert "empty" in err or "lists no sample" in err
    assert _digests(tmp_path / "emptyds") == before and not (tmp_path / "o").exists()
