"""Tests of invpt.data.transforms: reading, normalisation, pad/resize geometry and its inverse."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from invpt.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PadInfo,
    content_fraction,
    content_fraction_for,
    normalize,
    pad_to,
    preprocess,
    read_image,
    resize_to,
    restore_geometry,
    restore_labels,
)
from invpt.errors import ConfigError, InputError


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_read_image_returns_rgb(tmp_path):
    rgb = _rgb(6, 9)
    rgb[0, 0] = (255, 0, 0)  # pure red in RGB
    path = tmp_path / "img.png"
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (6, 9, 3)
    np.testing.assert_array_equal(out, rgb)
    assert tuple(out[0, 0]) == (255, 0, 0)


def test_read_image_grey_becomes_three_channels(tmp_path):
    path = tmp_path / "grey.png"
    cv2.imwrite(str(path), np.full((4, 5), 77, np.uint8))
    out = read_image(path)
    assert out.shape == (4, 5, 3) and (out == 77).all()


def test_read_image_missing_names_path_and_formats(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(InputError) as exc:
        read_image(path)
    assert str(path) in str(exc.value) and ".png" in str(exc.value)


def test_read_image_corrupt_and_directory(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="could not be decoded") as exc:
        read_image(bad)
    assert str(bad) in str(exc.value)
    with pytest.raises(InputError, match="directory"):
        read_image(tmp_path)


def test_normalize_values():
    img = np.zeros((2, 2, 3), np.uint8)
    img[0, 0] = 255
    out = normalize(img)
    assert out.dtype == np.float32 and out.shape == (2, 2, 3)
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    np.testing.assert_allclose(out[0, 0], (1 - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(out[1, 1], -mean / std, rtol=1e-6)


def test_normalize_rejects_non_rgb():
    with pytest.raises(InputError, match="HxWx3"):
        normalize(np.zeros((4, 4), np.uint8))


def test_pad_to_offsets_and_content():
    img = np.arange(5 * 7 * 3, dtype=np.float32).reshape(5, 7, 3) + 1
    out, info = pad_to(img, (10, 12))
    assert out.shape == (10, 12, 3)
    assert info == PadInfo("pad", (5, 7), (10, 12), 2, 2, (5, 7))  # (10-5)//2, (12-7)//2
    np.testing.assert_array_equal(out[2:7, 2:9], img)
    mask = np.ones((10, 12), bool)
    mask[2:7, 2:9] = False
    assert (out[mask] == 0).all()


def test_pad_to_too_large_suggests_resize():
    with pytest.raises(InputError) as exc:
        pad_to(np.zeros((20, 8, 3), np.float32), (16, 16), source="big.jpg")
    msg = str(exc.value)
    assert "big.jpg" in msg and "resize" in msg and "never crops" in msg and "20x8" in msg


def test_pad_to_too_large_default_fix_names_commands_and_custom_fix_replaces_it():
    with pytest.raises(InputError) as exc:
        preprocess(_rgb(20, 8), (16, 16), "pad", source="big.jpg")
    msg = str(exc.value)
    assert "invpt-infer --mode resize" in msg and "invpt-export --preprocess resize" in msg and "\n" not in msg
    with pytest.raises(InputError) as exc:
        preprocess(_rgb(20, 8), (16, 16), "pad", source="big.jpg", fix="Downscale it to at most 16x16.")
    msg = str(exc.value)
    assert msg.endswith("Downscale it to at most 16x16.") and "big.jpg" in msg and "20x8" in msg
    assert "invpt-infer" not in msg


@pytest.mark.parametrize("hw", [(1, 1), (5, 7), (16, 16), (8, 16), (13, 3)])
def test_content_fraction_counts_the_image_pixels_of_the_input(hw):
    """In 'pad' mode the fraction is the share of input pixels that hold the image (the rest is zero padding)."""
    white = np.full(hw + (3,), 255, np.uint8)  # normalises to non-zero in every channel
    x, info = preprocess(white, (16, 16), "pad")
    content = (x != 0).all(axis=0).sum() / x[0].size
    assert content_fraction(info) == pytest.approx(content)
    assert content_fraction(info) == content_fraction_for(hw, (16, 16), "pad") == hw[0] * hw[1] / 256
    _, rs = preprocess(white, (16, 16), "resize")
    assert content_fraction(rs) == 1.0  # stretched over the whole input


def test_content_fraction_for_checks_its_arguments():
    assert content_fraction_for((1, 1), (64, 64), "pad") == 1 / 4096
    assert content_fraction_for((100, 100), (64, 64), "pad") == 1.0  # capped; pad_to refuses such images
    with pytest.raises(ConfigError, match="mode"):
        content_fraction_for((4, 4), (8, 8), "crop")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="image_hw"):
        content_fraction_for((0, 4), (8, 8), "pad")


def test_preprocess_pad_normalises_first():
    img = _rgb(5, 6)
    x, info = preprocess(img, (8, 8), "pad")
    assert x.shape == (3, 8, 8) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    assert (info.top, info.left) == (1, 1)
    # padding is 0 after normalisation (the mean colour), not the normalised value of black
    assert (x[:, 0, :] == 0).all() and (x[:, :, 0] == 0).all()
    np.testing.assert_array_equal(x[:, 1:6, 1:7], normalize(img).transpose(2, 0, 1))


def test_restore_geometry_inverts_pad_exactly():
    img = _rgb(13, 9, seed=1)
    x, info = preprocess(img, (16, 16), "pad")
    back = restore_geometry(x, info)
    np.testing.assert_array_equal(back, normalize(img).transpose(2, 0, 1))
    np.testing.assert_array_equal(restore_geometry(x[0], info), back[0])  # [H,W] too


@pytest.mark.parametrize("src_hw,dst_hw", [((10, 14), (16, 16)), ((30, 22), (16, 16))])
def test_resize_matches_torch_bilinear(src_hw, dst_hw):
    img = _rgb(*src_hw, seed=2)
    x, info = preprocess(img, dst_hw, "resize")
    assert info.mode == "resize" and info.original_hw == src_hw and info.resized_hw == dst_hw
    ref = F.interpolate(
        torch.from_numpy(normalize(img).transpose(2, 0, 1))[None], size=dst_hw, mode="bilinear", align_corners=False
    )[0].numpy()
    np.testing.assert_allclose(x, ref, atol=1e-4)
    # and back to the original size, as the official inference.py does with the outputs
    back = restore_geometry(x, info)
    ref_back = F.interpolate(torch.from_numpy(x)[None], size=src_hw, mode="bilinear", align_corners=False)[0].numpy()
    assert back.shape == (3,) + src_hw
    np.testing.assert_allclose(back, ref_back, atol=1e-4)


def test_resize_to_keeps_single_channel():
    out, info = resize_to(np.ones((4, 6, 1), np.float32), (8, 8))
    assert out.shape == (8, 8, 1) and info.size_hw == (8, 8)


def test_restore_labels_pad_and_resize():
    labels = np.random.default_rng(3).integers(0, 21, size=(16, 16)).astype(np.int64)
    _, pad_info = preprocess(_rgb(10, 12), (16, 16), "pad")
    np.testing.assert_array_equal(restore_labels(labels, pad_info), labels[3:13, 2:14])
    # resize: nearest, only existing labels, block structure preserved
    blocks = np.kron(np.array([[1, 2], [3, 4]], np.uint8), np.ones((8, 8), np.uint8))
    _, rs_info = preprocess(_rgb(4, 6), (16, 16), "resize")
    back = restore_labels(blocks, rs_info)
    assert back.shape == (4, 6) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, np.kron(np.array([[1, 2], [3, 4]], np.uint8), np.ones((2, 3), np.uint8)))


def test_restore_rejects_wrong_size_and_mode():
    _, info = preprocess(_rgb(4, 4), (8, 8), "pad")
    with pytest.raises(ConfigError, match="image_size"):
        restore_geometry(np.zeros((3, 9, 8), np.float32), info)
    with pytest.raises(ConfigError, match="mode"):
        preprocess(_rgb(4, 4), (8, 8), "crop")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="size_hw"):
        preprocess(_rgb(4, 4), (0, 8), "pad")
