"""Fidelity: official-format checkpoints of reduced models reproduce an independent functional reference.

``tests/reference_impl/functional_invpt.py`` was written separately from the spec alone, in upstream's
style (einsum attention, ``scale_factor=2`` upsampling, ``ceil_mode`` pooling, a hand-written ViT that
computes the dead layer-18 branch too). Agreement to float32 rounding (rel err <= 1e-5) checks our module
tree, key mapping and forward pass against it.
"""
from __future__ import annotations

import pytest
import torch

import invpt
from tests.reference_impl import functional_invpt as ref


def _official_ckpt(sd, path):
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, path)
    return path


def _our_config(rcfg, dataset):
    return {
        "dataset": dataset,
        "tasks": list(rcfg["tasks"]),
        "image_size": list(rcfg["image_size"]),
        "backbone": {"depth": rcfg["vit_depth"], "embed_dim": rcfg["vit_dim"], "num_heads": rcfg["vit_heads"],
                     "taps": list(rcfg["taps"])},
        "decoder": {"embed_dim": rcfg["embed_dim"], "pred_channels": rcfg["pred_channels"]},
    }


CASES = {
    "tiny_pascal": (ref.tiny_pascal_cfg, "pascal_context", {}),
    "tiny_nyud": (ref.tiny_nyud_cfg, "nyud_v2", {}),
    "pascal_depth5_taps_1_3_4_128x192": (ref.tiny_pascal_cfg, "pascal_context",
                                         {"vit_depth": 5, "taps": [1, 3, 4], "image_size": [128, 192]}),
    "nyud_semseg_depth_only_192x128": (ref.tiny_nyud_cfg, "nyud_v2",
                                       {"tasks": ["semseg", "depth"], "task_channels": {"semseg": 40, "depth": 1},
                                        "image_size": [192, 128], "vit_dim": 96, "vit_heads": 2}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_functional_reference(case, tmp_path):
    make_cfg, dataset, overrides = CASES[case]
    rcfg = {**make_cfg(), **overrides}
    sd = ref.random_state_dict(rcfg, seed=3)
    ckpt = _official_ckpt(sd, tmp_path / "official.pth.tar")
    model = invpt.load_model(ckpt, config=_our_config(rcfg, dataset))
    x = torch.randn(2, 3, *rcfg["image_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(x, return_intermediate=True)
        theirs = ref.reference_forward(sd, rcfg, x)
    for t in rcfg["tasks"]:
        for a, b in ((ours[t], theirs[t]), (ours["inter_preds"][t], theirs["inter_preds"][t])):
            rel = ((a - b).abs().max() / b.abs().max()).item()
            assert rel <= 1e-5, (case, t, rel)
