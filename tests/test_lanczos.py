"""The matrix-product Lanczos-4 resize equals cv2.resize(INTER_LANCZOS4) bit for bit (face/lanczos.py)."""

import cv2
import numpy as np
import pytest
import torch

from latentsync_core.face.align import box_hw
from latentsync_core.face.lanczos import Lanczos4Resize, lanczos4_resizer

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
    assert resize.exact, "the tables must match this OpenCV (else every call falls back to cv2.resize)"
    rng = np.random.default_rng(sum(src_hw) + sum(dst_hw))
    for image in images(src_hw, rng):
        expected = cv2.resize(image, dst_hw[::-1], interpolation=cv2.INTER_LANCZOS4)
        np.testing.assert_array_equal(resize(planes(image)), expected)
        np.testing.assert_array_equal(resize(planes(image).float()), expected)  # a warp's float planes


def test_float_planes_stand_for_their_uint8_cast():
    """Float planes with fractions, in (-1, 256), resize as their uint8 cast (truncated toward zero), as the
    cv2.resize fallback takes them; warp_crop's rows (read in place) hold integers already."""
    src_hw, dst_hw = box_hw(256), (256, 256)
    samples = torch.from_numpy(np.random.default_rng(5).uniform(-0.999, 255.999, (3, *src_hw)).astype(np.float32))
    samples[:, :4] = torch.tensor([-0.5, 0.5, 254.5, 255.5])[:, None]  # either side of the ends
    cast = samples.to(torch.uint8)
    expected = cv2.resize(cast.permute(1, 2, 0).numpy(), dst_hw[::-1], interpolation=cv2.INTER_LANCZOS4)
    np.testing.assert_array_equal(lanczos4_resizer(src_hw, dst_hw)(samples), expected)


def test_crop_rows_are_read_in_place():
    """Float planes laid out as FaceAligner.warp_crop's (rows (y, c, x) at a larger stride: a 4th channel beside,
    here NaN) are resized in place, without the layout copy, and equal cv2.resize of the uint8 image."""
    src_hw, dst_hw = box_hw(256), (256, 256)
    image = np.random.default_rng(5).integers(0, 256, (*src_hw, 3), dtype=np.uint8)
    buffer = torch.full((src_hw[0], 4, src_hw[1]), float("nan"))
    buffer[:, :3] = torch.from_numpy(image).permute(0, 2, 1)
    resize = Lanczos4Resize(src_hw, dst_hw)  # its own scratch buffers
    expected = cv2.resize(image, dst_hw[::-1], interpolation=cv2.INTER_LANCZOS4)
    np.testing.assert_array_equal(resize(buffer[:, :3].permute(1, 0, 2)), expected)
    assert "rows" not in resize._buffers(3), "the planes were copied"
    np.testing.assert_array_equal(resize(planes(image).float()), expected)  # contiguous planes: copied
    assert "rows" in resize._buffers(3)


def test_rounding_boundaries_are_recomputed_exactly():
    """A delta of 0.6 sends every output through the exact int64 path; a delta of 0 skips it, and then the float32
    sums get some outputs wrong: so the exact path is what makes the default right near rounding boundaries."""
    src_hw, dst_hw = box_hw(512), (512, 512)
    resize = Lanczos4Resize(src_hw, dst_hw)
    image = np.random.default_rng(3).integers(0, 256, (*src_hw, 3), dtype=np.uint8)
    expected = cv2.resize(image, dst_hw[::-1], interpolation=cv2.INTER_LANCZOS4)
    np.testing.assert_array_equal(resize._resize(planes(image), delta=0.6), expected)
    rounded_only = resize._resize(planes(image), delta=0.0)
    assert 0 < np.count_nonzero(rounded_only != expected) < expected.size // 1000


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
    assert not resize.exact
    image = np.random.default_rng(4).integers(0, 256, (100, 75, 3), dtype=np.uint8)
    expected = cv2.resize(image, (64, 64), interpolation=cv2.INTER_LANCZOS4)
    np.testing.assert_array_equal(resize(planes(image)), expected)
    np.testing.assert_array_equal(resize(planes(image).float()), expected)


def test_reduced_precision_matmul_falls_back(monkeypatch):
    """With bf16 float32 products allowed (torch 'medium'), the error bound does not hold: cv2.resize is used."""
    resize = lanczos4_resizer((100, 75), (64, 64))
    image = np.random.default_rng(5).integers(0, 256, (100, 75, 3), dtype=np.uint8)
    calls = []
    monkeypatch.setattr(resize, "_resize", lambda p, delta=None: calls.append(p))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        out = resize(planes(image))
    finally:
        torch.set_float32_matmul_precision(previous)
    assert not calls
    np.testing.assert_array_equal(out, cv2.resize(image, (64, 64), interpolation=cv2.INTER_LANCZOS4))


def test_a_gpu_models_tf32_keeps_the_exact_resize(monkeypatch):
    """TF32 allowed for CUDA (what a GPU model instance sets) leaves CPU products IEEE: the matrix-product resize
    still runs (cv2.resize would take a GPU orchestrator's faces at half the speed)."""
    resize = lanczos4_resizer((100, 75), (64, 64))
    image = np.random.default_rng(6).integers(0, 256, (100, 75, 3), dtype=np.uint8)
    calls, matrix_products = [], resize._resize
    monkeypatch.setattr(resize, "_resize", lambda p, delta=None: calls.append(p) or matrix_products(p, delta))
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        out = resize(planes(image))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert len(calls) == 1
    np.testing.assert_array_equal(out, cv2.resize(image, (64, 64), interpolation=cv2.INTER_LANCZOS4))
