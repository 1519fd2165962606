"""cv2.resize(..., interpolation=cv2.INTER_LANCZOS4) of uint8 images, bit-identical and 2.5-3x as fast.

Upstream squashes every face crop to the model resolution with OpenCV's Lanczos-4 resize. For uint8 images OpenCV
runs it as a scalar loop (it has no SIMD path for 8-bit Lanczos). Its arithmetic is all integers:

- per output position, 8 taps at source positions clamped to the image (replicated border) with the weights
  `saturate_cast<short>(coeff * 2048)` of OpenCV's interpolateLanczos4 (float32 coefficients, double sin/cos);
- out = saturate_uint8((sum_y beta * (sum_x alpha * src) + 2**21) >> 22), the sums in int32 (they fit: at most
  0.99 * 2**31 in magnitude, reached at hard edges; Lanczos4Resize checks it per size pair).

Integer sums commute, so the two passes can run in the order that vectorises: each pass makes every output row a
weighted sum of 8 whole source rows (kernels.py: a loop over contiguous memory that LLVM makes SIMD), the vertical
pass on the image's rows and the horizontal pass on its columns after an OpenCV transpose.

Where numba is missing (kernels.AVAILABLE) or a size pair's tables differ from this OpenCV's (checked on a random
image when they are built), cv2.resize itself runs.
"""

from __future__ import annotations

import functools
import logging
import math
import threading

import cv2
import numpy as np
import torch

from . import kernels

log = logging.getLogger(__name__)

_S45 = 0.70710678118654752440084436210485
_CS = ((1, 0), (-_S45, -_S45), (0, 1), (_S45, -_S45), (-1, 0), (_S45, _S45), (0, -1), (-_S45, _S45))
COEF_SCALE = 2048  # INTER_RESIZE_COEF_SCALE: 11 fractional bits per pass
OUT_SHIFT = 22  # the two passes' fixed point: out = (T + 2**21) >> 22


def _lanczos4_coeffs(x: np.float32) -> list[np.float32]:
    """OpenCV's interpolateLanczos4(x) step by step: float32 where it uses float, Python floats (double) elsewhere."""
    f32 = np.float32
    x3 = f32(x + f32(3))
    y0 = float(-x3) * math.pi * 0.25
    s0, c0 = math.sin(y0), math.cos(y0)
    coeffs, total = [], f32(0)
    for i, (cs_s, cs_c) in enumerate(_CS):
        y0_ = f32(x3 - f32(i))
        if abs(y0_) >= f32(1e-6):
            y = float(-y0_) * math.pi * 0.25
            c = f32((cs_s * s0 + cs_c * c0) / (y * y))
        else:
            c = f32(1e30)
        coeffs.append(c)
        total = f32(total + c)
    inv = f32(f32(1) / total)
    return [f32(c * inv) for c in coeffs]


def lanczos4_taps(n_src: int, n_dst: int) -> tuple[np.ndarray, np.ndarray]:
    """One axis's fixed-point taps: (n_dst, 8) source positions (border-clamped, so possibly repeated) and their
    (n_dst, 8) int64 weights, as OpenCV's resize builds them (xofs/ialpha)."""
    scale = 1.0 / (n_dst / n_src)  # OpenCV: scale_x = 1. / inv_scale_x, inv_scale_x = (double)dst / src
    positions = np.empty((n_dst, 8), np.int64)
    weights = np.empty((n_dst, 8), np.int64)
    for d in range(n_dst):
        fx = np.float32((d + 0.5) * scale - 0.5)
        sx = math.floor(fx)
        coeffs = _lanczos4_coeffs(np.float32(fx - np.float32(sx)))
        weights[d] = np.clip(np.rint([c * np.float32(COEF_SCALE) for c in coeffs]), -32768, 32767)
        positions[d] = np.clip(np.arange(sx - 3, sx + 5), 0, n_src - 1)
    return positions, weights


class Lanczos4Resize:
    """Resize (C, H, W) uint8 planes to an (h, w, C) uint8 image exactly as cv2.resize(INTER_LANCZOS4) on HWC. Float
    planes in (-1, 256) are taken as their cast to uint8 (truncated toward zero). Planes that are rows (y, c, x) of
    a contiguous buffer (FaceAligner.warp_crop's layout) are read in place."""

    def __init__(self, src_hw: tuple[int, int], dst_hw: tuple[int, int]):
        (self.H, self.W), (self.h, self.w) = src_hw, dst_hw
        y_pos, y_wt = lanczos4_taps(self.H, self.h)
        x_pos, x_wt = lanczos4_taps(self.W, self.w)
        self.y_taps = y_pos.astype(np.intp), y_wt.astype(np.int32)
        self.x_taps = x_pos.astype(np.intp), x_wt.astype(np.int32)
        self._scratch = threading.local()
        self.fast = kernels.AVAILABLE and _int32_sums(y_wt, x_wt) and self._matches_cv2()
        if kernels.AVAILABLE and not self.fast:
            log.warning("Lanczos4 row sums do not reproduce cv2.resize for %s -> %s: using it", src_hw, dst_hw)

    def _matches_cv2(self) -> bool:
        image = np.random.default_rng(0).integers(0, 256, (self.H, self.W, 3), dtype=np.uint8)
        image[: self.H // 2, : self.W // 2] = 255 * (image[: self.H // 2, : self.W // 2] > 127)  # hard edges too
        expected = cv2.resize(image, (self.w, self.h), interpolation=cv2.INTER_LANCZOS4)
        return np.array_equal(self._resize(torch.from_numpy(image).permute(2, 0, 1)), expected)

    def __call__(self, planes: torch.Tensor) -> np.ndarray:
        """(C, H, W) uint8 planes, or float planes that stand for their uint8 cast (see the class)."""
        if planes.is_floating_point():
            planes = planes.to(torch.uint8)
        if self.fast and planes.shape[0] in (1, 2, 3, 4):  # pixel sizes that cv2.transpose takes
            return self._resize(planes)
        hwc = cv2.merge(list(planes.numpy()))
        return cv2.resize(hwc, (self.w, self.h), interpolation=cv2.INTER_LANCZOS4).reshape(self.h, self.w, -1)

    def _buffers(self, C: int) -> dict[str, np.ndarray]:
        """This thread's scratch buffers for C channels. Reused across calls: fresh multi-MB buffers fall out of
        the cache and are page-faulted in again, which costs more than the arithmetic."""
        key = f"c{C}"
        if not hasattr(self._scratch, key):
            buffers = {
                "vertical": np.empty((self.h * C, self.W), np.int32),  # rows (y, c), columns x
                "columns": np.empty((self.W, self.h * C), np.int32),  # its transpose
                "sums": np.empty(self.h * C, np.int32),
                "out": np.empty((self.w, self.h * C), np.uint8),  # (x, y, c): the result, transposed
            }
            setattr(self._scratch, key, buffers)
        return getattr(self._scratch, key)

    def _resize(self, planes: torch.Tensor) -> np.ndarray:
        C = planes.shape[0]
        buf = self._buffers(C)
        rows = rows_view(planes)
        if rows is None:
            rows = np.ascontiguousarray(planes.permute(1, 0, 2).numpy()).reshape(self.H, C * self.W)
        kernels.weighted_rows(rows, *self.y_taps, buf["vertical"].reshape(self.h, C * self.W))
        cv2.transpose(buf["vertical"], buf["columns"])
        kernels.weighted_rows_rounded(buf["columns"], *self.x_taps, OUT_SHIFT, buf["sums"], buf["out"])
        out = cv2.transpose(buf["out"].reshape(self.w, self.h, C))  # C-channel pixels: (h, w, C)
        return out.reshape(self.h, self.w, C)


def _int32_sums(y_weights: np.ndarray, x_weights: np.ndarray) -> bool:
    """Whether every output's sum, rounding term included, fits int32 for any uint8 image: the largest is 255 times
    the sum of the positive (or of the negative) products of its taps' weights."""

    def positive_negative(weights):
        return np.clip(weights, 0, None).sum(1), np.clip(-weights, 0, None).sum(1)

    (py, ny), (px, nx) = positive_negative(y_weights), positive_negative(x_weights)
    largest = max((np.outer(py, px) + np.outer(ny, nx)).max(), (np.outer(py, nx) + np.outer(ny, px)).max())
    return 255 * int(largest) + 2 ** (OUT_SHIFT - 1) < 2**31


def rows_view(planes: torch.Tensor) -> np.ndarray | None:
    """(C, H, W) uint8 planes -> their (H, C * W) rows as a view when they are a (y, c, x) contiguous buffer seen as
    planes (FaceAligner.warp_crop's layout), else None."""
    C, H, W = planes.shape
    if planes.dtype != torch.uint8 or planes.stride() != (W, C * W, 1):
        return None
    return planes.permute(1, 0, 2).numpy().reshape(H, C * W)


@functools.lru_cache(maxsize=16)
def lanczos4_resizer(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> Lanczos4Resize:
    """The resizer of one size pair (tables built and checked once per process)."""
    return Lanczos4Resize(src_hw, dst_hw)
