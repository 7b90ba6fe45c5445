"""The training losses (invpt.train.losses) against hand and numpy computations of the official definitions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from invpt.errors import ConfigError
from invpt.train.losses import (
    LOSS_WEIGHTS,
    BalancedBCEWithLogits,
    BalancedCrossEntropy,
    MaskedCrossEntropy,
    MaskedL1,
    build_criterion,
)


def _log_softmax_np(x: np.ndarray, axis: int) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def _labels(rng: np.random.Generator, shape: tuple[int, ...], n_classes: int, ignore_frac: float = 0.25) -> np.ndarray:
    y = rng.integers(0, n_classes, size=shape).astype(np.float32)
    y[rng.random(shape) < ignore_frac] = 255
    return y


def _random_case(cfg_tasks: dict[str, int], seed: int = 0, b: int = 2, h: int = 8, w: int = 10):
    rng = np.random.default_rng(seed)
    outs = {t: torch.tensor(rng.normal(size=(b, c, h, w)), dtype=torch.float32, requires_grad=True)
            for t, c in cfg_tasks.items()}
    outs["inter_preds"] = {t: torch.tensor(rng.normal(size=(b, c, h, w)), dtype=torch.float32, requires_grad=True)
                           for t, c in cfg_tasks.items()}
    tg = {}
    for t, c in cfg_tasks.items():
        if t in ("semseg", "human_parts"):
            tg[t] = torch.from_numpy(_labels(rng, (b, 1, h, w), c))
        elif t in ("sal", "edge"):
            tg[t] = torch.from_numpy(_labels(rng, (b, 1, h, w), 2))
        elif t == "depth":
            d = rng.uniform(0.5, 5.0, size=(b, 1, h, w)).astype(np.float32)
            d[rng.random(d.shape) < 0.2] = 255
            tg[t] = torch.from_numpy(d)
        else:
            n = rng.normal(size=(b, 3, h, w))
            n = (n / np.linalg.norm(n, axis=1, keepdims=True)).astype(np.float32)
            n[:, :, rng.random((h, w)) < 0.2] = 255
            tg[t] = torch.from_numpy(n)
    return outs, tg


# ---- single losses ---------------------------------------------------------------------------------------------
def test_cross_entropy_matches_numpy_sum_over_valid_pixels():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 4, 6)).astype(np.float32)
    y = _labels(rng, (2, 1, 4, 6), 5)
    got = MaskedCrossEntropy()(torch.from_numpy(x), torch.from_numpy(y))
    lp = _log_softmax_np(x, 1)
    yi = y[:, 0].astype(np.int64)
    valid = yi != 255
    b, hh, ww = np.nonzero(valid)
    expected = -lp[b, yi[valid], hh, ww].sum() / valid.sum()
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_cross_entropy_perfect_prediction_is_zero():
    y = torch.randint(0, 21, (2, 1, 5, 5)).float()
    logits = torch.nn.functional.one_hot(y[:, 0].long(), 21).permute(0, 3, 1, 2).float() * 100.0
    assert MaskedCrossEntropy()(logits, y).item() < 1e-6


def test_balanced_cross_entropy_weights_by_hand():
    # 3 positives, 9 negatives, 4 ignored: w = 9/12 = 0.75 -> class weights (0.25, 0.75)
    y = np.array([1, 1, 1] + [0] * 9 + [255] * 4, dtype=np.float32).reshape(1, 1, 4, 4)
    x = np.random.default_rng(2).normal(size=(1, 2, 4, 4)).astype(np.float32)
    got = BalancedCrossEntropy()(torch.from_numpy(x), torch.from_numpy(y)).item()
    lp = _log_softmax_np(x, 1)[0]
    yi = y[0, 0].astype(np.int64)
    valid = yi != 255
    cw = np.array([1 - 0.75, 0.75])
    per_pixel = -np.where(yi == 1, lp[1], lp[0]) * cw[np.where(valid, yi, 0)]
    expected = per_pixel[valid].sum() / 12  # divided by the number of valid pixels, not by the sum of weights
    assert got == pytest.approx(expected, rel=1e-5)
    assert got != pytest.approx(per_pixel[valid].sum() / cw[yi[valid]].sum(), rel=1e-3)


def test_edge_pos_weight_formula_by_hand():
    x = np.array([[2.0, -1.0, 0.5, 3.0], [-2.0, 0.0, 1.0, -0.5]], dtype=np.float32).reshape(1, 1, 2, 4)
    y = np.array([[1, 0, 255, 1], [0, 0, 1, 255]], dtype=np.float32).reshape(1, 1, 2, 4)
    got = BalancedBCEWithLogits(0.95)(torch.from_numpy(x), torch.from_numpy(y)).item()
    s = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    pos = -np.log(s)
    neg = -np.log(1.0 - s)
    valid = y != 255
    per_pixel = np.where(y == 1, 0.95 * pos, 0.05 * neg)
    assert got == pytest.approx(per_pixel[valid].mean(), rel=1e-5)
    # the same as BCE-with-logits with pos_weight 19, mean over valid, / 20
    bce19 = np.where(y == 1, 19.0 * pos, neg)
    assert got == pytest.approx(bce19[valid].mean() / 20.0, rel=1e-5)


def test_edge_pos_weight_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="must lie in"):
        BalancedBCEWithLogits(1.0)


def test_normals_l1_on_normalised_prediction_per_valid_pixel():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 3, 3, 4)).astype(np.float32)
    g = rng.normal(size=(1, 3, 3, 4))
    g = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)
    g[0, 1, 0, 0] = 255  # one channel ignored invalidates the pixel
    g[0, :, 2, 3] = 255
    got = MaskedL1(normalize=True)(torch.from_numpy(x), torch.from_numpy(g)).item()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    valid = (g != 255).all(axis=1)[0]
    expected = np.abs(xn - g)[0][:, valid].sum() / valid.sum()  # summed over channels, divided by pixels
    assert got == pytest.approx(expected, rel=1e-5)
    # a prediction along the GT but longer is perfect after normalisation
    assert MaskedL1(normalize=True)(torch.from_numpy(g * 7.0) * torch.from_numpy(valid[None, None]),
                                    torch.from_numpy(g)).item() == pytest.approx(0.0, abs=1e-6)


def test_depth_l1_ignores_255_by_hand():
    x = torch.tensor([[[[1.0, 2.5, 0.0, 9.0]]]])
    y = torch.tensor([[[[1.5, 2.0, 255.0, 3.0]]]])
    # |1-1.5| + |2.5-2| + |9-3| over 3 valid pixels
    assert MaskedL1()(x, y).item() == pytest.approx((0.5 + 0.5 + 6.0) / 3)


@pytest.mark.parametrize(
    "loss, channels",
    [(MaskedCrossEntropy(), 21), (BalancedCrossEntropy(), 2), (BalancedBCEWithLogits(), 1),
     (MaskedL1(normalize=True), 3), (MaskedL1(), 1)],
)
def test_all_ignored_batch_gives_zero_with_a_graph(loss, channels):
    x = torch.randn(2, channels, 4, 4, requires_grad=True)
    y = torch.full((2, channels if isinstance(loss, MaskedL1) else 1, 4, 4), 255.0)
    value = loss(x, y)
    assert value.item() == 0.0 and torch.isfinite(value)
    assert value.requires_grad
    value.backward()
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()


def test_half_precision_outputs_are_computed_in_float32():
    x = torch.randn(1, 5, 4, 4)
    y = torch.randint(0, 5, (1, 1, 4, 4)).float()
    lo = MaskedCrossEntropy()(x.to(torch.bfloat16), y)
    assert lo.dtype == torch.float32
    assert lo.item() == pytest.approx(MaskedCrossEntropy()(x.to(torch.bfloat16).float(), y).item(), rel=1e-6)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(1, 5, 4, 4\).*\(1, 1, 8, 8\)"):
        MaskedCrossEntropy()(torch.randn(1, 5, 4, 4), torch.zeros(1, 1, 8, 8))


# ---- the multi-task criterion ----------------------------------------------------------------------------------
def test_official_weights_per_dataset():
    pascal = build_criterion("tiny_pascal")
    nyud = build_criterion("tiny_nyud")
    assert pascal.weights == {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0, "edge": 50.0}
    assert nyud.weights == {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0}
    assert pascal.weights == {t: LOSS_WEIGHTS["pascal_context"][t] for t in pascal.tasks}
    kinds = {t: type(m).__name__ for t, m in nyud.losses.items()}
    assert kinds == {"semseg": "MaskedCrossEntropy", "depth": "MaskedL1", "normals": "MaskedL1",
                     "edge": "BalancedBCEWithLogits"}
    assert nyud.losses["normals"].normalize and not nyud.losses["depth"].normalize


@pytest.mark.parametrize("preset", ["tiny_pascal", "tiny_nyud"])
def test_total_is_weighted_sum_with_intermediate_losses(preset):
    from invpt.config import load_config

    crit = build_criterion(preset)
    cfg = load_config(preset)
    outs, tg = _random_case(cfg.task_channels)
    res = crit(outs, tg)
    tasks = list(cfg.tasks)
    assert set(res) == set(tasks) | {f"inter_{t}" for t in tasks} | {"total"}
    for t in tasks:  # each entry is the task's own loss on the final / intermediate prediction
        assert res[t].item() == pytest.approx(crit.losses[t](outs[t], tg[t]).item())
        assert res[f"inter_{t}"].item() == pytest.approx(crit.losses[t](outs["inter_preds"][t], tg[t]).item())
        assert res[t].item() != pytest.approx(res[f"inter_{t}"].item())
    w = LOSS_WEIGHTS[cfg.dataset]
    expected = sum(w[t] * (res[t].item() + res[f"inter_{t}"].item()) for t in tasks)
    assert res["total"].item() == pytest.approx(expected, rel=1e-6)
    res["total"].backward()
    assert all(outs[t].grad is not None and outs["inter_preds"][t].grad is not None for t in tasks)


def test_without_intermediate_supervision_and_weight_override():
    crit = build_criterion("tiny_nyud", intermediate_supervision=False, weights={"depth": 3.0})
    assert crit.weights["depth"] == 3.0 and crit.weights["edge"] == 50.0
    from invpt.config import load_config

    outs, tg = _random_case(load_config("tiny_nyud").task_channels, seed=4)
    del outs["inter_preds"]
    res = crit(outs, tg)
    assert set(res) == {"semseg", "depth", "normals", "edge", "total"}
    expected = res["semseg"] + 3.0 * res["depth"] + 10.0 * res["normals"] + 50.0 * res["edge"]
    assert res["total"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_task_subset_from_a_dict_config():
    crit = build_criterion({"dataset": "pascal_context", "tasks": ["sal", "semseg"], "image_size": [64, 64]})
    assert crit.tasks == ("semseg", "sal")  # official order
    assert crit.weights == {"semseg": 1.0, "sal": 5.0}


def test_missing_inter_preds_is_explained():
    from invpt.config import load_config

    outs, tg = _random_case(load_config("tiny_nyud").task_channels)
    del outs["inter_preds"]
    with pytest.raises(ConfigError, match="return_intermediate=True"):
        build_criterion("tiny_nyud")(outs, tg)


def test_unknown_weight_override_and_missing_target():
    with pytest.raises(ConfigError, match=r"\['sal'\].*does not train"):
        build_criterion("tiny_nyud", weights={"sal": 1.0})
    with pytest.raises(ConfigError, match="finite and >= 0"):
        build_criterion("tiny_nyud", weights={"depth": math.nan})
    from invpt.config import load_config

    outs, tg = _random_case(load_config("tiny_nyud").task_channels)
    del tg["depth"]
    with pytest.raises(ConfigError, match=r"\['depth'\] missing"):
        build_criterion("tiny_nyud")(outs, tg)


def test_all_ignored_multi_task_batch_has_finite_zero_total():
    from invpt.config import load_config

    outs, tg = _random_case(load_config("tiny_pascal").task_channels, seed=5)
    tg = {t: torch.full_like(v, 255.0) for t, v in tg.items()}
    res = build_criterion("tiny_pascal")(outs, tg)
    assert res["total"].item() == 0.0
    res["total"].backward()
    assert all(torch.isfinite(outs[t].grad).all() for t in tg)


def test_with_the_tiny_model_end_to_end(tiny_pascal):
    import copy

    from invpt.train.metrics import build_evaluator

    model = copy.deepcopy(tiny_pascal)  # the session fixture stays untouched (no .grad left on it)
    cfg = model.cfg
    h, w = cfg.image_size
    g = torch.Generator().manual_seed(0)
    out = model(torch.randn(2, 3, h, w, generator=g), return_intermediate=True)
    tg = {"semseg": torch.randint(0, 21, (2, 1, h, w), generator=g).float(),
          "human_parts": torch.full((2, 1, h, w), 255.0),  # no part annotation in this batch
          "sal": torch.randint(0, 2, (2, 1, h, w), generator=g).float(),
          "normals": torch.nn.functional.normalize(torch.randn(2, 3, h, w, generator=g), dim=1),
          "edge": torch.randint(0, 2, (2, 1, h, w), generator=g).float()}
    res = build_criterion(cfg)(out, tg)
    assert res["human_parts"].item() == 0.0 and res["inter_human_parts"].item() == 0.0
    assert all(torch.isfinite(v) for v in res.values()) and res["total"].item() > 0
    res["total"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)
    assert all(torch.isfinite(gr).all() for gr in grads if gr is not None)
    ev = build_evaluator(cfg)
    ev.update({k: v.detach() for k, v in out.items() if k != "inter_preds"}, tg)
    assert set(ev.primary()) == set(cfg.tasks)
