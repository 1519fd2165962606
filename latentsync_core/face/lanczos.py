"""cv2.resize(..., interpolation=cv2.INTER_LANCZOS4) of uint8 images, bit-identical and about 1.7x as fast.

Upstream squashes every face crop to the model resolution with OpenCV's Lanczos-4 resize. For uint8 images OpenCV
runs it as a scalar loop (it has no SIMD path for 8-bit Lanczos): 3.8 of the 6.4 ms that aligning the golden
1080x1920 frame took at 512 px. Its arithmetic is all integers, so it can be redone as two banded matrix products
(BLAS, over diagonal blocks of the band):

- per output position, 8 taps at source positions clamped to the image (replicated border) with the weights
  `saturate_cast<short>(coeff * 2048)` of OpenCV's interpolateLanczos4 (float32 coefficients, double sin/cos);
- out = saturate_uint8((sum_y beta * (sum_x alpha * src) + 2**21) >> 22).

Lanczos4Resize says how each pass stays exact. Each size pair's tables are checked against cv2.resize on a random
image when they are built; on any difference (another OpenCV's formula) that size pair falls back to cv2.resize.
"""

from __future__ import annotations

import functools
import logging
import math
import threading

import cv2
import numpy as np
import torch

log = logging.getLogger(__name__)

_S45 = 0.70710678118654752440084436210485
_CS = ((1, 0), (-_S45, -_S45), (0, 1), (_S45, -_S45), (-1, 0), (_S45, _S45), (0, -1), (-_S45, _S45))
COEF_SCALE = 2048  # INTER_RESIZE_COEF_SCALE: 11 fractional bits per pass
OUT_SCALE = 2.0**-22  # the two passes' fixed point: out = (T + 2**21) >> 22
# Output positions per block of the band, per pass (vertical, horizontal): small blocks waste few zero products,
# big ones few calls. Measured at 512 px (560x420 -> 512x512): 16 rows and 32 columns were fastest.
BLOCKS = (16, 32)


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


def _band_blocks(
    positions: np.ndarray, weights: np.ndarray, n_src: int, block: int
) -> list[tuple[int, int, int, int, torch.Tensor]]:
    """The taps as an (n_dst, n_src) band matrix in blocks of `block` rows: (d0, d1, s0, s1, float32
    matrix[d0:d1, s0:s1])."""
    matrix = np.zeros((len(positions), n_src))
    np.add.at(matrix, (np.arange(len(positions))[:, None], positions), weights)
    blocks = []
    for d0 in range(0, len(matrix), block):
        rows = matrix[d0 : d0 + block]
        used = np.flatnonzero(np.abs(rows).sum(0))
        s0, s1 = int(used[0]), int(used[-1]) + 1
        blocks.append((d0, d0 + len(rows), s0, s1, torch.from_numpy(rows[:, s0:s1]).float()))
    return blocks


def _ieee_float32_matmul() -> bool:
    """Whether CPU float32 matrix products are IEEE float32 (the error bound below needs it): a process may have
    allowed reduced-precision (bf16/tf32) CPU products for speed elsewhere. Only the CPU's (oneDNN's) setting
    counts: a GPU model's TF32 (`torch.backends.cuda.matmul.allow_tf32`, which moves the legacy
    get_float32_matmul_precision() to "high") leaves CPU products exact, and must not send every face of a GPU
    orchestrator to the 2x slower cv2.resize."""
    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    precision = getattr(mkldnn, "fp32_precision", None)  # torch >= 2.9: the effective CPU setting, inherited
    if precision is not None:
        return precision in ("none", "ieee")
    return torch.get_float32_matmul_precision() != "medium"  # older torch: "medium" (bf16) is the one reaching CPUs


class Lanczos4Resize:
    """Resize (C, H, W) uint8 planes to an (h, w, C) uint8 image exactly as cv2.resize(INTER_LANCZOS4) on HWC. Float
    planes in (-1, 256) are taken as their cast to uint8 (truncated toward zero). Float32 planes whose rows (y, c, x)
    are a strided matrix (FaceAligner.warp_crop's layout) are read in place, with no copy and no scratch buffer to
    pass through the cache: those must hold integers already (warp_crop truncates them).

    OpenCV sums x then y in int32; integer sums commute, so this sums y first: V = sum beta * src is exact in
    float32 (|V| <= 255 * sum|beta| < 2**24). T = sum alpha * V needs ~31 bits, so it is taken in float32 with a
    known error bound E (8 products and sums: |error| <= 8 * 2**-24 * sum|alpha| * max|V|); alpha is stored times
    2**-22, which scales every product and sum exactly, so T comes out as T * 2**-22. It is rounded twice with
    cv2.add: at T * 2**-22 - delta and + delta, delta > E * 2**-22 + the rounding of that call. Where the two
    agree, that is floor(T * 2**-22 + 0.5) (the rounding of T + 2**21 >> 22); the few outputs within delta of a
    rounding boundary (about 2 * delta of them) are recomputed exactly in int64 from V.
    """

    def __init__(self, src_hw: tuple[int, int], dst_hw: tuple[int, int]):
        (self.H, self.W), (self.h, self.w) = src_hw, dst_hw
        y_pos, y_wt = lanczos4_taps(self.H, self.h)
        self.x_pos, self.x_wt = lanczos4_taps(self.W, self.w)
        self.y_blocks = _band_blocks(y_pos, y_wt, self.H, BLOCKS[0])
        # horizontal blocks act on rows from the right: stored transposed, (s1 - s0, d1 - d0); scaled by 2**-22 (exact:
        # a power of two commutes with float32 rounding), so that the sums come out in output units
        self.x_blocks = [
            (d0, d1, s0, s1, m.T.contiguous().mul_(OUT_SCALE))
            for d0, d1, s0, s1, m in _band_blocks(self.x_pos, self.x_wt, self.W, BLOCKS[1])
        ]
        max_v = 255 * np.abs(y_wt).sum(1).max()
        error = 8 * 2.0**-24 * np.abs(self.x_wt).sum(1).max() * max_v  # float32 T, in units of T
        self.delta = 4 * error * 2.0**-22 + 2.0**-12  # + cv2.add's float32 rounding (< 2**-14 below 1024)
        self._scratch = threading.local()
        self.exact = max_v < 2**24 and self.delta < 0.05 and self._matches_cv2()
        if not self.exact:
            log.warning("Lanczos4 tables differ from this OpenCV's for %s -> %s: using cv2.resize", src_hw, dst_hw)

    def _matches_cv2(self) -> bool:
        image = np.random.default_rng(0).integers(0, 256, (self.H, self.W, 3), dtype=np.uint8)
        image[: self.H // 2, : self.W // 2] = 255 * (image[: self.H // 2, : self.W // 2] > 127)  # hard edges too
        expected = cv2.resize(image, (self.w, self.h), interpolation=cv2.INTER_LANCZOS4)
        rows = torch.from_numpy(image).permute(0, 2, 1).float().contiguous()  # warp_crop's layout: read in place
        return np.array_equal(self._resize(rows.permute(1, 0, 2)), expected)

    def __call__(self, planes: torch.Tensor) -> np.ndarray:
        """(C, H, W) uint8 planes, or float planes that stand for their uint8 cast (see the class)."""
        if self.exact and _ieee_float32_matmul():
            return self._resize(planes)
        hwc = cv2.merge(list(planes.to(torch.uint8).numpy()))
        return cv2.resize(hwc, (self.w, self.h), interpolation=cv2.INTER_LANCZOS4).reshape(self.h, self.w, -1)

    def _buffers(self, C: int) -> dict[str, np.ndarray | torch.Tensor]:
        """This thread's scratch buffers for C channels. Reused across calls: fresh multi-MB buffers fall out of
        the cache and are page-faulted in again, which costs more than the arithmetic."""
        key = f"c{C}"
        if not hasattr(self._scratch, key):
            setattr(
                self._scratch,
                key,
                {
                    "vertical": torch.empty(self.h, C, self.W),
                    "total": torch.empty(self.h * C, self.w),
                    "low": np.empty((self.h, C * self.w), np.uint8),
                    "high": np.empty((self.h, C * self.w), np.uint8),
                },
            )
        return getattr(self._scratch, key)

    def _resize(self, planes: torch.Tensor, delta: float | None = None) -> np.ndarray:
        C, delta = planes.shape[0], self.delta if delta is None else delta
        buf = self._buffers(C)
        rows = _rows_view(planes)  # rows y, columns (c, x): float32 integers read in place
        if rows is None:  # a layout copy, into a buffer made on first need; floats truncated, as a uint8 cast
            if "rows" not in buf:
                buf["rows"] = torch.empty(self.H, C, self.W)
            rows = buf["rows"]
            if planes.is_floating_point():  # numpy's trunc: torch's CPU trunc is ~6x slower (not vectorised)
                np.trunc(planes.permute(1, 0, 2).numpy(), out=rows.numpy(), casting="unsafe")
            else:
                rows.copy_(planes.permute(1, 0, 2))
            rows = rows.view(self.H, C * self.W)
        vertical = buf["vertical"].view(self.h, C * self.W)
        for d0, d1, s0, s1, m in self.y_blocks:
            torch.mm(m, rows[s0:s1], out=vertical[d0:d1])
        vertical = vertical.view(self.h * C, self.W)  # rows (y, c), columns x
        total = buf["total"]
        for d0, d1, s0, s1, m in self.x_blocks:
            torch.mm(vertical[:, s0:s1], m, out=total[:, d0:d1])
        t, low, high = total.numpy().reshape(self.h, C * self.w), buf["low"], buf["high"]
        cv2.add(t, -delta, dst=low, dtype=cv2.CV_8U)  # saturate(round(T * 2**-22 - delta)), one read of T
        cv2.add(t, delta, dst=high, dtype=cv2.CV_8U)
        unsure = _differences(low, high)
        if len(unsure):  # near a rounding boundary: the exact integer sum
            row, x = np.divmod(unsure, self.w)  # row = y * C + c of vertical
            v = vertical.numpy()[row[:, None], self.x_pos[x]].astype(np.int64)
            exact = ((v * self.x_wt[x]).sum(1) + 2**21) >> 22
            low.reshape(-1)[unsure] = np.clip(exact, 0, 255)
        return cv2.merge([low[:, c * self.w : (c + 1) * self.w] for c in range(C)]).reshape(self.h, self.w, C)


def _differences(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.flatnonzero(a != b) for equal-shape contiguous uint8 arrays whose size is a multiple of 8, compared 8
    bytes at a time (differences are rare: a few per thousand)."""
    a, b = a.reshape(-1), b.reshape(-1)
    if a.size % 8:
        return np.flatnonzero(a != b)
    words = np.flatnonzero(a.view(np.uint64) != b.view(np.uint64))
    candidates = (words[:, None] * 8 + np.arange(8)).reshape(-1)
    return candidates[a[candidates] != b[candidates]]


def _rows_view(planes: torch.Tensor) -> torch.Tensor | None:
    """(C, H, W) float32 planes -> their (H, C * W) rows as a matrix view when the layout allows (each row's channels
    side by side, rows at any larger stride: what torch.mm reads as is), else None."""
    C, H, W = planes.shape
    if planes.dtype != torch.float32 or planes.stride(2) != 1 or planes.stride(0) != W or planes.stride(1) < C * W:
        return None
    return planes.as_strided((H, C * W), (planes.stride(1), 1))


@functools.lru_cache(maxsize=16)
def lanczos4_resizer(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> Lanczos4Resize:
    """The resizer of one size pair (tables built and checked once per process)."""
    return Lanczos4Resize(src_hw, dst_hw)
