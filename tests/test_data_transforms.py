"""Tests of invpt.data.transforms: reading, normalisation, pad/resize/letterbox geometry and its inverse."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from invpt.data.decode import decode
from invpt.data.transforms import (
    GEOMETRY_MODES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PadInfo,
    content_fraction,
    content_fraction_for,
    letterbox_hw,
    letterbox_to,
    normalize,
    pad_to,
    preprocess,
    read_image,
    resize_to,
    restore_geometry,
    restore_labels,
)
from invpt.errors import ConfigError, InputError
from invpt.tasks import get_dataset


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


# ---- letterbox ------------------------------------------------------------------------------------------------

def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.where(mask.any(axis=1))[0], np.where(mask.any(axis=0))[0]
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def _rect_mask(h: int, w: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((h, w), np.float32)
    m[r0:r1, c0:c1] = 1.0
    return m


@pytest.mark.parametrize("src_hw", [(200, 100), (100, 200), (300, 300), (65, 64), (64, 500), (1000, 3)])
def test_letterbox_scales_down_to_fit_keeping_the_aspect_ratio(src_hw):
    x, info = preprocess(_rgb(*src_hw), (64, 64), "letterbox")
    h, w = src_hw
    rh, rw = info.resized_hw
    assert x.shape == (3, 64, 64) and info.mode == "letterbox" and info.original_hw == src_hw
    assert info.scale == pytest.approx(min(64 / h, 64 / w)) and info.scale < 1 and info.scaled
    assert max(rh, rw) == 64 and rh <= 64 and rw <= 64  # fills the limiting side
    assert abs(rh - max(1, h * info.scale)) <= 0.5 and abs(rw - max(1, w * info.scale)) <= 0.5  # aspect kept
    assert (info.top, info.left) == ((64 - rh) // 2, (64 - rw) // 2)  # centred like pad
    # everything outside the content is the official pad value (0 after normalisation)
    outside = np.ones((64, 64), bool)
    outside[info.top : info.top + rh, info.left : info.left + rw] = False
    assert (x[:, outside] == 0).all()
    # the content is the normalised image downscaled with INTER_AREA
    ref = cv2.resize(normalize(_rgb(*src_hw)), (rw, rh), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    np.testing.assert_allclose(x[:, info.top : info.top + rh, info.left : info.left + rw], ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("src_hw", [(1, 1), (5, 7), (40, 64), (64, 64), (64, 10), (13, 3)])
def test_letterbox_equals_pad_for_images_that_fit(src_hw):
    """No upscaling: an image that fits is padded exactly as 'pad' does (same tensor, same placement)."""
    img = _rgb(*src_hw, seed=4)
    xl, il = preprocess(img, (64, 64), "letterbox")
    xp, ip = preprocess(img, (64, 64), "pad")
    np.testing.assert_array_equal(xl, xp)
    assert il.scale == 1.0 and not il.scaled and il.resized_hw == il.original_hw == src_hw
    assert (il.top, il.left, il.size_hw) == (ip.top, ip.left, ip.size_hw)
    assert content_fraction(il) == content_fraction(ip)
    np.testing.assert_array_equal(restore_geometry(xl, il), restore_geometry(xp, ip))
    labels = np.random.default_rng(5).integers(0, 9, size=(64, 64)).astype(np.uint8)
    np.testing.assert_array_equal(restore_labels(labels, il), restore_labels(labels, ip))


def test_letterbox_never_upscales_small_images():
    x, info = preprocess(np.full((8, 4, 3), 255, np.uint8), (64, 64), "letterbox")
    assert info.resized_hw == (8, 4) and info.scale == 1.0
    assert int((x != 0).all(axis=0).sum()) == 8 * 4  # still 8x4 pixels of content
    assert letterbox_hw((8, 4), (64, 64)) == ((8, 4), 1.0)


def test_letterbox_hw_limits():
    assert letterbox_hw((1000, 3), (64, 64)) == ((64, 1), 64 / 1000)  # never below one pixel
    assert letterbox_hw((128, 128), (64, 32)) == ((32, 32), 0.25)
    (rh, rw), s = letterbox_hw((513, 1024), (512, 512))
    assert (rh, rw) == (257, 512) and s == 0.5  # 256.5 rounds half up
    with pytest.raises(ConfigError, match="image_hw"):
        letterbox_hw((0, 5), (8, 8))


@pytest.mark.parametrize("src_hw,size", [((200, 50), (64, 64)), ((130, 300), (64, 64)), ((70, 70), (64, 32))])
def test_letterbox_content_fraction_counts_the_scaled_content(src_hw, size):
    white = np.full(src_hw + (3,), 255, np.uint8)  # constant: area averaging keeps it, so content is exactly non-zero
    x, info = preprocess(white, size, "letterbox")
    measured = (x != 0).all(axis=0).sum() / x[0].size
    rh, rw = info.resized_hw
    assert content_fraction(info) == pytest.approx(measured) == pytest.approx(rh * rw / (size[0] * size[1]))
    assert content_fraction_for(src_hw, size, "letterbox") == content_fraction(info)
    assert content_fraction(info) < 1.0 or src_hw[0] * size[1] == src_hw[1] * size[0]
    # 'pad' would count the too-large image as a full input (capped): letterbox is the right number
    assert content_fraction_for((200, 50), (64, 64), "letterbox") == pytest.approx(64 * 16 / 64 ** 2)


@pytest.mark.parametrize("src_hw", [(200, 100), (97, 301), (64, 64), (30, 50), (700, 65)])
def test_letterbox_restore_gives_the_original_size(src_hw):
    img = _rgb(*src_hw, seed=6)
    x, info = preprocess(img, (64, 64), "letterbox")
    assert restore_geometry(x, info).shape == (3,) + src_hw
    assert restore_geometry(x[0], info).shape == src_hw
    assert restore_geometry(x.astype(np.float16), info).shape == (3,) + src_hw
    labels = np.random.default_rng(7).integers(0, 21, size=(64, 64)).astype(np.int64)
    back = restore_labels(labels, info)
    assert back.shape == src_hw and back.dtype == np.int64
    rh, rw = info.resized_hw
    content = labels[info.top : info.top + rh, info.left : info.left + rw]
    assert set(np.unique(back)) <= set(np.unique(content))  # only ids of the content, never of the padding


def test_letterbox_restore_of_a_smooth_map_matches_the_original():
    """A smooth continuous map (e.g. depth) downscaled and restored bilinearly comes back close to itself."""
    h, w = 150, 240
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    depth = (1.0 + yy / h + 2.0 * xx / w)[..., None]  # metres, a plane
    canvas, info = letterbox_to(depth, (64, 64))
    back = restore_geometry(canvas.transpose(2, 0, 1), info)
    assert back.shape == (1, h, w)
    inner = back[0, 3:-3, 3:-3] - depth[3:-3, 3:-3, 0]  # borders extrapolate by half a pixel
    assert np.abs(inner).max() < 0.02


def test_letterbox_labels_come_back_in_place_within_one_pixel():
    """A label map with a known rectangle, letterboxed and restored, has the rectangle where it was (+-1 pixel)."""
    h, w = 150, 100  # into 64x64: scale 0.4267, content 64x43 at left 10
    r0, r1, c0, c1 = 37, 121, 23, 71
    mask = _rect_mask(h, w, r0, r1, c0, c1)
    canvas, info = letterbox_to(mask[..., None], (64, 64))
    assert info.left == (64 - info.resized_hw[1]) // 2 > 0
    net_labels = (canvas[..., 0] >= 0.5).astype(np.uint8) * 7  # class 7 inside, 0 elsewhere
    back = restore_labels(net_labels, info)
    assert back.shape == (h, w) and set(np.unique(back)) == {0, 7}
    got = np.array(_bbox(back == 7))
    assert np.abs(got - np.array([r0, r1 - 1, c0, c1 - 1])).max() <= 1, got
    # the official way: restore the logits bilinearly, then take the argmax
    logits = np.stack([0.5 - canvas[..., 0], canvas[..., 0] - 0.5]) * 10
    labels = restore_geometry(logits, info).argmax(axis=0)
    assert np.abs(np.array(_bbox(labels == 1)) - np.array([r0, r1 - 1, c0, c1 - 1])).max() <= 1


def test_letterbox_logits_of_a_large_downscale_come_back_in_place_within_one_pixel():
    h, w = 640, 380  # scale 0.1, a network pixel is 10 image pixels
    r0, r1, c0, c1 = 101, 457, 64, 333
    canvas, info = letterbox_to(_rect_mask(h, w, r0, r1, c0, c1)[..., None], (64, 64))
    assert info.scale == pytest.approx(0.1)
    logits = np.stack([0.5 - canvas[..., 0], canvas[..., 0] - 0.5]) * 10
    labels = restore_geometry(logits, info).argmax(axis=0)
    assert labels.shape == (h, w)
    assert np.abs(np.array(_bbox(labels == 1)) - np.array([r0, r1 - 1, c0, c1 - 1])).max() <= 1


def test_decode_with_info_restores_the_original_geometry():
    """decode(..., info=) maps raw outputs back first: labels, unit normals and depth at the image size."""
    spec = {t.name: t for t in get_dataset("nyud_v2").tasks}
    _, info = preprocess(_rgb(96, 160), (32, 32), "letterbox")
    rng = np.random.default_rng(8)
    normals = decode(spec["normals"], rng.standard_normal((3, 32, 32)).astype(np.float32), info=info)
    assert normals.shape == (3, 96, 160)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=0), 1.0, atol=1e-5)  # normalised after restoring
    depth = decode(spec["depth"], rng.standard_normal((1, 32, 32)).astype(np.float32), info=info)
    assert depth.shape == (96, 160) and (depth >= 0).all()
    raw = rng.standard_normal((spec["semseg"].channels, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(decode(spec["semseg"], raw, info=info),
                                  decode(spec["semseg"], restore_geometry(raw, info)))
    assert decode(spec["semseg"], raw[None], info=info).shape == (1, 96, 160)
    with pytest.raises(ValueError, match="batch of 2"):
        decode(spec["depth"], np.zeros((2, 1, 32, 32), np.float32), info=info)


def test_unknown_mode_names_all_three_and_pad_error_suggests_letterbox():
    assert GEOMETRY_MODES == ("pad", "resize", "letterbox")
    with pytest.raises(ConfigError, match="letterbox"):
        preprocess(_rgb(4, 4), (8, 8), "fit")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="letterbox"):
        content_fraction_for((4, 4), (8, 8), "fit")  # type: ignore[arg-type]
    with pytest.raises(InputError) as exc:
        preprocess(_rgb(20, 8), (16, 16), "pad", source="big.jpg")
    assert "invpt-infer --mode letterbox" in str(exc.value) and "invpt-export --preprocess letterbox" in str(exc.value)
