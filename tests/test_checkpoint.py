"""Checkpoint formats, config inference, and all-or-nothing loading with clear errors."""
from __future__ import annotations

import pytest
import torch

import invpt
from invpt.checkpoint import read_checkpoint, save_checkpoint
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
