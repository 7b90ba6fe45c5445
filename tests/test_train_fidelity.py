"""Fidelity of the training pieces to the official InvPT code (spec §10-§14 and upstream's behaviour, quirks
included).

Every check compares the implementation with an independent numpy (or plain torch) computation written from the
facts, on constructed cases chosen so that the plausible wrong variant (per-image averaging, swapped class weights,
``>`` instead of ``>=``, rounding instead of truncation, ...) gives a different answer; where it matters the test
asserts that difference too, so it cannot pass by accident.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from invpt.data.datasets import NYUDReader, PascalContextReader
from invpt.data.labels import (
    HUMAN_PART_IDS,
    NORMALS_VALID_CONTEXT_CLASSES,
    decode_normals_png,
    edges_from_labelmap,
    load_targets,
    read_saliency_png,
)
from invpt.data.train_transforms import (
    AddIgnoreRegions,
    Normalize,
    PadImage,
    PhotoMetricDistortion,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScaling,
    ToTensor,
    build_eval_transforms,
    build_train_transforms,
)
from invpt.tasks import get_dataset
from invpt.train.losses import build_criterion
from invpt.train.metrics import (
    DepthMeter,
    EdgeMeter,
    NormalsMeter,
    SaliencyMeter,
    SegmentationMeter,
    build_evaluator,
    prediction_image,
)

PASCAL_CFG = {"dataset": "pascal_context", "image_size": [64, 64]}
NYUD_CFG = {"dataset": "nyud_v2", "image_size": [64, 64]}
#: spec §12 (configs/*.yml loss_kwargs.loss_weights)
SPEC_WEIGHTS = {
    "pascal_context": {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "edge": 50.0, "normals": 10.0},
    "nyud_v2": {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0},
}
IGN = 255.0


# ---- numpy references (spec §12) ------------------------------------------------------------------------------------
def _log_softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def _nll(logits: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel NLL [B,H,W] (0 at ignored pixels) and the valid mask, label [B,1,H,W]."""
    y = label[:, 0]
    valid = y != IGN
    yy = np.where(valid, y, 0).astype(np.int64)
    lp = _log_softmax(logits)
    nll = -np.take_along_axis(lp, yy[:, None], axis=1)[:, 0]
    return np.where(valid, nll, 0.0), valid


def ref_ce(logits: np.ndarray, label: np.ndarray) -> float:
    nll, valid = _nll(logits, label)
    return nll.sum() / max(valid.sum(), 1)


def ref_balanced_ce(logits: np.ndarray, label: np.ndarray) -> float:
    nll, valid = _nll(logits, label)
    y = label[:, 0]
    w = ((y == 0) & valid).sum() / valid.sum()  # fraction of negatives among the valid pixels of the batch
    weight = np.where(y == 1, w, 1.0 - w)  # class 0 gets 1 - w, class 1 gets w
    return (weight * nll).sum() / valid.sum()


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def ref_edge(logits: np.ndarray, label: np.ndarray, p: float = 0.95) -> float:
    x = logits.astype(np.float64)
    valid = label != IGN
    per = np.where(label == 1, p * _softplus(-x), (1 - p) * _softplus(x))
    return per[valid].mean()


def ref_normals_l1(out: np.ndarray, label: np.ndarray) -> float:
    o = out.astype(np.float64)
    o = o / np.maximum(np.linalg.norm(o, axis=1, keepdims=True), 1e-12)
    valid = (label != IGN).all(axis=1, keepdims=True)
    return np.abs(o - label)[np.broadcast_to(valid, o.shape)].sum() / valid.sum()


def ref_depth_l1(out: np.ndarray, label: np.ndarray) -> float:
    valid = label != IGN
    return np.abs(out.astype(np.float64) - label)[valid].mean()


# ---- losses ---------------------------------------------------------------------------------------------------------
def test_ce_is_normalised_by_the_valid_pixels_of_the_whole_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 21, 5, 6)).astype(np.float32)
    y = rng.integers(0, 21, size=(2, 1, 5, 6)).astype(np.float32)
    y[0, 0, :4] = IGN  # image 0: 6 valid pixels, image 1: 30
    crit = build_criterion(PASCAL_CFG, intermediate_supervision=False)
    got = float(crit.losses["semseg"](torch.from_numpy(x), torch.from_numpy(y)))
    assert got == pytest.approx(ref_ce(x, y), rel=1e-5)
    per_image = np.mean([ref_ce(x[i:i + 1], y[i:i + 1]) for i in range(2)])
    assert abs(per_image - ref_ce(x, y)) > 1e-3  # the case tells the two normalisations apart


def test_saliency_balanced_ce_weights_and_normalisation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 2, 6, 6)).astype(np.float32)
    y = (rng.random((2, 1, 6, 6)) < 0.2).astype(np.float32)  # about 80 % negatives
    y[1, 0, 0] = IGN
    crit = build_criterion(PASCAL_CFG, intermediate_supervision=False)
    got = float(crit.losses["sal"](torch.from_numpy(x), torch.from_numpy(y)))
    assert got == pytest.approx(ref_balanced_ce(x, y), rel=1e-5)
    # wrong variants differ on this case: swapped class weights, normalising by the sum of weights
    nll, valid = _nll(x, y)
    w = ((y[:, 0] == 0) & valid).sum() / valid.sum()
    swapped = (np.where(y[:, 0] == 1, 1 - w, w) * nll).sum() / valid.sum()
    weights = np.where(y[:, 0] == 1, w, 1 - w)
    by_weight_sum = (weights * nll).sum() / weights[valid].sum()
    assert abs(swapped - got) > 1e-3 and abs(by_weight_sum - got) > 1e-3


def test_edge_loss_is_balanced_bce_with_pos_weight_19_divided_by_20():
    rng = np.random.default_rng(2)
    x = rng.normal(scale=2.0, size=(2, 1, 5, 7)).astype(np.float32)
    y = (rng.random((2, 1, 5, 7)) < 0.3).astype(np.float32)
    y[0, 0, 0, :3] = IGN
    crit = build_criterion(NYUD_CFG, intermediate_supervision=False)
    got = float(crit.losses["edge"](torch.from_numpy(x), torch.from_numpy(y)))
    assert got == pytest.approx(ref_edge(x, y), rel=1e-5)
    # the same thing written as upstream does: BCE-with-logits(pos_weight 19), mean over valid, / 20
    valid = torch.from_numpy(y != IGN)
    bce = F.binary_cross_entropy_with_logits(torch.from_numpy(x)[valid], torch.from_numpy(y)[valid],
                                             pos_weight=torch.tensor(19.0))
    assert got == pytest.approx(float(bce) / 20.0, rel=1e-5)


def test_normals_l1_mask_needs_all_channels_and_divides_by_valid_pixels():
    rng = np.random.default_rng(3)
    out = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    g = rng.normal(size=(2, 3, 4, 5))
    g = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)
    g[0, :, 0, 0] = IGN  # fully ignored pixel
    g[1, 2, 1, 1] = IGN  # one channel 255: the whole pixel is ignored
    crit = build_criterion(NYUD_CFG, intermediate_supervision=False)
    got = float(crit.losses["normals"](torch.from_numpy(out), torch.from_numpy(g)))
    assert got == pytest.approx(ref_normals_l1(out, g), rel=1e-5)
    # wrong variants differ: a per-element mean (3x the pixels), an unnormalised prediction, a per-channel mask
    valid = (g != IGN).all(axis=1, keepdims=True)
    assert abs(got / 3 - got) > 1e-2
    assert abs(np.abs(out - g)[np.broadcast_to(valid, g.shape)].sum() / valid.sum() - got) > 1e-2
    on = out / np.linalg.norm(out, axis=1, keepdims=True)
    per_channel = np.abs(on - g)[g != IGN].sum() / valid.sum()
    assert abs(per_channel - got) > 1e-3


def test_depth_l1_per_valid_pixel():
    rng = np.random.default_rng(4)
    out = rng.uniform(0, 5, size=(2, 1, 4, 6)).astype(np.float32)
    g = rng.uniform(0.5, 5, size=(2, 1, 4, 6)).astype(np.float32)
    g[0, 0, :2] = IGN
    crit = build_criterion(NYUD_CFG, intermediate_supervision=False)
    got = float(crit.losses["depth"](torch.from_numpy(out), torch.from_numpy(g)))
    assert got == pytest.approx(ref_depth_l1(out, g), rel=1e-5)


@pytest.mark.parametrize("cfg", [PASCAL_CFG, NYUD_CFG])
def test_total_is_weighted_sum_with_intermediate_supervision_at_the_same_weights(cfg):
    ds = get_dataset(cfg["dataset"])
    rng = np.random.default_rng(5)
    b, h, w = 2, 6, 8
    outs, inter, tg = {}, {}, {}
    for t in ds.tasks:
        outs[t.name] = rng.normal(size=(b, t.channels, h, w)).astype(np.float32)
        inter[t.name] = rng.normal(size=(b, t.channels, h, w)).astype(np.float32)
        if t.kind == "label":
            y = rng.integers(0, t.channels, size=(b, 1, h, w)).astype(np.float32)
        elif t.kind in ("saliency", "boundary"):
            y = rng.integers(0, 2, size=(b, 1, h, w)).astype(np.float32)
        elif t.kind == "depth":
            y = rng.uniform(0.5, 5, size=(b, 1, h, w)).astype(np.float32)
        else:
            y = rng.normal(size=(b, 3, h, w))
            y = (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)
        y[np.broadcast_to(rng.random((b, 1, h, w)) < 0.15, y.shape)] = IGN
        tg[t.name] = y
    ref_fn = {"label": ref_ce, "saliency": ref_balanced_ce, "boundary": ref_edge, "normals": ref_normals_l1,
              "depth": ref_depth_l1}
    total = 0.0
    for t in ds.tasks:
        weight = SPEC_WEIGHTS[cfg["dataset"]][t.name]
        total += weight * (ref_fn[t.kind](outs[t.name], tg[t.name]) + ref_fn[t.kind](inter[t.name], tg[t.name]))
    crit = build_criterion(cfg)
    tt = lambda d: {k: torch.from_numpy(v) for k, v in d.items()}  # noqa: E731
    res = crit({**tt(outs), "inter_preds": tt(inter)}, tt(tg))
    assert float(res["total"]) == pytest.approx(total, rel=1e-5)
    for t in ds.tasks:
        assert float(res[f"inter_{t.name}"]) == pytest.approx(ref_fn[t.kind](inter[t.name], tg[t.name]), rel=1e-5)
    no_inter = build_criterion(cfg, intermediate_supervision=False)(tt(outs), tt(tg))
    assert float(no_inter["total"]) == pytest.approx(
        sum(SPEC_WEIGHTS[cfg["dataset"]][t.name] * ref_fn[t.kind](outs[t.name], tg[t.name]) for t in ds.tasks),
        rel=1e-5)


# ---- mIoU (spec §13; upstream SemsegMeter / HumanPartsMeter) --------------------------------------------------------
def ref_miou(preds: list[np.ndarray], gts: list[np.ndarray], c: int) -> tuple[float, np.ndarray]:
    """Per class TP/FP/FN over valid pixels of all batches; IoU = TP / max(TP+FP+FN, 1e-8); mean over all classes."""
    tp, fp, fn = np.zeros(c), np.zeros(c), np.zeros(c)
    for p, g in zip(preds, gts):
        valid = g != IGN
        for k in range(c):
            tp[k] += np.sum((g == k) & (p == k) & valid)
            fp[k] += np.sum((g != k) & (p == k) & valid)
            fn[k] += np.sum((g == k) & (p != k) & valid)
    iou = tp / np.maximum(tp + fp + fn, 1e-8)
    return float(iou.mean()) * 100.0, iou * 100.0


def _onehot(labels: np.ndarray, c: int) -> torch.Tensor:
    return F.one_hot(torch.from_numpy(labels).long(), c).permute(0, 3, 1, 2).float() * 5.0


@pytest.mark.parametrize("c", [21, 40, 7])
def test_miou_accumulates_over_the_split_and_absent_classes_count_zero(c):
    rng = np.random.default_rng(c)
    m = SegmentationMeter(c)
    preds, gts = [], []
    for b in range(3):
        g = rng.integers(0, 4, size=(2, 1, 5, 6)).astype(np.float32)  # only classes 0..3 appear anywhere
        p = np.where(rng.random(g.shape[::1]) < 0.6, g, rng.integers(0, 4, size=g.shape)).astype(np.int64)[:, 0]
        g[b % 2, 0, :, :2] = IGN
        m.update(_onehot(p, c), torch.from_numpy(g))
        preds.append(p)
        gts.append(g[:, 0])
    s = m.score()
    miou, iou = ref_miou(preds, gts, c)
    assert s["mIoU"] == pytest.approx(miou, rel=1e-9)
    np.testing.assert_allclose(s["IoU"], iou, rtol=1e-9)
    assert all(v == 0.0 for v in s["IoU"][4:])  # absent everywhere: 0 (not skipped) in the mean
    present_only = float(iou[:4].mean())
    assert s["mIoU"] == pytest.approx(present_only * 4 / c)
    per_image = np.mean([ref_miou([p[i:i + 1]], [g[i:i + 1]], c)[0] for p, g in zip(preds, gts) for i in range(2)])
    assert abs(per_image - s["mIoU"]) > 1e-3


def test_valid_gt_outside_the_classes_counts_as_false_positive_of_the_prediction():
    # upstream's per-class loop: a GT value that is neither a class nor 255 is nobody's TP/FN but the prediction's FP
    g = np.array([[[[0, 1, 30, 30]]]], np.float32)
    p = np.array([[[0, 1, 1, 0]]])
    m = SegmentationMeter(21)
    m.update(_onehot(p, 21), torch.from_numpy(g))
    iou = np.array(m.score()["IoU"])
    assert iou[0] == pytest.approx(50.0) and iou[1] == pytest.approx(50.0)


def test_human_parts_images_without_parts_are_ignored_entirely():
    t = build_eval_transforms(PASCAL_CFG)
    samples = []
    for k, hp in enumerate((np.tile(np.arange(7, dtype=np.float32), (8, 1))[:, :6], np.zeros((8, 6), np.float32))):
        s = {"image": np.full((8, 6, 3), 100, np.float32), "human_parts": hp}
        samples.append(t(s, np.random.default_rng(k)))
    assert (samples[1]["human_parts"] == 255).all()  # AddIgnoreRegions: no part at all -> all ignored
    pred = np.random.default_rng(0).integers(0, 7, size=(2, 64, 64))
    both = SegmentationMeter(7)
    both.update(_onehot(pred, 7), torch.stack([s["human_parts"] for s in samples]))
    first = SegmentationMeter(7)
    first.update(_onehot(pred[:1], 7), samples[0]["human_parts"][None])
    assert both.score() == first.score()


def test_nyud_semseg_label_shift(tmp_path):
    root = tmp_path / "NYUDv2"
    (root / "gt_sets").mkdir(parents=True)
    (root / "gt_sets" / "val.txt").write_text("000001\n")
    (root / "images").mkdir()
    cv2.imwrite(str(root / "images" / "000001.png"), np.full((2, 3, 3), 90, np.uint8))
    (root / "segmentation").mkdir()
    png = np.array([[0, 1, 2], [39, 40, 0]], np.uint8)
    Image.fromarray(png).save(root / "segmentation" / "000001.png")
    t = load_targets(NYUDReader(tmp_path, "val"), 0, ["semseg"])["semseg"]
    np.testing.assert_array_equal(t, [[255, 0, 1], [38, 39, 255]])
    assert t.dtype == np.float32


# ---- saliency maxF (spec §13; upstream SaliencyMeter, double sigmoid) -----------------------------------------------
THRESHOLDS = torch.arange(0.05, 1, 0.05)  # upstream's call: float32, 19 values


def _scores(raw: torch.Tensor) -> torch.Tensor:
    """What upstream's meter thresholds: sigmoid(softmax[:, 1] * 255 / 255), as a flat float32 tensor."""
    prob = torch.softmax(raw.float(), dim=1)[:, 1] * 255.0 / 255.0
    return torch.sigmoid(prob.reshape(-1))


def ref_maxf(batches: list[tuple[torch.Tensor, np.ndarray]], strict: bool = False) -> float:
    th = THRESHOLDS.numpy()
    tp, pp, ap = np.zeros(len(th)), np.zeros(len(th)), 0.0
    for raw, gt in batches:
        s = _scores(raw).numpy()
        g = gt.reshape(-1)
        valid = g != IGN
        s, g = s[valid], g[valid]
        ap += (g == 1).sum()
        for k, t in enumerate(th):
            pos = s > t if strict else s >= t
            tp[k] += (pos & (g == 1)).sum()
            pp[k] += pos.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        prec, rec = tp / pp, tp / ap
        f = 1.3 * prec * rec / (0.3 * prec + rec)
    return float(np.nan_to_num(f, nan=0.0).max()) * 100.0


def _sal_logits(prob: np.ndarray) -> torch.Tensor:
    p = np.clip(prob.astype(np.float64), 1e-7, 1 - 1e-7)
    return torch.from_numpy(np.stack([np.zeros_like(p), np.log(p / (1 - p))], axis=1)).float()


def test_saliency_thresholds_are_torch_float32_arange():
    m = SaliencyMeter()
    assert m.thresholds.dtype == torch.float32 and len(m.thresholds) == 19
    assert torch.equal(m.thresholds, THRESHOLDS)
    assert not np.array_equal(THRESHOLDS.numpy(), np.arange(0.05, 1, 0.05, dtype=np.float32))  # not numpy's


def test_saliency_maxf_double_sigmoid_quirk_by_hand():
    # positives at probability 0.58 and negatives at 0.5: sigmoid -> 0.6411 and 0.6225. Thresholds <= 0.60 mark
    # everything positive (P = 0.5, R = 1, F = 1.3 * 0.5 / 1.15), 0.65 and above mark nothing (F = 0).
    prob = np.array([[[0.58, 0.58, 0.5, 0.5]]])
    gt = np.array([[[[1, 1, 0, 0]]]], np.float32)
    m = SaliencyMeter()
    m.update(_sal_logits(prob), torch.from_numpy(gt))
    assert m.score()["maxF"] == pytest.approx(100 * 1.3 * 0.5 / 1.15, rel=1e-6)
    assert m.score()["maxF_prob"] == pytest.approx(100.0)  # on the probability itself the split is perfect
    perfect = SaliencyMeter()
    perfect.update(_sal_logits(np.array([[[1.0, 0.0]]])), torch.tensor([[[[1.0, 0.0]]]]))
    assert perfect.score()["maxF"] == pytest.approx(100.0)  # sigmoid(1) = 0.731 >= 0.70 > sigmoid(0) = 0.5


def test_saliency_maxf_accumulates_counts_over_the_split_and_ignores_255():
    rng = np.random.default_rng(6)
    batches = []
    m = SaliencyMeter()
    for k in range(3):
        gt = (rng.random((2, 1, 6, 7)) < (0.2 + 0.25 * k)).astype(np.float32)
        prob = np.clip(0.5 * gt[:, 0] + rng.normal(0.3, 0.25, size=(2, 6, 7)), 0, 1)
        gt[0, 0, 0] = IGN
        raw = _sal_logits(prob)
        raw[0, 0, 0], raw[0, 1, 0] = 0.0, 20.0  # confident predictions on ignored pixels must not count
        m.update(raw, torch.from_numpy(gt))
        batches.append((raw, gt))
    assert m.score()["maxF"] == pytest.approx(ref_maxf(batches), rel=1e-9)
    per_batch = np.mean([ref_maxf([b]) for b in batches])
    assert abs(per_batch - m.score()["maxF"]) > 1e-3


def test_saliency_threshold_is_inclusive():
    # logits whose upstream score equals threshold 0.60 exactly: >= counts them, > would not
    t = THRESHOLDS[11]
    p_t = math.log(float(t) / (1 - float(t)))  # probability whose sigmoid is t
    x_t = math.log(p_t / (1 - p_t))  # logit of that probability (channel 0 at 0)
    xs = (x_t + np.arange(-4000, 4000) * 2e-8).astype(np.float32)
    raw = torch.stack([torch.zeros(len(xs)), torch.from_numpy(xs)], 0)[None, :, None, :]  # [1,2,1,N]
    s = _scores(raw).numpy()
    hits = s == t.numpy()
    assert hits.any()  # the construction found exact ties
    gt = (s >= t.numpy()).astype(np.float32)[None, None, None, :]  # perfect at 0.60 only when ties count
    m = SaliencyMeter()
    m.update(raw, torch.from_numpy(gt))
    assert m.score()["maxF"] == pytest.approx(100.0)
    assert ref_maxf([(raw, gt)]) == pytest.approx(100.0)
    assert ref_maxf([(raw, gt)], strict=True) < 100.0 - 1e-6


# ---- normals, depth, edge meters ------------------------------------------------------------------------------------
def ref_normals_deg(raws: list[np.ndarray], gts: list[np.ndarray], quantise: bool = False) -> np.ndarray:
    out = []
    for raw, g in zip(raws, gts):
        r = raw.astype(np.float64)
        n = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
        enc = (n + 1.0) * 255.0 / 2.0
        if quantise:
            enc = enc.astype(np.uint8).astype(np.float64)
        p = 2.0 * enc / 255.0 - 1.0

        def unit(v):
            nv = np.linalg.norm(v, axis=1, keepdims=True)
            return np.where(nv == 0, 0.0, v / np.where(nv == 0, 1.0, nv))

        p, gg = unit(p), unit(g.astype(np.float64))
        deg = np.degrees(2 * np.arctan2(np.linalg.norm(p - gg, axis=1), np.linalg.norm(p + gg, axis=1)))
        valid = (g != IGN).all(axis=1)
        out.append(deg[valid])
    return np.concatenate(out)


def test_normals_mean_angle_from_the_float_encoding_round_trip():
    rng = np.random.default_rng(7)
    m = NormalsMeter()
    raws, gts = [], []
    for k in range(2):
        raw = rng.normal(size=(2, 3, 5, 6)).astype(np.float32)
        g = raw + rng.normal(scale=0.3, size=raw.shape).astype(np.float32)
        g = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)
        g[0, :, 0, k] = IGN
        g[1, 1, 1, 1] = IGN  # one channel 255 -> ignored
        g[1, :, 2, 2] = 0.0  # a zero GT vector that is not 255 stays valid (normalised to 0: 90 degrees)
        m.update(torch.from_numpy(raw), torch.from_numpy(g))
        raws.append(raw)
        gts.append(g)
    deg = ref_normals_deg(raws, gts)
    assert m.score()["mean"] == pytest.approx(deg.mean(), abs=1e-4)
    assert abs(ref_normals_deg(raws, gts, quantise=True).mean() - deg.mean()) > 1e-2  # no uint8 on this path


def test_depth_metrics_pooled_with_upstream_replacement_of_non_positive_values():
    g1 = np.array([[[[1.0, 2.0, 255.0, 0.0]]]], np.float32)  # GT 0 not turned into 255 stays valid as 1e-9
    p1 = np.array([[[[1.5, -0.5, 9.0, 0.2]]]], np.float32)  # negative prediction: clamped to 0, then 1e-9
    g2 = np.array([[[[4.0, 3.0, 255.0, 255.0]]]], np.float32)
    p2 = np.array([[[[3.0, 3.5, 1.0, 1.0]]]], np.float32)
    m = DepthMeter()
    m.update(torch.from_numpy(p1), torch.from_numpy(g1))
    m.update(torch.from_numpy(p2), torch.from_numpy(g2))
    g = np.array([1.0, 2.0, 1e-9, 4.0, 3.0], np.float32).astype(np.float64)
    p = np.array([1.5, 1e-9, 0.2, 3.0, 3.5], np.float32).astype(np.float64)
    s = m.score()
    assert s["rmse"] == pytest.approx(math.sqrt(np.mean((g - p) ** 2)), rel=1e-6)
    assert s["log_rmse"] == pytest.approx(math.sqrt(np.mean((np.log(g) - np.log(p)) ** 2)), rel=1e-5)
    assert s["abs_rel"] == pytest.approx(np.mean(np.abs(g - p) / g), rel=1e-5)
    assert s["sq_rel"] == pytest.approx(np.mean((g - p) ** 2 / g), rel=1e-5)
    per_image = np.mean([math.sqrt(np.mean((g[:3] - p[:3]) ** 2)), math.sqrt(np.mean((g[3:] - p[3:]) ** 2))])
    assert abs(per_image - s["rmse"]) > 1e-3


def test_edge_meter_is_the_loss_of_probabilities_over_all_valid_pixels():
    rng = np.random.default_rng(8)
    m = EdgeMeter()
    xs, ys = [], []
    for k in range(2):
        x = rng.normal(scale=2, size=(1, 1, 4, 5)).astype(np.float32)
        y = (rng.random((1, 1, 4, 5)) < 0.3).astype(np.float32)
        y[0, 0, : 3 * k] = IGN  # batches with different valid counts
        m.update(torch.from_numpy(x), torch.from_numpy(y))
        xs.append(x)
        ys.append(y)
    prob = [1 / (1 + np.exp(-x.astype(np.float64))) for x in xs]
    per_pixel = np.concatenate([np.where(y == 1, 0.95 * _softplus(-p), 0.05 * _softplus(p))[y != IGN]
                                for p, y in zip(prob, ys)])
    assert m.score()["loss"] == pytest.approx(per_pixel.mean(), rel=1e-5)
    batch_means = np.mean([ref_edge(p, y) for p, y in zip(prob, ys)])
    assert abs(batch_means - per_pixel.mean()) > 1e-4


def test_edge_png_truncates_255_sigmoid():
    target = np.array([10.7, 127.6, 200.9, 254.5])  # fractional parts far from 0 and 1
    x = np.log(target / (255.0 - target)).astype(np.float32)
    img = prediction_image(get_dataset("nyud_v2").task("edge"), torch.from_numpy(x).reshape(1, 1, 4))
    np.testing.assert_array_equal(img, [[10, 127, 200, 254]])
    assert img.dtype == np.uint8


def test_eval_protocol_ignores_the_padding(tmp_path):
    rng = np.random.default_rng(9)
    h, w = 40, 50
    sample = {
        "image": rng.uniform(0, 255, size=(h, w, 3)).astype(np.float32),
        "semseg": rng.integers(0, 40, size=(h, w)).astype(np.float32),
        "depth": rng.uniform(0.5, 5, size=(h, w)).astype(np.float32),
        "normals": decode_normals_png(rng.integers(0, 256, size=(h, w, 3))),
        "edge": (rng.random((h, w)) < 0.2).astype(np.float32),
        "meta": {"id": "000007", "size": (h, w)},
    }
    s = build_eval_transforms(NYUD_CFG)(sample, rng)
    top, left = s["meta"]["pad"]
    assert (top, left) == ((64 - h) // 2, (64 - w) // 2)
    ds = get_dataset("nyud_v2")
    outs = {t.name: torch.from_numpy(rng.normal(size=(1, t.channels, 64, 64)).astype(np.float32)) for t in ds.tasks}
    tg = {t.name: s[t.name][None] for t in ds.tasks}
    full = build_evaluator(NYUD_CFG, save_dir=tmp_path)
    full.update(outs, tg, meta=[s["meta"]])
    crop = (slice(None), slice(None), slice(top, top + h), slice(left, left + w))
    inner = build_evaluator(NYUD_CFG)
    inner.update({k: v[crop] for k, v in outs.items()}, {k: v[crop] for k, v in tg.items()})
    a, b = full.score(), inner.score()
    assert a["semseg"]["mIoU"] == b["semseg"]["mIoU"]
    for task, key in (("depth", "rmse"), ("depth", "abs_rel"), ("normals", "mean"), ("edge", "loss")):
        assert a[task][key] == pytest.approx(b[task][key], rel=1e-6)
    png = np.array(Image.open(tmp_path / "edge" / "000007.png"))
    assert png.shape == (h, w)
    np.testing.assert_array_equal(png, prediction_image(ds.task("edge"), outs["edge"][0][:, top:top + h,
                                                                                         left:left + w]))


# ---- labels (spec §14) ----------------------------------------------------------------------------------------------
def test_saliency_label_is_grey_over_255_above_half(tmp_path):
    png = np.array([[0, 127, 128, 255]], np.uint8)
    Image.fromarray(png).save(tmp_path / "s.png")
    np.testing.assert_array_equal(read_saliency_png(tmp_path / "s.png"), [[0, 0, 1, 1]])


def test_normals_png_decoding_is_2v_over_255_minus_1():
    v = np.array([[[0, 127, 128], [255, 64, 191]]], np.uint8)
    out = decode_normals_png(v)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, (2.0 * v.astype(np.float32) / np.float32(255.0) - 1.0).astype(np.float32))
    assert out[0, 0, 0] == -1.0 and out[0, 1, 0] == 1.0


def _laplacian_4(lm: np.ndarray) -> np.ndarray:
    """OpenCV's default 3x3 Laplacian (kernel 0 1 0 / 1 -4 1 / 0 1 0) with reflect-101 borders, in numpy."""
    p = np.pad(lm.astype(np.float64), 1, mode="reflect")
    return p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * p[1:-1, 1:-1]


def test_pascal_edges_are_thinned_nonzero_laplacian_of_the_labelmap():
    morphology = pytest.importorskip("skimage.morphology")
    rng = np.random.default_rng(10)
    lm = np.full((24, 30), 158, np.int64)
    lm[3:15, 4:20] = 284
    lm[10:22, 12:27] = 72
    lm[0, :] = rng.integers(1, 459, size=30)
    ref = morphology.thin(np.abs(_laplacian_4(lm)) > 0).astype(np.float32)
    out = edges_from_labelmap(lm)
    np.testing.assert_array_equal(out, ref)
    assert out.dtype == np.float32 and set(np.unique(out)) == {0.0, 1.0}
    assert out.sum() < (np.abs(_laplacian_4(lm)) > 0).sum()  # thinning removed pixels of the two-pixel bands


def test_normals_valid_classes_match_upstreams_db_info():
    # upstream: NYU class names that are PASCAL-Context class names, except 'unknown', plus tvmonitor; from the
    # db_info JSON files (context ids: bed 18, chair 72, person 284, wall 440, window 454, tvmonitor 427)
    v = set(NORMALS_VALID_CONTEXT_CLASSES)
    assert len(v) == len(NORMALS_VALID_CONTEXT_CLASSES) == 170
    assert {18, 72, 284, 440, 454, 427} <= v
    assert not v & {431, 360, 187, 2, 259}  # unknown, sky, grass, aeroplane, mountain


def test_human_parts_grouping_is_upstreams_six_part_table():
    six = {"hair": 1, "head": 1, "lear": 1, "lebrow": 1, "leye": 1, "lfoot": 6, "lhand": 4, "llarm": 4, "llleg": 6,
           "luarm": 3, "luleg": 5, "mouth": 1, "neck": 2, "nose": 1, "rear": 1, "rebrow": 1, "reye": 1, "rfoot": 6,
           "rhand": 4, "rlarm": 4, "rlleg": 6, "ruarm": 3, "ruleg": 5, "torso": 2}
    assert dict(HUMAN_PART_IDS) == six


def test_mismatched_label_sizes_are_resized_as_upstream(tmp_path):
    # upstream derives edges and the normals mask from the LabelMap at its own size, then resizes to the image:
    # nearest for every label, bicubic for normals
    pytest.importorskip("scipy.io")
    morphology = pytest.importorskip("skimage.morphology")
    import scipy.io as sio

    root = tmp_path / "PASCALContext"
    (root / "ImageSets" / "Context").mkdir(parents=True)
    (root / "ImageSets" / "Context" / "val.txt").write_text("a\n")
    (root / "JPEGImages").mkdir()
    cv2.imwrite(str(root / "JPEGImages" / "a.jpg"), np.full((12, 16, 3), 100, np.uint8))  # image 12x16
    lm = np.full((9, 11), 440, np.int64)
    lm[2:7, 3:9] = 360  # sky: outside the normals' valid classes
    (root / "pascal-context" / "trainval").mkdir(parents=True)
    sio.savemat(str(root / "pascal-context" / "trainval" / "a.mat"), {"LabelMap": lm})
    rgb = np.random.default_rng(11).integers(0, 256, size=(9, 11, 3)).astype(np.uint8)
    (root / "normals_distill").mkdir()
    Image.fromarray(rgb).save(root / "normals_distill" / "a.png")
    t = load_targets(PascalContextReader(tmp_path, "val"), 0, ["edge", "normals"])
    edge_ref = cv2.resize(morphology.thin(np.abs(_laplacian_4(lm)) > 0).astype(np.float32), (16, 12),
                          interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(t["edge"], edge_ref)
    n = decode_normals_png(rgb)
    n = np.where((lm != 360)[:, :, None], n, np.float32(0.0)).astype(np.float32)
    np.testing.assert_allclose(t["normals"], cv2.resize(n, (16, 12), interpolation=cv2.INTER_CUBIC), atol=1e-6)


# ---- transforms (spec §10; upstream data/transforms.py) -------------------------------------------------------------
def _sample(h: int, w: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n = rng.normal(size=(h, w, 3))
    return {
        "image": rng.uniform(0, 255, size=(h, w, 3)).astype(np.float32),
        "semseg": rng.integers(0, 5, size=(h, w)).astype(np.float32),
        "depth": rng.uniform(1, 4, size=(h, w)).astype(np.float32),
        "normals": (n / np.linalg.norm(n, axis=2, keepdims=True)).astype(np.float32),
        "edge": (rng.random((h, w)) < 0.2).astype(np.float32),
    }


def test_random_scaling_truncates_the_size_and_divides_depth():
    differs = False
    for seed in range(6):
        s = _sample(37, 53, seed)
        ref = {k: v.copy() for k, v in s.items()}
        out = RandomScaling(0.5, 2.0)(s, np.random.default_rng(seed))
        sc = out["meta"]["scale"]
        hw = (int(37 * sc), int(53 * sc))
        differs |= hw != (round(37 * sc), round(53 * sc))
        assert out["image"].shape[:2] == hw
        np.testing.assert_allclose(out["image"], cv2.resize(ref["image"], hw[::-1], interpolation=cv2.INTER_LINEAR))
        for k in ("semseg", "normals", "edge"):
            np.testing.assert_array_equal(out[k], cv2.resize(ref[k], hw[::-1], interpolation=cv2.INTER_NEAREST))
        np.testing.assert_allclose(out["depth"], cv2.resize(ref["depth"], hw[::-1], interpolation=cv2.INTER_NEAREST)
                                   / np.float32(sc), rtol=1e-6)
    assert differs  # truncation and rounding disagree on at least one of these draws


class _CountingRng:
    """Duck-typed generator that records every ``integers`` draw (RandomCrop draws offsets only with it)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.calls: list[int] = []

    def integers(self, *args, **kwargs):
        v = self.rng.integers(*args, **kwargs)
        self.calls.append(int(v))
        return v


def test_random_crop_checks_ten_times_then_keeps_the_last_offset():
    seg = np.ones((40, 90), np.float32)  # one class: never acceptable
    image = np.arange(40 * 90 * 3, dtype=np.float32).reshape(40, 90, 3)
    s = {"image": image.copy(), "semseg": seg}
    rng = _CountingRng(0)
    out = RandomCrop((32, 32), cat_max_ratio=0.75)(s, rng)
    assert len(rng.calls) == 2 * 11  # first location + 10 redraws after the 10 failed checks
    top, left = rng.calls[-2:]
    assert out["meta"]["crop"][:2] == (top, left)
    np.testing.assert_array_equal(out["image"], image[top:top + 32, left:left + 32])


def test_random_crop_ratio_excludes_ignored_pixels():
    # left half: class 1 with a band of 255 (one valid class -> rejected; counting 255 as a class would accept it)
    seg = np.ones((32, 192), np.float32)
    seg[:16, :96] = 255
    seg[:16, 96:] = 2  # right half: classes 1 and 2, half each -> accepted
    accepted_right = 0
    for k in range(30):
        s = {"image": np.zeros((32, 192, 3), np.float32), "semseg": seg.copy()}
        crop = RandomCrop((32, 32))(s, np.random.default_rng(k))["semseg"]
        accepted_right += bool((crop == 2).any())
    assert accepted_right >= 28  # rejected left crops are redrawn


def test_horizontal_flip_negates_normals_x_only():
    s = _sample(6, 7)
    ref = {k: v.copy() for k, v in s.items()}
    out = RandomHorizontalFlip(p=1.0)(s, np.random.default_rng(0))
    np.testing.assert_array_equal(out["semseg"], ref["semseg"][:, ::-1])
    np.testing.assert_array_equal(out["normals"][..., 0], -ref["normals"][:, ::-1, 0])
    np.testing.assert_array_equal(out["normals"][..., 1:], ref["normals"][:, ::-1, 1:])


def test_photometric_distortion_ranges_and_uint8_truncation():
    img = np.zeros((2, 2, 3), np.float32)
    img[:] = (0, 255, 255)  # cyan: hue 90, round trip through HSV is exact
    shifts, brightness = set(), []
    hue_only = PhotoMetricDistortion(brightness_delta=0, contrast_range=(1, 1), saturation_range=(1, 1))
    for k in range(2500):
        out = hue_only({"image": img.copy()}, np.random.default_rng(k))["image"].astype(np.uint8)
        shifts.add(int(cv2.cvtColor(out, cv2.COLOR_RGB2HSV)[0, 0, 0]) - 90)
    b_only = PhotoMetricDistortion(contrast_range=(1, 1), saturation_range=(1, 1))  # hue moves nothing on grey
    for k in range(400):
        grey = np.full((1, 1, 3), 100.0, np.float32)
        brightness.append(float(b_only({"image": grey}, np.random.default_rng(k))["image"][0, 0, 0]) - 100)
    assert shifts == set(range(-18, 18)) | {0}  # upstream: randint(-18, 17), never +18
    assert min(brightness) >= -32 and max(brightness) <= 31 and min(brightness) < -25 and max(brightness) > 25
    frac = np.full((1, 2, 3), 12.7, np.float32)
    ident = PhotoMetricDistortion(brightness_delta=0, contrast_range=(1, 1), saturation_range=(1, 1))
    np.testing.assert_array_equal(ident({"image": frac}, np.random.default_rng(0))["image"], 12.0)  # astype(uint8)


def test_photometric_distortion_defaults():
    d = PhotoMetricDistortion()
    assert (d.brightness_delta, d.contrast_range, d.saturation_range, d.hue_delta) == (32, (0.5, 1.5), (0.5, 1.5),
                                                                                        18)


def test_normalize_pad_and_ignore_regions():
    h, w = 5, 6
    s = _sample(h, w)
    s["human_parts"] = np.zeros((h, w), np.float32)
    s["sal"] = np.ones((h, w), np.float32)
    s["depth"][0, 0] = 0.0
    s["normals"][1, 1] = 0.0
    ref = {k: v.copy() for k, v in s.items()}
    out = ToTensor()(AddIgnoreRegions()(PadImage((8, 10))(Normalize()(s, None), None), None), None)
    top, left = (8 - h) // 2, (10 - w) // 2
    inner = (slice(top, top + h), slice(left, left + w))
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    img = out["image"].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(img[inner], (ref["image"] / np.float32(255) - mean) / std, rtol=1e-6, atol=1e-6)
    pad = np.ones((8, 10), bool)
    pad[inner] = False
    assert (img[pad] == 0).all()
    for k in ("semseg", "edge", "sal", "depth", "human_parts"):
        assert out[k].shape == (1, 8, 10) and (out[k][0].numpy()[pad] == 255).all(), k
    assert out["normals"].shape == (3, 8, 10) and (out["normals"].numpy()[:, pad] == 255).all()
    assert (out["human_parts"] == 255).all()  # no part anywhere: the whole map is ignored
    assert out["depth"][0, top, left] == 255 and (out["normals"][:, top + 1, left + 1] == 255).all()
    np.testing.assert_array_equal(out["semseg"][0].numpy()[inner], ref["semseg"])


def test_pipeline_orders_and_parameters():
    t = build_train_transforms(PASCAL_CFG)
    kinds = [type(x) for x in t.transforms]
    assert kinds == [RandomScaling, RandomCrop, RandomHorizontalFlip, PhotoMetricDistortion, Normalize, PadImage,
                     AddIgnoreRegions, ToTensor]
    sc, crop, flip = t.transforms[:3]
    assert (sc.min_scale, sc.max_scale) == (0.5, 2.0)
    assert crop.size == (64, 64) and crop.cat_max_ratio == 0.75 and crop.max_retries == 10
    assert flip.p == 0.5 and t.transforms[5].size == (64, 64)
    e = build_eval_transforms(NYUD_CFG)
    assert [type(x) for x in e.transforms] == [Normalize, PadImage, AddIgnoreRegions, ToTensor]


def test_dataset_images_keep_their_stored_orientation_like_upstreams_pil(tmp_path):
    """A JPEG with EXIF orientation 6: upstream (PIL) reads the stored 20x40 pixels, which the labels match; a
    user's photo for invpt-infer is shown rotated (40x20), as a viewer shows it."""
    from PIL import Image

    from invpt.data.datasets import PascalContextReader
    from invpt.data.synthetic import make_synthetic
    from invpt.data.transforms import read_image

    root = make_synthetic("pascal_context", tmp_path / "db", n_train=1, n_val=1)
    reader = PascalContextReader(root, split="val")
    path = reader.image_path(0)
    stored = np.asarray(Image.open(path).convert("RGB"))
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    im.save(path, exif=exif, quality=100)
    h, w = stored.shape[:2]
    assert h != w, "the test needs a non-square image to see a rotation"
    assert read_image(path).shape[:2] == (w, h)
    assert reader.load(0).shape[:2] == (h, w)
    np.testing.assert_array_equal(reader.load(0), np.asarray(Image.open(path).convert("RGB")))
