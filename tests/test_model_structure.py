"""The model against the official state_dict listings and the quirks of the spec."""
from __future__ import annotations

import json

import pytest
import torch

import invpt
from invpt.checkpoint import shape_signature
from tests.conftest import TEST_DATA


@pytest.mark.parametrize("preset,ref,params", [("pascal_vitl", "pascal", 422_929_810), ("nyud_vitl", "nyud", 402_092_888)])
def test_vitl_matches_official_state_dict(preset, ref, params):
    path = TEST_DATA / f"official_state_dict_{ref}_vitL.json"  # vendored: key names and shapes of the releases
    official = {k: tuple(v) for k, v in json.loads(path.read_text()).items()}
    with torch.device("meta"):
        model = invpt.build_model(preset)
    ours = shape_signature(model)
    assert set(ours) == set(official), (set(ours) ^ set(official))
    assert ours == official
    assert list(ours) == list(official)  # same order too: diffs of state dicts line up
    assert sum(p.numel() for p in model.parameters()) == params


def test_tiny_variant_sizes():
    m = invpt.build_model("tiny_pascal")
    assert len(m.state_dict()) == 487
    assert abs(sum(p.numel() for p in m.parameters()) - 5.16e6) < 0.01e6


def test_task_order_is_official(tiny_pascal):
    assert tiny_pascal.tasks == ("semseg", "human_parts", "sal", "normals", "edge")
    cfg = invpt.load_config({"dataset": "nyud_v2", "tasks": ["edge", "semseg", "depth"]})
    assert cfg.tasks == ("semseg", "depth", "edge")


def test_attention_scale_is_full_width():
    with torch.device("meta"):
        m = invpt.build_model("pascal_vitl")
    for stage, width in zip(m.multi_task_decoder.invpt.invpt_stages, (576, 288, 144)):
        attn = stage.blocks[0].attn
        assert attn.scale == pytest.approx(width**-0.5)
        assert attn.scale != pytest.approx(attn.head_dim**-0.5)


def test_output_shapes_and_intermediate(tiny_nyud):
    x = torch.randn(2, 3, 128, 192)
    with torch.no_grad():
        out = tiny_nyud(x, return_intermediate=True)
    assert {k: tuple(v.shape) for k, v in out.items() if k != "inter_preds"} == {
        "semseg": (2, 40, 128, 192), "depth": (2, 1, 128, 192), "normals": (2, 3, 128, 192), "edge": (2, 1, 128, 192)}
    assert {k: tuple(v.shape) for k, v in out["inter_preds"].items()}["semseg"] == (2, 40, 128, 192)
    assert "inter_preds" not in tiny_nyud(x[:1])


def test_task_subset_matches_full_forward(tiny_pascal):
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        full = tiny_pascal(x)
        sub = tiny_pascal(x, tasks=["normals", "semseg"])
    assert list(sub) == ["semseg", "normals"]
    torch.testing.assert_close(sub["normals"], full["normals"], rtol=0, atol=0)


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x, return_intermediate=True)
    loss = sum(v.square().mean() for k, v in out.items() if k != "inter_preds")
    loss = loss + sum(v.square().mean() for v in out["inter_preds"].values())
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_dead_weights_present_but_unused_and_message_fusion_used():
    from tests.conftest import randomize_

    model = randomize_(invpt.build_model("tiny_pascal", fused_attn=False)).eval()
    grads = _grads(model, torch.randn(1, 3, 128, 128))
    dead = ("multi_task_decoder.invpt.redu_chan.0.", "multi_task_decoder.invpt.norm_mt.",
            "multi_task_decoder.invpt.invpt_stages.0.blocks.0.attn.fuse_attn.", "multi_task_decoder.scale_embed.2.")
    for prefix in dead:
        names = [n for n in grads if n.startswith(prefix)]
        assert names, prefix
        assert all(grads[n] is None for n in names), prefix
    for live in ("multi_task_decoder.invpt.invpt_stages.1.blocks.0.attn.fuse_attn.weight",
                 "multi_task_decoder.invpt.invpt_stages.2.blocks.0.attn.fuse_attn.weight",
                 "multi_task_decoder.invpt.redu_chan.1.0.weight", "multi_task_decoder.scale_embed.0.weight"):
        assert grads[live] is not None and grads[live].abs().sum() > 0, live


def test_message_passing_changes_outputs(tiny_pascal):
    """Zeroing the previous-stage half of fuse_attn must change the result: messages really flow.

    Query/key projections are scaled up first so attention is far from uniform (with tiny random
    weights every score is ~0 and any message would be washed out by the softmax).
    """
    import copy

    x = torch.randn(1, 3, 128, 128)
    sharp = copy.deepcopy(tiny_pascal)
    with torch.no_grad():
        for stage in sharp.multi_task_decoder.invpt.invpt_stages:
            stage.blocks[0].attn.proj_q.weight.mul_(30)
            stage.blocks[0].attn.proj_k.weight.mul_(30)
        cut = copy.deepcopy(sharp)
        cut.multi_task_decoder.invpt.invpt_stages[2].blocks[0].attn.fuse_attn.weight[:, 2:] = 0

        def stage2_attention(model):
            got = {}
            attn = model.multi_task_decoder.invpt.invpt_stages[2].blocks[0].attn
            handle = attn.register_forward_hook(lambda mod, inp, out: got.update(out=out[0]))
            model(x)
            handle.remove()
            return got["out"]

        a, b = stage2_attention(sharp), stage2_attention(cut)
    # Without message passing the difference would be exactly 0; float noise would be ~1e-7 relative.
    assert (a - b).abs().max() > 1e-4 * a.abs().max()


def test_wrong_input_size_is_rejected(tiny_pascal):
    from invpt.errors import InputError

    with pytest.raises(InputError, match="built for"):
        tiny_pascal(torch.randn(1, 3, 128, 192))


@pytest.mark.parametrize("size", [(160, 160), (224, 224), (96, 128), (512, 500)])
def test_sizes_not_multiple_of_64_rejected(size):
    from invpt.errors import ConfigError

    with pytest.raises(ConfigError, match="multiples of 64"):
        invpt.load_config({"dataset": "pascal_context", "image_size": list(size)})


def test_sizes_multiple_of_64_run():
    m = invpt.build_model({"dataset": "pascal_context", "image_size": [128, 192],
                           "backbone": {"depth": 3, "embed_dim": 64, "num_heads": 2, "taps": [1, 2, 3]},
                           "decoder": {"embed_dim": 32, "pred_channels": 8}}).eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 128, 192))
    assert out["semseg"].shape == (1, 21, 128, 192)


@pytest.mark.parametrize("bad,match", [
    ({"dataset": "pascal_context", "tasks": ["depth"]}, "do not exist"),
    ({"dataset": "cityscapes"}, "Unknown dataset"),
    ({"dataset": "pascal_context", "backbone": {"taps": [6, 6, 18]}}, "taps"),
    ({"dataset": "pascal_context", "decoder": {"embed_dim": 510, "pred_channels": 1}}, "divisible"),
    ({"dataset": "pascal_context", "imagesize": [512, 512]}, "unknown key"),
])
def test_bad_configs(bad, match):
    from invpt.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        invpt.load_config(bad)


def test_config_yaml_roundtrip(tmp_path):
    cfg = invpt.load_config("tiny_nyud")
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert invpt.load_config(p) == cfg
    assert invpt.load_config(cfg.to_dict()) == cfg
