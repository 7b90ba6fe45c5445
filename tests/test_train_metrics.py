"""The evaluation metrics (invpt.train.metrics) against hand and numpy computations of the official definitions."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from invpt.errors import ConfigError, InputError
from invpt.tasks import get_dataset
from invpt.train.metrics import (
    DepthMeter,
    EdgeMeter,
    NormalsMeter,
    SaliencyMeter,
    SegmentationMeter,
    build_evaluator,
)

PASCAL = get_dataset("pascal_context")
NYUD = get_dataset("nyud_v2")


def _onehot_logits(labels: np.ndarray, c: int, scale: float = 10.0) -> torch.Tensor:
    """[B,H,W] ids -> [B,C,H,W] logits whose argmax is ``labels``."""
    return torch.nn.functional.one_hot(torch.from_numpy(labels).long(), c).permute(0, 3, 1, 2).float() * scale


def _sal_logits(prob: np.ndarray) -> torch.Tensor:
    """[B,H,W] probabilities -> [B,2,H,W] logits with softmax[:, 1] == prob."""
    p = np.clip(prob.astype(np.float64), 1e-12, 1 - 1e-12)
    return torch.from_numpy(np.stack([np.zeros_like(p), np.log(p / (1 - p))], axis=1)).float()


def _random_batch(dataset, b: int, seed: int, h: int = 12, w: int = 16):
    """Random raw outputs and official-layout targets (with ignored pixels) for every task of ``dataset``."""
    rng = np.random.default_rng(seed)
    outs, tg = {}, {}
    for t in dataset.tasks:
        outs[t.name] = torch.from_numpy(rng.normal(size=(b, t.channels, h, w)).astype(np.float32))
        if t.kind == "label":
            y = rng.integers(0, t.channels, size=(b, 1, h, w)).astype(np.float32)
        elif t.kind in ("saliency", "boundary"):
            y = rng.integers(0, 2, size=(b, 1, h, w)).astype(np.float32)
        elif t.kind == "depth":
            y = rng.uniform(0.5, 6.0, size=(b, 1, h, w)).astype(np.float32)
            outs[t.name] = torch.from_numpy(y + rng.normal(scale=0.7, size=y.shape).astype(np.float32))
        else:
            y = rng.normal(size=(b, 3, h, w))
            y = (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)
        ignore = rng.random((b, 1, h, w)) < 0.2
        y[np.broadcast_to(ignore, y.shape)] = 255
        tg[t.name] = torch.from_numpy(y)
    outs["inter_preds"] = {k: v * 0 for k, v in outs.items()}  # ignored by the evaluator
    return outs, tg


def _assert_scores_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for t in a:
        assert a[t].keys() == b[t].keys()
        for k in a[t]:
            np.testing.assert_allclose(np.asarray(a[t][k], dtype=float), np.asarray(b[t][k], dtype=float),
                                       rtol=1e-9, atol=1e-9, err_msg=f"{t}.{k}")


# ---- segmentation ----------------------------------------------------------------------------------------------
def test_miou_perfect_and_absent_classes():
    m = SegmentationMeter(21)
    gt = np.arange(21 * 4).reshape(1, 6, 14) % 21
    m.update(_onehot_logits(gt, 21), torch.from_numpy(gt[:, None].astype(np.float32)))
    s = m.score()
    assert s["mIoU"] == pytest.approx(100.0) and s["IoU"] == pytest.approx([100.0] * 21)
    # perfect on 2 classes only: the 19 absent classes count as IoU 0 in the mean over all classes
    m = SegmentationMeter(21)
    gt2 = np.array([[[0, 0, 5, 5]]])
    m.update(_onehot_logits(gt2, 21), torch.from_numpy(gt2[:, None].astype(np.float32)))
    assert m.score()["mIoU"] == pytest.approx(2 / 21 * 100)


def test_miou_one_pixel_wrong_by_hand():
    gt = np.repeat(np.arange(7), 2).reshape(1, 2, 7)  # every human-part class twice
    pred = gt.copy()
    idx = np.argwhere(gt[0] == 1)[0]
    pred[0, idx[0], idx[1]] = 2  # one pixel of class 1 predicted as class 2
    m = SegmentationMeter(7)
    m.update(_onehot_logits(pred, 7), torch.from_numpy(gt[:, None].astype(np.float32)))
    # class 1: TP 1, FN 1 -> 1/2; class 2: TP 2, FP 1 -> 2/3; the other five: 1
    assert m.score()["mIoU"] == pytest.approx((5 + 1 / 2 + 2 / 3) / 7 * 100)
    assert m.score()["IoU"][1] == pytest.approx(50.0) and m.score()["IoU"][2] == pytest.approx(200 / 3)


def test_miou_matches_upstream_per_class_counting_on_random_data():
    rng = np.random.default_rng(0)
    c = 21
    gt = rng.integers(0, c, size=(3, 9, 11))
    gt[rng.random(gt.shape) < 0.2] = 255
    gt[rng.random(gt.shape) < 0.05] = 30  # valid but out of range: a false positive of the predicted class
    logits = rng.normal(size=(3, c, 9, 11)).astype(np.float32)
    m = SegmentationMeter(c)
    m.update(torch.from_numpy(logits), torch.from_numpy(gt[:, None].astype(np.float32)))
    pred = logits.argmax(1)
    valid = gt != 255
    expected = []
    for i in range(c):
        tp = np.sum((gt == i) & (pred == i) & valid)
        fp = np.sum((gt != i) & (pred == i) & valid)
        fn = np.sum((gt == i) & (pred != i) & valid)
        expected.append(tp / max(tp + fp + fn, 1e-8))
    assert m.score()["IoU"] == pytest.approx([100 * v for v in expected])
    assert m.score()["mIoU"] == pytest.approx(100 * np.mean(expected))


def test_human_parts_unannotated_images_are_ignored():
    ev_a, ev_b = build_evaluator("tiny_pascal"), build_evaluator("tiny_pascal")
    outs, tg = _random_batch(PASCAL, 2, seed=1)
    tg["human_parts"][1] = 255.0  # image 1 has no part annotation
    ev_a.update(outs, tg)
    ev_b.update({k: v[:1] for k, v in outs.items() if k != "inter_preds"}, {k: v[:1] for k, v in tg.items()})
    assert ev_a.score()["human_parts"] == ev_b.score()["human_parts"]


# ---- saliency ----------------------------------------------------------------------------------------------------
def _max_f_numpy(scores: np.ndarray, gt: np.ndarray) -> float:
    thresholds = np.arange(1, 20) * 0.05  # 0.05 .. 0.95, 19 values
    valid = gt != 255
    s, g = scores[valid], gt[valid] == 1
    best = 0.0
    for t in thresholds:
        pos = s >= t
        tp, pp, ap = np.sum(pos & g), np.sum(pos), np.sum(g)
        with np.errstate(invalid="ignore", divide="ignore"):
            p, r = tp / pp, tp / ap
            f = 1.3 * p * r / (0.3 * p + r)
        best = max(best, 0.0 if np.isnan(f) else float(f))
    return 100 * best


def test_saliency_quirk_by_hand():
    # positive p = 0.15, negative p = 0.05: the usual maxF separates them at t = 0.1 (100). The official meter sees
    # sigmoid(p) = 0.537 and 0.512: every threshold <= 0.5 marks both positive (P 1/2, R 1), 0.55+ marks none.
    prob = np.array([[[0.15, 0.05]]])
    m = SaliencyMeter()
    m.update(_sal_logits(prob), torch.tensor([[[[1.0, 0.0]]]]))
    s = m.score()
    assert s["maxF_prob"] == pytest.approx(100.0)
    assert s["maxF"] == pytest.approx(100 * 1.3 * 0.5 / (0.3 * 0.5 + 1.0))  # 56.52
    assert len(m.thresholds) == 19


def test_saliency_both_definitions_match_numpy_and_differ():
    rng = np.random.default_rng(2)
    gt = (rng.random((2, 1, 10, 12)) < 0.4).astype(np.float32)
    prob = np.clip(np.where(gt[:, 0] == 1, rng.normal(0.65, 0.2, gt[:, 0].shape), rng.normal(0.3, 0.2, gt[:, 0].shape)),
                   0.0, 1.0)
    prob = np.round(prob * 40) / 40 + 0.0123  # keep every value away from a threshold
    prob = np.clip(prob, 0.0, 1.0)
    gt[rng.random(gt.shape) < 0.1] = 255
    m = SaliencyMeter()
    m.update(_sal_logits(prob), torch.from_numpy(gt))
    s = m.score()
    sig = 1 / (1 + np.exp(-prob))
    assert s["maxF"] == pytest.approx(_max_f_numpy(sig, gt[:, 0]), rel=1e-6)
    assert s["maxF_prob"] == pytest.approx(_max_f_numpy(prob, gt[:, 0]), rel=1e-6)
    assert abs(s["maxF"] - s["maxF_prob"]) > 1.0


# ---- normals -----------------------------------------------------------------------------------------------------
def test_normals_known_angles():
    # pixel 0: perfect (the prediction 5x longer), pixel 1: 90 deg, pixel 2: 90 deg, pixel 3: ignored (one channel)
    gt = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [255.0, 0, 0]]).T.reshape(1, 3, 1, 4)
    pred = torch.tensor([[5.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]).T.reshape(1, 3, 1, 4)
    m = NormalsMeter()
    m.update(pred, gt)
    s = m.score()
    assert s["mean"] == pytest.approx(60.0, abs=1e-4)
    assert s["rmse"] == pytest.approx(math.sqrt(2 * 90.0**2 / 3), abs=1e-4)
    assert s["median"] == pytest.approx(90.0, abs=0.006)
    assert s["11.25"] == pytest.approx(100 / 3) and s["30"] == pytest.approx(100 / 3)
    m = NormalsMeter()
    m.update(pred[..., :1], gt[..., :1])
    assert m.score()["mean"] == pytest.approx(0.0, abs=1e-3)
    m = NormalsMeter()
    m.update(-gt[..., :1], gt[..., :1])
    assert m.score()["mean"] == pytest.approx(180.0, abs=1e-3)


def test_normals_match_numpy_formula():
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(2, 3, 5, 7)).astype(np.float32)
    g = rng.normal(size=(2, 3, 5, 7))
    g = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)
    g[:, :, rng.random((5, 7)) < 0.2] = 255
    m = NormalsMeter()
    m.update(torch.from_numpy(raw), torch.from_numpy(g))
    p = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    valid = (g != 255).all(axis=1)
    gv = np.where(valid[:, None], g, 0).astype(np.float64)
    deg = np.degrees(np.arccos(np.clip((p * gv).sum(1), -1, 1)))[valid]
    assert m.score()["mean"] == pytest.approx(deg.mean(), abs=1e-3)
    assert m.score()["median"] == pytest.approx(np.median(deg), abs=0.02)


# ---- depth -------------------------------------------------------------------------------------------------------
def test_depth_metrics_by_hand():
    gt = torch.tensor([[[[1.0, 2.0, 4.0, 255.0, 0.0]]]])
    pred = torch.tensor([[[[1.5, 2.0, -1.0, 7.0, 3.0]]]])  # -1 is clamped to 0, then replaced by 1e-9
    m = DepthMeter()
    m.update(pred, gt)
    g = np.array([1.0, 2.0, 4.0, 1e-9])  # upstream: GT 0 (not 255) stays valid, replaced by 1e-9
    p = np.array([1.5, 2.0, 1e-9, 3.0])
    s = m.score()
    assert s["rmse"] == pytest.approx(np.sqrt(np.mean((g - p) ** 2)), rel=1e-6)
    assert s["log_rmse"] == pytest.approx(np.sqrt(np.mean((np.log(g) - np.log(p)) ** 2)), rel=1e-5)
    assert s["abs_rel"] == pytest.approx(np.mean(np.abs(g - p) / g), rel=1e-6)
    assert s["sq_rel"] == pytest.approx(np.mean((g - p) ** 2 / g), rel=1e-6)
    m = DepthMeter()
    m.update(gt.clone(), gt)
    assert m.score()["rmse"] == 0.0 and m.score()["abs_rel"] == 0.0


def test_depth_rmse_is_over_all_pixels_of_the_split_not_per_image():
    m = DepthMeter()
    gt = torch.full((2, 1, 1, 4), 2.0)
    gt[1, 0, 0, 1:] = 255.0  # image 1 has one valid pixel
    pred = gt.clone()
    pred[0] += 1.0  # image 0: error 1 on 4 pixels
    pred[1, 0, 0, 0] += 3.0  # image 1: error 3 on 1 pixel
    m.update(pred, gt)
    assert m.score()["rmse"] == pytest.approx(math.sqrt((4 * 1 + 9) / 5))


# ---- edge --------------------------------------------------------------------------------------------------------
def test_edge_loss_feeds_probabilities_as_logits():
    x = np.array([[2.0, -1.0, 0.5, 3.0, -4.0]], dtype=np.float32).reshape(1, 1, 1, 5)
    y = np.array([[1, 0, 255, 0, 1]], dtype=np.float32).reshape(1, 1, 1, 5)
    m = EdgeMeter()
    m.update(torch.from_numpy(x), torch.from_numpy(y))
    prob = 1 / (1 + np.exp(-x.astype(np.float64)))
    s = 1 / (1 + np.exp(-prob))  # the probability used as a logit
    per_pixel = np.where(y == 1, 0.95 * -np.log(s), 0.05 * -np.log(1 - s))
    assert m.score()["loss"] == pytest.approx(per_pixel[y != 255].mean(), rel=1e-6)


# ---- nothing valid -----------------------------------------------------------------------------------------------
def test_no_valid_pixel_does_not_crash():
    for ds in (PASCAL, NYUD):
        ev = build_evaluator({"dataset": ds.name, "image_size": [64, 64]})
        outs, tg = _random_batch(ds, 1, seed=4)
        ev.update(outs, {k: torch.full_like(v, 255.0) for k, v in tg.items()})
        s = ev.score()
        assert s["semseg"]["mIoU"] == 0.0
        assert math.isnan(s["normals"]["mean"]) and math.isnan(s["normals"]["median"])
        assert math.isnan(s["edge"]["loss"])
        if ds is PASCAL:
            assert s["sal"] == {"maxF": 0.0, "maxF_prob": 0.0}
        else:
            assert all(math.isnan(v) for v in s["depth"].values())
    assert math.isnan(build_evaluator("tiny_nyud").score()["depth"]["rmse"])  # nothing seen at all


# ---- accumulation, merging, state, reduction ---------------------------------------------------------------------
@pytest.mark.parametrize("dataset", [PASCAL, NYUD], ids=lambda d: d.name)
def test_split_accumulation_equals_one_update_and_merge(dataset):
    cfg = {"dataset": dataset.name, "image_size": [64, 64]}
    outs, tg = _random_batch(dataset, 4, seed=5)
    whole = build_evaluator(cfg)
    whole.update(outs, tg)
    steps = build_evaluator(cfg)
    for i in range(4):
        steps.update({k: v[i:i + 1] for k, v in outs.items() if k != "inter_preds"},
                     {k: v[i:i + 1] for k, v in tg.items()})
    _assert_scores_equal(steps.score(), whole.score())
    a, b = build_evaluator(cfg), build_evaluator(cfg)
    a.update({k: v[:1] for k, v in outs.items() if k != "inter_preds"}, {k: v[:1] for k, v in tg.items()})
    b.update({k: v[1:] for k, v in outs.items() if k != "inter_preds"}, {k: v[1:] for k, v in tg.items()})
    assert a.merge(b) is a
    _assert_scores_equal(a.score(), whole.score())
    # split metrics are not the mean of per-image metrics
    singles = []
    for i in range(4):
        e = build_evaluator(cfg)
        e.update({k: v[i:i + 1] for k, v in outs.items() if k != "inter_preds"}, {k: v[i:i + 1] for k, v in tg.items()})
        singles.append(e.score()["semseg"]["mIoU"])
    assert np.mean(singles) != pytest.approx(whole.score()["semseg"]["mIoU"], rel=1e-3)


def test_state_dict_roundtrip_reset_and_errors(tmp_path):
    outs, tg = _random_batch(PASCAL, 2, seed=6)
    ev = build_evaluator("tiny_pascal")
    ev.update(outs, tg)
    torch.save(ev.state_dict(), tmp_path / "state.pt")
    other = build_evaluator("tiny_pascal")
    other.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    _assert_scores_equal(other.score(), ev.score())
    other.reset()
    assert other.score()["semseg"]["mIoU"] == 0.0 and math.isnan(other.score()["normals"]["mean"])
    with pytest.raises(ValueError, match="state holds tasks"):
        build_evaluator("tiny_nyud").load_state_dict(ev.state_dict())
    with pytest.raises(ValueError, match="cannot merge an evaluator"):
        build_evaluator("tiny_nyud").merge(ev)


def test_all_reduce_without_and_with_a_process_group(tmp_path):
    import torch.distributed as dist

    outs, tg = _random_batch(NYUD, 2, seed=7)
    ev = build_evaluator("tiny_nyud")
    ev.update(outs, tg)
    before = ev.score()
    assert ev.all_reduce() is ev  # no process group: nothing to do
    _assert_scores_equal(ev.score(), before)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ev.reduce()
        _assert_scores_equal(ev.score(), before)
    finally:
        dist.destroy_process_group()


# ---- decoding and prediction files -------------------------------------------------------------------------------
def test_torch_decoding_matches_invpt_data_decode():
    from invpt.data.decode import decode as np_decode
    from invpt.train import metrics

    rng = np.random.default_rng(8)
    for t in PASCAL.tasks + NYUD.tasks:
        raw = rng.normal(size=(2, t.channels, 5, 6)).astype(np.float32) * 3
        ref = np_decode(t, raw)
        x = torch.from_numpy(raw)
        if t.kind == "label":
            np.testing.assert_array_equal(metrics.decode_labels_torch(x).numpy(), ref)
        elif t.kind == "saliency":
            np.testing.assert_allclose(metrics.decode_saliency_torch(x).numpy(), ref, atol=1e-6)
        elif t.kind == "boundary":
            np.testing.assert_allclose(metrics.decode_boundary_torch(x).numpy(), ref, atol=1e-6)
        elif t.kind == "normals":  # after the float encode / decode round trip
            np.testing.assert_allclose(metrics.decode_normals_torch(x).numpy(), ref, atol=1e-6)
        else:
            np.testing.assert_allclose(metrics.decode_depth_torch(x).numpy(), ref, atol=0)


def test_saved_predictions_are_cropped_official_pngs(tmp_path):
    import cv2

    outs, tg = _random_batch(PASCAL, 2, seed=9, h=12, w=16)
    tg["edge"][1] = 255.0  # upstream skips images whose label is entirely ignored
    meta = [{"id": "2008_000001", "size": (8, 10), "pad": (2, 3)},
            {"id": "2008_000002", "size": (12, 16), "pad": (0, 0)}]
    ev = build_evaluator("tiny_pascal", save_dir=tmp_path, save_tasks=["edge", "semseg", "normals", "sal"])
    ev.update(outs, tg, meta)
    edge = cv2.imread(str(tmp_path / "edge" / "2008_000001.png"), cv2.IMREAD_UNCHANGED)
    expected = np.floor(255 * torch.sigmoid(outs["edge"][0, 0, 2:10, 3:13]).numpy()).astype(np.uint8)
    assert edge.dtype == np.uint8 and edge.shape == (8, 10)
    np.testing.assert_array_equal(edge, expected)  # 255 * sigmoid truncated, as upstream's astype(uint8)
    assert not (tmp_path / "edge" / "2008_000002.png").exists()
    labels = cv2.imread(str(tmp_path / "semseg" / "2008_000002.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(labels, outs["semseg"][1].argmax(0).numpy())
    normals = cv2.cvtColor(cv2.imread(str(tmp_path / "normals" / "2008_000001.png")), cv2.COLOR_BGR2RGB)
    n = torch.nn.functional.normalize(outs["normals"][0, :, 2:10, 3:13], dim=0).permute(1, 2, 0).numpy()
    assert np.abs(normals.astype(float) - (n + 1) * 127.5).max() <= 1.0
    assert (tmp_path / "sal" / "2008_000002.png").exists()
    assert not list(tmp_path.rglob(".*tmp*"))  # written atomically, nothing left behind


def test_depth_predictions_are_saved_as_npy(tmp_path):
    outs, tg = _random_batch(NYUD, 1, seed=10)
    ev = build_evaluator("tiny_nyud", tmp_path, save_tasks="all")
    ev.update(outs, tg, [{"id": "0001", "size": (12, 16), "pad": (0, 0)}])
    np.testing.assert_allclose(np.load(tmp_path / "depth" / "0001.npy"), outs["depth"][0, 0].clamp(min=0).numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["depth", "edge", "normals", "semseg"]


def test_saving_needs_meta_and_safe_ids(tmp_path):
    outs, tg = _random_batch(NYUD, 1, seed=11)
    ev = build_evaluator("tiny_nyud", tmp_path)
    assert ev.save_tasks == ("edge",)
    with pytest.raises(ValueError, match="needs meta"):
        ev.update(outs, tg)
    with pytest.raises(InputError, match="cannot name a prediction file"):
        ev.update(outs, tg, [{"id": "../escape", "size": (12, 16), "pad": (0, 0)}])
    with pytest.raises(ConfigError, match="not evaluated tasks"):
        build_evaluator("tiny_nyud", tmp_path, save_tasks=["sal"])


def test_update_errors_name_the_problem():
    outs, tg = _random_batch(NYUD, 1, seed=12)
    ev = build_evaluator("tiny_nyud")
    with pytest.raises(ConfigError, match=r"\['depth'\] missing"):
        ev.update({k: v for k, v in outs.items() if k != "depth"}, tg)
    with pytest.raises(ValueError, match="label resolution"):
        ev.update({**outs, "semseg": outs["semseg"][..., :8]}, tg)


def _reduce_worker(rank: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool (as DataLoader workers do)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        outs, tg = _random_batch(PASCAL, 4, seed=13)
        half = slice(0, 1) if rank == 0 else slice(1, 4)  # uneven shards, as a DistributedSampler's tail can be
        ev = build_evaluator("tiny_pascal")
        ev.update({k: v[half] for k, v in outs.items() if k != "inter_preds"}, {k: v[half] for k, v in tg.items()})
        torch.save(ev.all_reduce().state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif("fork" not in __import__("multiprocessing").get_all_start_methods(), reason="needs fork")
def test_all_reduce_over_two_ranks_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    # fork: the children need no fresh interpreter (spawn would re-import torch and invpt in each)
    ctx = mp.start_processes(_reduce_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=False,
                             start_method="fork")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):  # True once every rank is done; raises if one failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the two gloo ranks did not finish within 120 s")
    outs, tg = _random_batch(PASCAL, 4, seed=13)
    whole = build_evaluator("tiny_pascal")
    whole.update(outs, tg)
    for rank in (0, 1):
        ev = build_evaluator("tiny_pascal")
        ev.load_state_dict(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True))
        _assert_scores_equal(ev.score(), whole.score())
