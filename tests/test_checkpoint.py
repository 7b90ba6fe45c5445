"""Checkpoint formats, config inference, and all-or-nothing loading with clear errors."""
from __future__ import annotations

import os
import stat

import pytest
import torch

import invpt
from invpt.checkpoint import read_checkpoint, save_checkpoint, save_official_checkpoint
from invpt.errors import CheckpointError


def _same_outputs(a, b, size=(128, 128)):
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        oa, ob = a(x), b(x)
    for k in oa:
        torch.testing.assert_close(oa[k], ob[k], rtol=0, atol=0)


def test_official_format_loads_strictly_and_infers_config(tiny_pascal, tiny_pascal_official_ckpt):
    raw = read_checkpoint(tiny_pascal_official_ckpt)
    assert raw.origin == "official" and all(not k.startswith("module.") for k in raw.state_dict)
    loaded = invpt.load_model(tiny_pascal_official_ckpt, fused_attn=False)
    assert loaded.cfg.name == "tiny_pascal" and not loaded.training
    _same_outputs(tiny_pascal, loaded)


def test_our_format_roundtrip_keeps_config(tiny_nyud, tmp_path):
    p = save_checkpoint(tiny_nyud, tmp_path / "m.pth")
    raw = read_checkpoint(p)
    assert raw.origin == "invpt" and raw.config["dataset"] == "nyud_v2"
    loaded = invpt.load_model(p, fused_attn=False)
    assert loaded.cfg == tiny_nyud.cfg
    _same_outputs(tiny_nyud, loaded, (128, 192))


def test_bare_state_dict(tiny_pascal, tmp_path):
    p = tmp_path / "bare.pth"
    torch.save(tiny_pascal.state_dict(), p)
    _same_outputs(tiny_pascal, invpt.load_model(p, config="tiny_pascal", fused_attn=False))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        invpt.load_model(tmp_path / "nope.pth")


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "junk.pth"
    p.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="weights_only"):
        invpt.load_model(p)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_code_is_refused(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Evil()}, p)
    with pytest.raises(CheckpointError, match="never loads code"):
        read_checkpoint(p)


def test_wrong_config_names_keys_and_cause(tiny_pascal_official_ckpt):
    with pytest.raises(CheckpointError) as e:
        invpt.load_model(tiny_pascal_official_ckpt, config="tiny_nyud")
    msg = str(e.value)
    assert "missing key" in msg and "unexpected key" in msg and "wrong dataset or tasks" in msg
    assert "nothing was loaded" in msg


def test_wrong_image_size_is_named(tiny_pascal_official_ckpt):
    with pytest.raises(CheckpointError, match="image size"):
        invpt.load_model(tiny_pascal_official_ckpt, config={**invpt.load_config("tiny_pascal").to_dict(), "image_size": [192, 192]})


def test_unknown_architecture_asks_for_config(tmp_path):
    cfg = {"dataset": "pascal_context", "image_size": [128, 128],
           "backbone": {"depth": 3, "embed_dim": 64, "num_heads": 2, "taps": [1, 2, 3]}}
    m = invpt.build_model(cfg)
    p = tmp_path / "custom.pth"
    torch.save({"model": {"module." + k: v for k, v in m.state_dict().items()}}, p)
    with pytest.raises(CheckpointError, match="--config"):
        invpt.load_model(p)
    assert invpt.load_model(p, config=cfg).cfg.backbone.depth == 3


def test_partial_state_dict_is_not_half_loaded(tiny_pascal, tmp_path):
    sd = dict(tiny_pascal.state_dict())
    sd.pop("heads.edge.linear_pred.bias")
    p = tmp_path / "partial.pth"
    torch.save(sd, p)
    with pytest.raises(CheckpointError, match="1 missing key"):
        invpt.load_model(p, config="tiny_pascal")


# ---- non-finite weights ------------------------------------------------------------------------------------------

def _poisoned(model, key, index, value):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd[key].view(-1)[index] = value
    return sd


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")])
def test_nonfinite_weight_in_official_checkpoint_is_refused(tiny_pascal, tmp_path, value, word):
    key = "backbone.blocks.1.attn.qkv.weight"
    p = tmp_path / "bad.pth.tar"
    torch.save({"model": {"module." + k: v for k, v in _poisoned(tiny_pascal, key, 7, value).items()}}, p)
    before = p.read_bytes()
    with pytest.raises(CheckpointError) as e:
        invpt.load_model(p)
    msg = str(e.value)
    assert "non-finite" in msg and key in msg and f"1 {word}" in msg and "1 of" in msg and str(p) in msg
    assert "\n" not in msg and "re-download" in msg  # one paragraph with the fix
    assert p.read_bytes() == before


def test_nonfinite_weights_in_invpt_checkpoint_are_all_counted(tiny_nyud, tmp_path):
    p = save_checkpoint(tiny_nyud, tmp_path / "m.pth")
    obj = torch.load(p, weights_only=True)
    keys = [k for k, v in obj["state_dict"].items() if v.is_floating_point()][:6]
    for k in keys:
        obj["state_dict"][k].view(-1)[0] = float("inf")
    torch.save(obj, p)
    with pytest.raises(CheckpointError) as e:
        invpt.load_model(p)
    msg = str(e.value)
    assert "in 6 of" in msg and keys[0] in msg and "(+2 more)" in msg and keys[5] not in msg


def test_integer_buffers_are_not_checked_for_finiteness(tiny_pascal, tmp_path):
    sd = {k: v.clone() for k, v in tiny_pascal.state_dict().items()}
    ints = [k for k, v in sd.items() if not v.is_floating_point()]
    assert ints and all(k.endswith("num_batches_tracked") for k in ints)
    p = tmp_path / "ok.pth"
    torch.save(sd, p)
    assert read_checkpoint(p).origin == "bare"


# ---- messages ----------------------------------------------------------------------------------------------------

def test_missing_backbone_key_cause_names_what_differs(tiny_pascal, tmp_path):
    """The cause never repeats one description for both sides (the old message printed the same ViT twice)."""
    for dropped, expect in (
        ("backbone.blocks.0.attn.qkv.bias", "qkv bias absent in checkpoint vs present in config"),
        ("backbone.blocks.2.norm1.weight", "backbone tensors differ (backbone.blocks.2.norm1.weight)"),
    ):
        sd = {k: v for k, v in tiny_pascal.state_dict().items() if k != dropped}
        p = tmp_path / "partial.pth"
        torch.save(sd, p)
        with pytest.raises(CheckpointError) as e:
            invpt.load_model(p, config="tiny_pascal")
        msg = str(e.value)
        assert expect in msg, msg
        desc = "ViT width 192, depth 4, 64 patch tokens"
        assert msg.count(desc) <= 1


def test_wrong_dataset_cause_names_channels(tiny_pascal_official_ckpt):
    with pytest.raises(CheckpointError) as e:
        invpt.load_model(tiny_pascal_official_ckpt, config="tiny_nyud")
    msg = str(e.value)
    assert "semseg has 21 channels in checkpoint vs 40 in config" in msg
    assert "patch tokens 64 in checkpoint vs 96 in config" in msg


def test_near_miss_of_a_preset_names_it_and_the_tensor(tiny_pascal, tmp_path):
    cfg = {**invpt.load_config("tiny_pascal").to_dict(), "image_size": [192, 192]}
    m = invpt.build_model(cfg)
    p = tmp_path / "tiny_192.pth"
    torch.save({"model": {"module." + k: v for k, v in m.state_dict().items()}}, p)
    with pytest.raises(CheckpointError) as e:
        invpt.load_model(p)
    msg = str(e.value)
    assert "nearly matches preset 'tiny_pascal'" in msg
    assert "backbone.pos_embed (1, 145, 192) in checkpoint vs (1, 65, 192) in preset 'tiny_pascal'" in msg
    assert "--config" in msg
    # one extra key away: named too
    sd = dict(tiny_pascal.state_dict())
    sd["heads.semseg.extra"] = torch.zeros(3)
    torch.save(sd, p)
    with pytest.raises(CheckpointError, match=r"nearly matches preset 'tiny_pascal'.*1 unexpected key\(s\): heads.semseg.extra \(3,\)"):
        invpt.load_model(p)


def test_far_from_every_preset_is_not_a_near_miss(tmp_path):
    cfg = {"dataset": "nyud_v2", "image_size": [128, 128], "tasks": ["semseg", "depth"],
           "backbone": {"depth": 3, "embed_dim": 64, "num_heads": 2, "taps": [1, 2, 3]}}
    p = tmp_path / "far.pth"
    torch.save(invpt.build_model(cfg).state_dict(), p)
    with pytest.raises(CheckpointError) as e:
        invpt.load_model(p)
    assert "nearly" not in str(e.value) and "matches no shipped preset" in str(e.value)


def test_fifo_and_directory_checkpoints_say_what_they_are(tmp_path):
    fifo = tmp_path / "ckpt.pth"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match=r"is a FIFO \(named pipe\), not a regular file"):
        invpt.load_model(fifo)  # must not block reading the pipe
    with pytest.raises(CheckpointError, match="is a directory, not a file"):
        invpt.load_model(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope" / "x.pth")


def test_bad_device_is_refused_before_the_checkpoint_is_read(tmp_path):
    from invpt.errors import InputError

    with pytest.raises(InputError, match="not a torch device"):
        invpt.load_model(tmp_path / "does_not_exist.pth", device="bogus")


# ---- writing -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_checkpoint_gets_the_normal_file_mode(tiny_pascal, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        a = save_checkpoint(tiny_pascal, tmp_path / "a.pth")
        b = save_official_checkpoint(tiny_pascal, tmp_path / "b.pth")
    finally:
        os.umask(old)
    assert stat.S_IMODE(a.stat().st_mode) == mode and stat.S_IMODE(b.stat().st_mode) == mode


def test_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    from invpt.atomic import write_atomic

    target = tmp_path / "m.pth"
    target.write_bytes(b"old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("writer crashed")

    with pytest.raises(RuntimeError):
        write_atomic(target, boom)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]


def test_saving_onto_a_directory_is_a_checkpoint_error(tiny_pascal, tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        save_checkpoint(tiny_pascal, tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_finds_one_bad_value_anywhere(dtype, value):
    from invpt.checkpoint import check_finite

    for pos in (0, 12_345, 99_999):
        t = torch.randn(100_000).to(dtype)
        t[pos] = value
        with pytest.raises(CheckpointError, match="w.weight"):
            check_finite({"ok": torch.ones(3, dtype=dtype), "w.weight": t.reshape(100, 1000).t()}, "x.pth")
    check_finite({"w": torch.randn(100, 1000).to(dtype), "n": torch.tensor(5), "e": torch.empty(0, dtype=dtype)}, "x.pth")
