"""Tests of invpt.data.decode against torch references (spec §11)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from invpt.data.decode import decode, decode_all, normals_to_uint8, probability_to_uint8
from invpt.errors import ConfigError
from invpt.tasks import DATASETS, TaskSpec

ALL_TASKS = sorted({(t.name, t) for ds in DATASETS.values() for t in ds.tasks}, key=lambda p: (p[0], p[1].channels))


def _torch_reference(task: TaskSpec, raw: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(raw)
    if task.kind == "label":
        return x.argmax(dim=-3).numpy()
    if task.kind == "saliency":
        return torch.softmax(x, dim=-3)[..., 1, :, :].numpy()
    if task.kind == "boundary":
        return torch.sigmoid(x)[..., 0, :, :].numpy()
    if task.kind == "normals":
        return F.normalize(x, p=2, dim=-3, eps=1e-12).numpy()
    if task.kind == "depth":
        return x.clamp(min=0)[..., 0, :, :].numpy()
    raise AssertionError(task.kind)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("task", [t for _, t in ALL_TASKS], ids=[f"{n}{t.channels}" for n, t in ALL_TASKS])
def test_decode_matches_torch(task, batched):
    rng = np.random.default_rng(0)
    shape = ((2,) if batched else ()) + (task.channels, 5, 7)
    raw = (rng.standard_normal(shape) * 4).astype(np.float32)
    out = decode(task, raw)
    ref = _torch_reference(task, raw)
    assert out.shape == ref.shape
    if task.kind == "label":
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, ref)
    else:
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_probabilities_are_stable_for_extreme_logits():
    sal, edge = DATASETS["pascal_context"].task("sal"), DATASETS["pascal_context"].task("edge")
    raw = np.array([1e4, -1e4, 0.0, 88.0, -104.0], np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        p_edge = decode(edge, raw.reshape(1, 1, 5))
        p_sal = decode(sal, np.stack([np.zeros_like(raw), raw]).reshape(2, 1, 5))
    for p in (p_edge, p_sal):
        assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
        np.testing.assert_allclose(p[0], [1.0, 0.0, 0.5, 1.0, 0.0], atol=1e-6)


def test_normals_unit_length_and_zero_vector_stays_zero():
    task = DATASETS["nyud_v2"].task("normals")
    raw = np.zeros((3, 2, 2), np.float32)
    raw[:, 0, 0] = (3.0, 0.0, 4.0)
    out = decode(task, raw)
    np.testing.assert_allclose(out[:, 0, 0], (0.6, 0.0, 0.8), rtol=1e-6)
    assert (out[:, 1, 1] == 0).all() and np.isfinite(out).all()


def test_depth_clamped_not_scaled():
    task = DATASETS["nyud_v2"].task("depth")
    out = decode(task, np.array([[[-1.0, 0.5, 3.25]]], np.float32))
    np.testing.assert_array_equal(out, [[0.0, 0.5, 3.25]])


def test_many_classes_use_int64():
    task = TaskSpec("big", 300, "label", "test")
    raw = np.zeros((300, 1, 1), np.float32)
    raw[299] = 1
    out = decode(task, raw)
    assert out.dtype == np.int64 and out[0, 0] == 299


def test_decode_rejects_wrong_channels_and_rank():
    task = DATASETS["pascal_context"].task("semseg")
    with pytest.raises(ConfigError, match="semseg.*40 channels"):
        decode(task, np.zeros((40, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"\[C,H,W\]"):
        decode(task, np.zeros((21, 2), np.float32))


def test_decode_all_dataset_order_subset_and_errors():
    ds = DATASETS["nyud_v2"]
    rng = np.random.default_rng(1)
    outputs = {t.name: rng.standard_normal((t.channels, 3, 3)).astype(np.float32) for t in reversed(ds.tasks)}
    out = decode_all(ds, outputs)
    assert list(out) == list(ds.task_names)  # spec order, not the dict's order
    np.testing.assert_array_equal(out["semseg"], outputs["semseg"].argmax(0))
    # a list of TaskSpecs and a subset of outputs work
    sub = decode_all(list(ds.tasks), {"depth": outputs["depth"]})
    assert list(sub) == ["depth"]
    np.testing.assert_array_equal(decode_all("nyud_v2", outputs)["depth"], out["depth"])  # by dataset name
    with pytest.raises(ConfigError, match="missing"):
        decode_all(ds, {"depth": outputs["depth"]}, require_all=True)
    with pytest.raises(ConfigError, match="sal"):
        decode_all(ds, {"sal": np.zeros((2, 3, 3), np.float32)})


def test_uint8_encodings():
    np.testing.assert_array_equal(normals_to_uint8(np.array([-1.0, 0.0, 1.0, 2.0], np.float32)), [0, 128, 255, 255])
    np.testing.assert_array_equal(probability_to_uint8(np.array([0.0, 0.5, 1.0], np.float32)), [0, 128, 255])
