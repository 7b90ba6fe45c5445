"""invpt.compare and invpt.latency on constructed cases whose answers are known in closed form."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from invpt.compare import (
    FP32_TOLERANCE,
    TOLERANCES,
    ComparisonResult,
    Tolerance,
    compare,
    compare_outputs,
    tolerance_for,
)
from invpt.errors import InputError
from invpt.latency import LatencyStats, latency_stats
from invpt.tasks import TaskSpec

LABEL = TaskSpec("semseg", 3, "label", "test labels")
SAL = TaskSpec("sal", 2, "saliency", "test saliency")
EDGE = TaskSpec("edge", 1, "boundary", "test edges")
NORMALS = TaskSpec("normals", 3, "normals", "test normals")
DEPTH = TaskSpec("depth", 1, "depth", "test depth")


def _logits(labels: np.ndarray, channels: int) -> np.ndarray:
    """[1, C, H, W] logits whose argmax is ``labels`` ([H, W]): 4 for the class, 0 elsewhere."""
    out = np.zeros((1, channels, *labels.shape), np.float32)
    for c in range(channels):
        out[0, c][labels == c] = 4.0
    return out


def _label_case():
    ref_labels = np.zeros((4, 4), np.int64)
    ref_labels[2:] = 1  # 8 pixels of class 0, 8 of class 1
    test_labels = ref_labels.copy()
    test_labels[0, 0] = 2  # one class-0 pixel flipped to class 2
    return _logits(ref_labels, 3), _logits(test_labels, 3)


# ----------------------------------------------------------------------------------------------- tensor parity

def test_identical_outputs_pass_with_zero_error():
    rng = np.random.default_rng(0)
    specs = [LABEL, SAL, EDGE, NORMALS, DEPTH]
    ref = {s.name: rng.standard_normal((2, s.channels, 5, 6)).astype(np.float32) for s in specs}
    ref["depth"] = np.abs(ref["depth"])
    res = compare(ref, {k: v.copy() for k, v in ref.items()}, specs, "fp32")
    assert res and res.passed and res.samples == 2 and res.failures == {}
    for t in res.tasks.values():
        assert t.max_abs == t.mean_abs == t.p99_abs == t.rel_err == t.rel_l2 == 0.0
        assert t.cosine == pytest.approx(1.0, abs=1e-12) and t.failures == []
        assert t.agreement == (None if t.task in ("normals", "depth") else 1.0)
    agree = res.task_agreement
    assert agree["semseg"] == {"pixel_agreement": 1.0, "miou_vs_reference": 1.0}
    assert agree["sal"]["pixel_agreement"] == 1.0 and agree["sal"]["mean_abs_probability"] == 0.0
    assert agree["depth"] == {"rmse_m": 0.0}
    assert agree["normals"]["mean_angle_deg"] == pytest.approx(0.0, abs=0.05)  # arccos near 1: float32 rounding
    assert res.summary().startswith("PASS")


def test_one_flipped_label_gives_known_agreement_and_miou():
    ref, test = _label_case()
    res = compare({"semseg": ref}, {"semseg": test}, [LABEL], "int8")
    t = res.tasks["semseg"]
    assert t.agreement == 15 / 16
    # IoU: class 0 7/8, class 1 8/8, class 2 0/1 -> mean 0.625.
    assert res.task_agreement["semseg"] == {"pixel_agreement": 15 / 16, "miou_vs_reference": pytest.approx(0.625)}
    # Two logits changed by 4 out of 16 pixels x 3 channels: max abs 4, mean 8/48, max |ref| 4.
    assert t.max_abs == 4.0 and t.mean_abs == pytest.approx(8 / 48) and t.rel_err == 1.0
    assert t.p99_abs == pytest.approx(np.percentile(np.abs(test - ref), 99))
    assert not res and "semseg" in res.failures and any("rel err" in f for f in res.failures["semseg"])


def test_agreement_below_tolerance_fails_and_names_the_task():
    ref, test = _label_case()
    depth = np.full((1, 1, 4, 4), 2.0, np.float32)
    tol = Tolerance(max_rel_err=10.0, min_cosine=0.0, min_agreement=0.95)  # only the agreement can fail
    res = compare_outputs({"semseg": ref, "depth": depth}, {"semseg": test, "depth": depth.copy()}, [LABEL, DEPTH], tol)
    assert not res.passed and not bool(res)
    assert res.tasks["depth"].passed and not res.tasks["semseg"].passed
    assert res.failures == {"semseg": ["agreement 0.93750 < 0.95"]}
    assert "semseg" in res.summary() and "depth" not in res.summary().split(":", 2)[2]
    table = res.markdown()
    assert "| semseg | FAIL |" in table and "| depth | PASS |" in table
    d = res.to_dict()
    assert d["passed"] is False and d["tasks"]["semseg"]["passed"] is False and "task_agreement" not in d
    json.dumps(d)  # what a manifest records must be JSON


def test_saliency_and_boundary_agreement_at_half():
    # Saliency: 8 pixels, reference salient on the first 4; the test flips 2 of them (logit difference -> -1).
    ref = np.zeros((1, 2, 2, 4), np.float32)
    ref[0, 1, 0, :] = 3.0  # top row salient (p = sigmoid(3))
    test = ref.copy()
    test[0, 1, 0, :2] = -1.0
    res = compare({"sal": ref}, {"sal": test}, [SAL], "fp16")
    assert res.tasks["sal"].agreement == 0.75
    assert res.task_agreement["sal"]["pixel_agreement"] == 0.75
    # Boundaries: sign of the logit; 1 of 4 pixels changes sign.
    e_ref = np.array([[[[2.0, -2.0], [1.0, -1.0]]]], np.float32)
    e_test = e_ref.copy()
    e_test[0, 0, 0, 0] = -0.5
    res = compare({"edge": e_ref}, {"edge": e_test}, [EDGE], "fp16")
    assert res.tasks["edge"].agreement == 0.75 and res.task_agreement["edge"]["pixel_agreement"] == 0.75


def test_normals_at_a_known_angle():
    """Half the pixels turned by exactly 10 degrees, the other half equal: mean angle 5 degrees, any raw length."""
    ref = np.zeros((1, 3, 2, 4), np.float32)
    ref[0, 2] = 3.0  # (0, 0, 1) with length 3 before normalisation
    test = ref.copy()
    a = math.radians(10.0)
    test[0, 0, 0, :] = 0.5 * math.sin(a)  # length 0.5: decoding normalises
    test[0, 2, 0, :] = 0.5 * math.cos(a)
    res = compare({"normals": ref}, {"normals": test}, [NORMALS], "int8")
    assert res.task_agreement["normals"]["mean_angle_deg"] == pytest.approx(5.0, abs=1e-3)
    full = compare({"normals": ref[:, :, :1]}, {"normals": test[:, :, :1]}, [NORMALS], "int8")
    assert full.task_agreement["normals"]["mean_angle_deg"] == pytest.approx(10.0, abs=1e-3)
    assert res.tasks["normals"].agreement is None


def test_depth_rmse_is_known_and_negative_depth_is_clamped():
    ref = np.full((1, 1, 2, 2), 2.0, np.float32)
    test = ref.copy()
    test[0, 0, 0, 0] = 5.0  # +3
    test[0, 0, 0, 1] = -2.0  # decoded (clamped) to 0: -2
    res = compare({"depth": ref}, {"depth": test}, [DEPTH], "fp32")
    assert res.task_agreement["depth"]["rmse_m"] == pytest.approx(math.sqrt((9 + 4) / 4))
    t = res.tasks["depth"]
    assert t.max_abs == 4.0 and t.rel_err == 2.0 and t.mean_abs == pytest.approx(7 / 4)
    assert t.rel_l2 == pytest.approx(5.0 / 4.0)  # ||(3, -4, 0, 0)|| / ||(2, 2, 2, 2)||
    assert not res


def test_missing_wrong_shape_and_non_finite_outputs_fail():
    ref = {"depth": np.ones((1, 1, 2, 2), np.float32), "edge": np.ones((1, 1, 2, 2), np.float32),
           "normals": np.ones((1, 3, 2, 2), np.float32)}
    bad = np.ones((1, 1, 2, 2), np.float32)
    bad[0, 0, 0, 0] = np.nan
    res = compare(ref, {"edge": np.ones((1, 1, 2, 3), np.float32), "normals": ref["normals"].copy(), "depth": bad},
                  [DEPTH, EDGE, NORMALS, LABEL], "fp32")
    assert set(res.tasks) == {"depth", "edge", "normals"}  # a task the reference lacks is not compared
    assert res.tasks["normals"].passed
    assert res.tasks["edge"].failures == ["shape (1, 1, 2, 3) != reference (1, 1, 2, 2)"]
    assert "non-finite values in output" in res.tasks["depth"].failures
    assert "edge" not in res.task_agreement  # no task-level metric on a wrong shape
    missing = compare(ref, {"edge": ref["edge"]}, [DEPTH, EDGE], "fp32")
    assert missing.failures == {"depth": ["missing output"]} and missing.tasks["depth"].max_abs == math.inf


def test_an_empty_comparison_does_not_pass():
    res = compare({}, {}, [DEPTH], "fp32")
    assert not res and res.tasks == {} and "no task was compared" in res.summary()


def test_relative_error_and_p99_follow_their_definitions():
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((2, 1, 16, 16)).astype(np.float32) * 4
    test = (ref + rng.standard_normal(ref.shape).astype(np.float32) * 1e-3).astype(np.float32)
    t = compare({"depth": ref}, {"depth": test}, [DEPTH], "fp16").tasks["depth"]
    diff = np.abs(test.astype(np.float64) - ref)
    assert t.max_abs == diff.max() and t.p99_abs == np.percentile(diff, 99)
    assert t.rel_err == diff.max() / np.abs(ref).max()
    assert t.cosine == pytest.approx(np.dot(ref.ravel().astype(np.float64), test.ravel())
                                     / np.linalg.norm(ref.astype(np.float64)) / np.linalg.norm(test.astype(np.float64)))


# ----------------------------------------------------------------------------------------------- tolerances

def test_one_tolerance_table_shared_by_every_stage():
    from invpt.calib.evaluate import PRECISION_TOLERANCES
    from invpt.export import parity

    assert set(TOLERANCES) == {"fp32", "fp16", "int8"}
    assert TOLERANCES["fp32"] is FP32_TOLERANCE is parity.FP32_TOLERANCE
    assert FP32_TOLERANCE == Tolerance(max_rel_err=1e-4, min_cosine=0.99999, min_agreement=0.999)
    assert TOLERANCES["fp16"] == Tolerance(max_rel_err=1e-2, min_cosine=0.9999, min_agreement=0.99)
    assert TOLERANCES["int8"] == Tolerance(max_rel_err=0.15, min_cosine=0.99, min_agreement=0.90)
    assert PRECISION_TOLERANCES is TOLERANCES
    assert parity.ParityReport is ComparisonResult and parity.compare_outputs is compare_outputs
    assert tolerance_for("int8") is TOLERANCES["int8"]
    with pytest.raises(InputError, match="'fp8'.*fp32, fp16, int8"):
        tolerance_for("fp8")


def test_precision_picks_its_tolerance():
    """The same 0.5 % error passes fp16 (rel err <= 1e-2) and fails fp32 (<= 1e-4)."""
    ref = np.full((1, 1, 2, 2), 2.0, np.float32)
    test = ref * np.float32(1.005)
    assert compare({"depth": ref}, {"depth": test}, [DEPTH], "fp16")
    res = compare({"depth": ref}, {"depth": test}, [DEPTH], "fp32")
    assert not res and res.tolerance is FP32_TOLERANCE


def test_calib_evaluate_keeps_its_names():
    from invpt.calib.evaluate import evaluate, miou, task_agreement, task_table

    ref, test = _label_case()
    parity, tasks = evaluate([LABEL], {"semseg": ref}, {"semseg": test}, "int8", "ref", "test")
    assert tasks == parity.task_agreement and tasks["semseg"]["miou_vs_reference"] == pytest.approx(0.625)
    assert parity.reference == "ref" and parity.backend == "test" and parity.tolerance is TOLERANCES["int8"]
    assert miou(np.array([0, 0, 1]), np.array([0, 1, 1]), 2) == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert task_agreement(LABEL, ref, ref) == {"pixel_agreement": 1.0, "miou_vs_reference": 1.0}
    assert "| semseg | miou_vs_reference | 0.6250 |" in task_table(tasks)
    assert "| semseg | miou_vs_reference | 0.6250 |" in parity.markdown()


# ----------------------------------------------------------------------------------------------- feed checks

def test_feed_check_symbolic_dimensions():
    from invpt.manifest import TensorInfo
    from invpt.runners import check_feed

    specs = (TensorInfo("a", "float32", ("batch", "?", 2)), TensorInfo("b", "float32", ("batch", "?")))
    ok = check_feed({"a": np.zeros((3, 5, 2), np.float32), "b": np.zeros((3, 7), np.float32)}, specs, "r")
    assert ok["a"].shape == (3, 5, 2)  # '?' dims are independent, 'batch' is shared
    with pytest.raises(InputError, match="'batch' is 3 in one input and 4 in 'b'"):
        check_feed({"a": np.zeros((3, 5, 2), np.float32), "b": np.zeros((4, 7), np.float32)}, specs, "r")
    with pytest.raises(InputError, match="dimension 2 must be 2"):
        check_feed({"a": np.zeros((3, 5, 3), np.float32), "b": np.zeros((3, 7), np.float32)}, specs, "r")


# ----------------------------------------------------------------------------------------------- latency

def test_latency_statistics_equal_numpys():
    rng = np.random.default_rng(1)
    times = rng.gamma(4.0, 0.002, size=37)
    s = latency_stats(times, batch=4, warmup_s=[0.5])
    for q, got in ((50, s.p50), (90, s.p90), (95, s.p95), (99, s.p99)):
        assert got == np.percentile(times, q)
    assert s.median == np.median(times)
    assert s.mean == pytest.approx(np.mean(times)) and s.std == pytest.approx(np.std(times, ddof=1))
    assert s.min == times.min() and s.max == times.max() and s.n == 37
    assert s.throughput == pytest.approx(4 / np.mean(times))
    d = s.to_dict()
    assert d["p99_ms"] == pytest.approx(np.percentile(times, 99) * 1e3) and d["iterations"] == 37
    assert d["warmup_s"] == [0.5] and d["throughput_ips"] == pytest.approx(4 / np.mean(times))
    json.dumps(d)
    assert "p99" in s.summary() and "n=37" in s.summary()


def test_latency_known_values():
    s = LatencyStats((0.001, 0.002, 0.003, 0.004))
    assert s.mean == pytest.approx(0.0025) and s.p50 == pytest.approx(0.0025) and s.throughput == pytest.approx(400)
    assert s.percentile(0) == 0.001 and s.percentile(100) == 0.004
    assert LatencyStats((0.01,)).std == 0.0


@pytest.mark.parametrize("times,batch", [((), 1), ((0.1, float("nan")), 1), ((0.1, -0.2), 1), ((0.1,), 0)])
def test_latency_refuses_bad_times(times, batch):
    with pytest.raises(InputError):
        LatencyStats(times, batch)


def test_latency_refuses_a_bad_percentile():
    with pytest.raises(InputError, match="between 0 and 100"):
        LatencyStats((0.1,)).percentile(101)
