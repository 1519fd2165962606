"""The row-sum Lanczos-4 resize equals cv2.resize(INTER_LANCZOS4) bit for bit (face/lanczos.py, face/kernels.py)."""

import cv2
import numpy as np
import pytest
import torch

from latentsync_core.face import kernels
from latentsync_core.face.align import box_hw
from latentsync_core.face.lanczos import Lanczos4Resize, lanczos4_resizer, lanczos4_taps, rows_view

# the model resolutions' crop boxes, and sizes that up- and downscale by other ratios
SIZE_PAIRS = [(box_hw(res), (res, res)) for res in (256, 512)] + [
    ((50, 40), (256, 256)),
    ((300, 317), (64, 64)),
    ((7, 5), (16, 16)),
    ((128, 96), (128, 96)),
]


def images(hw, rng):
    """Random noise, hard 0/255 edges (the most ringing: outputs far below 0 and above 255) and flat images."""
    h, w = hw
    yield rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yield (rng.random((h, w, 3)) < 0.5).astype(np.uint8) * 255
    checker = ((np.arange(h)[:, None] // 2 + np.arange(w)[None] // 3) % 2 * 255).astype(np.uint8)
    yield np.repeat(checker[..., None], 3, axis=2)
    for value in (0, 127, 255):
        yield np.full((h, w, 3), value, np.uint8)


def planes(image):
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("src_hw,dst_hw", SIZE_PAIRS)
def test_equals_cv2_resize(src_hw, dst_hw):
    resize = lanczos4_resizer(src_hw, dst_hw)
    assert resize.fast, "the tables must match this OpenCV (else every call falls back to cv2.resize)"
    rng = np.random.default_rng(sum(src_hw) + sum(dst_hw))
    for image in images(src_hw, rng):
        expected = cv2.resize(image, dst_hw[::-1], interpolation=cv2.INTER_LANCZOS4)
        np.testing.assert_array_equal(resize(planes(image)), expected)
        np.testing.assert_array_equal(resize(planes(image).float()), expected)  # a warp's float planes


def test_float_planes_stand_for_their_uint8_cast():
    """Float planes with fractions, in (-1, 256), resize as their uint8 cast (truncated toward zero), as the
    cv2.resize fallback takes them."""
    src_hw, dst_hw = box_hw(256), (256, 256)
    samples = torch.from_numpy(np.random.default_rng(5).uniform(-0.999, 255.999, (3, *src_hw)).astype(np.float32))
    samples[:, :4] = torch.tensor([-0.5, 0.5, 254.5, 255.5])[:, None]  # either side of the ends
    cast = samples.to(torch.uint8)
    expected = cv2.resize(cast.permute(1, 2, 0).numpy(), dst_hw[::-1], interpolation=cv2.INTER_LANCZOS4)
    np.testing.assert_array_equal(lanczos4_resizer(src_hw, dst_hw)(samples), expected)


def test_crop_rows_are_read_in_place():
    """Planes that are rows (y, c, x) of one buffer (FaceAligner.warp_crop's layout) are read as they are; other
    layouts are copied first. Both give cv2.resize's image."""
    src_hw, dst_hw = box_hw(256), (256, 256)
    image = np.random.default_rng(5).integers(0, 256, (*src_hw, 3), dtype=np.uint8)
    rows = np.ascontiguousarray(image.transpose(0, 2, 1))  # (y, c, x)
    crop = torch.from_numpy(rows).permute(1, 0, 2)
    assert np.shares_memory(rows_view(crop), rows)
    assert rows_view(planes(image)) is None
    expected = cv2.resize(image, dst_hw[::-1], interpolation=cv2.INTER_LANCZOS4)
    resize = lanczos4_resizer(src_hw, dst_hw)
    np.testing.assert_array_equal(resize(crop), expected)
    np.testing.assert_array_equal(resize(planes(image)), expected)


def test_the_largest_sums_fit_int32():
    """An image that drives one output to its extreme (255 where the product of its taps' weights is positive, 0
    elsewhere, and the reverse) still matches cv2.resize: the int32 sums neither wrap nor saturate early."""
    src_hw, dst_hw = box_hw(512), (512, 512)
    (y_pos, y_wt), (x_pos, x_wt) = lanczos4_taps(src_hw[0], dst_hw[0]), lanczos4_taps(src_hw[1], dst_hw[1])
    y, x = 100, 200  # an output away from the borders: its taps are 8 distinct pixels each way
    for sign in (1, -1):
        image = np.zeros((*src_hw, 3), np.uint8)
        image[np.ix_(y_pos[y], x_pos[x])] = (sign * np.outer(y_wt[y], x_wt[x]) > 0)[..., None] * 255
        expected = cv2.resize(image, dst_hw[::-1], interpolation=cv2.INTER_LANCZOS4)
        assert expected[y, x, 0] == (255 if sign > 0 else 0)
        np.testing.assert_array_equal(lanczos4_resizer(src_hw, dst_hw)(planes(image)), expected)


def test_falls_back_to_cv2_when_tables_differ(monkeypatch):
    """Tables that do not reproduce this OpenCV (here: one weight off by one) are caught when built; the resizer
    then returns cv2.resize's result."""
    import latentsync_core.face.lanczos as lanczos

    taps = lanczos.lanczos4_taps

    def off_by_one(n_src, n_dst):
        positions, weights = taps(n_src, n_dst)
        weights[n_dst // 2, 3] += 1
        return positions, weights

    monkeypatch.setattr(lanczos, "lanczos4_taps", off_by_one)
    resize = Lanczos4Resize((100, 75), (64, 64))
    assert not resize.fast
    image = np.random.default_rng(4).integers(0, 256, (100, 75, 3), dtype=np.uint8)
    expected = cv2.resize(image, (64, 64), interpolation=cv2.INTER_LANCZOS4)
    np.testing.assert_array_equal(resize(planes(image)), expected)
    np.testing.assert_array_equal(resize(planes(image).float()), expected)


@pytest.mark.parametrize("channels", [1, 2, 4, 5])
def test_other_channel_counts(channels):
    """1 to 4 channels take the row sums (cv2.transpose moves pixels of up to 4 bytes here), 5 cv2.resize."""
    image = np.random.default_rng(channels).integers(0, 256, (100, 75, channels), dtype=np.uint8)
    expected = cv2.resize(image, (64, 64), interpolation=cv2.INTER_LANCZOS4).reshape(64, 64, channels)
    np.testing.assert_array_equal(lanczos4_resizer((100, 75), (64, 64))(planes(image)), expected)


def test_without_numba_cv2_resize_runs(monkeypatch):
    """Where numba is missing (the GPU bundle), the resizer says so and returns cv2.resize's image."""
    monkeypatch.setattr(kernels, "AVAILABLE", False)
    resize = Lanczos4Resize((100, 75), (64, 64))
    assert not resize.fast
    image = np.random.default_rng(6).integers(0, 256, (100, 75, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize(planes(image)), cv2.resize(image, (64, 64), interpolation=cv2.INTER_LANCZOS4))
