"""The face path's loops that numpy, torch and OpenCV have no fast exact form of, compiled by numba.

All are exact (integer sums, or float32 operations in the order the torch code they replace takes them: LLVM
contracts no multiply-add without fast-math), so results are bit-identical to the fallbacks. numba is a dependency
of this package, but a bare environment (the GPU bundle carries no LLVM) may lack it: then AVAILABLE is False and
callers take their torch or OpenCV path.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

try:
    import numba
    from numba.extending import intrinsic
except Exception as error:  # noqa: BLE001 - missing, or a broken llvmlite/numpy pairing: take the fallbacks
    numba = None
    if not isinstance(error, ImportError):
        log.warning(
            "numba does not import (%s: %s): the face path takes its slower fallbacks", type(error).__name__, error
        )

AVAILABLE = numba is not None

if AVAILABLE:

    def _kernel(function):
        """nogil: streams align on threads of one process. cache: compiled code kept in __pycache__ or the user's
        cache directory (NUMBA_CACHE_DIR overrides) for the next process; where none is writable (a read-only
        image), numba refuses caching, and each process compiles (warm_up.py does it before the first request)."""
        try:
            return numba.njit(nogil=True, cache=True, boundscheck=False)(function)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(nogil=True, boundscheck=False)(function)

    @intrinsic
    def _fma(typingctx, a, b, c):
        """a * b + c rounded once (LLVM's fma: one instruction where the CPU has FMA), as torch's addcmul_."""

        def codegen(context, builder, signature, args):
            return builder.fma(*args)

        return a(a, b, c), codegen

    @_kernel
    def _coverage_row(grid_x, grid_y, src_h, src_w, out):
        """out (w,) float32 = grid_sample(ones(src_h, src_w), grid, bilinear, zeros, align_corners=True) along one row
        of the grid: the sum of the in-bounds corners' weights, each step as ATen's CPU kernel takes it (unnormalise
        (g + 1) * ((size - 1) / 2), floor, weights s * e, s * w, n * e, n * w, masked terms 0 * weight, summed
        nw + ne + sw + se). Multiplying by 1 or 0 is exact, so a fused multiply-add there rounds as this does."""
        one, zero = np.float32(1), np.float32(0)
        scale_x, scale_y = np.float32(src_w - 1) / np.float32(2), np.float32(src_h - 1) / np.float32(2)
        # corner (column, row) in bounds as ATen's int tests; a float test agrees, NaN and huge values included
        last_x, last_y = np.float32(src_w - 1), np.float32(src_h - 1)
        for j in range(out.shape[0]):
            x = (grid_x[j] + one) * scale_x
            y = (grid_y[j] + one) * scale_y
            x_w, y_n = np.floor(x), np.floor(y)
            w = x - x_w
            e = one - w
            n = y - y_n
            s = one - n
            west = np.float32((x_w >= zero) & (x_w <= last_x))  # & not `and`: no branch, so SIMD
            east = np.float32((x_w >= -one) & (x_w < last_x))
            north = np.float32((y_n >= zero) & (y_n <= last_y))
            south = np.float32((y_n >= -one) & (y_n < last_y))
            nw, ne, sw, se = (
                (s * e) * (west * north),
                (s * w) * (east * north),
                (n * e) * (west * south),
                (n * w) * (east * south),
            )
            out[j] = ((nw + ne) + sw) + se

    @_kernel
    def coverage(grid_x, grid_y, src_h, src_w, out):
        """out (h, w) float32: _coverage_row for every row of the (h, w) normalised grid planes."""
        for i in range(out.shape[0]):
            _coverage_row(grid_x[i], grid_y[i], src_h, src_w, out[i])

    @_kernel
    def fill_truncate(samples, grid_x, grid_y, src_h, src_w, minus_fill, out):
        """(C, h, w) float32 bilinear samples of a (src_h, src_w) source at the grid planes -> out (h, C, w) uint8:
        kornia's constant fill sample + (coverage - 1) * -fill, then the uint8 cast's truncation toward zero."""
        covered = np.empty(out.shape[2], np.float32)
        for y in range(out.shape[0]):
            _coverage_row(grid_x[y], grid_y[y], src_h, src_w, covered)
            for c in range(out.shape[1]):
                source, row = samples[c, y], out[y, c]
                for x in range(row.shape[0]):
                    row[x] = np.int32(source[x] + (covered[x] - np.float32(1)) * minus_fill)

    @_kernel
    def weighted_rows(src, positions, weights, out):
        """out[d] = sum_k weights[d, k] * src[positions[d, k]] over whole rows, in int32."""
        for d in range(out.shape[0]):
            row = out[d]
            row[:] = 0
            for k in range(positions.shape[1]):
                weight, source = weights[d, k], src[positions[d, k]]
                for j in range(row.shape[0]):
                    row[j] += weight * source[j]

    @_kernel
    def weighted_rows_rounded(src, positions, weights, shift, sums, out):
        """out[d] = saturate_uint8((sum_k weights[d, k] * src[positions[d, k]] + 2**(shift-1)) >> shift): OpenCV's
        fixed-point cast of int32 sums. `sums` is one int32 row of scratch."""
        half = np.int32(1 << (shift - 1))
        for d in range(out.shape[0]):
            sums[:] = half
            for k in range(positions.shape[1]):
                weight, source = weights[d, k], src[positions[d, k]]
                for j in range(sums.shape[0]):
                    sums[j] += weight * source[j]
            row = out[d]
            for j in range(sums.shape[0]):
                row[j] = min(max(sums[j] >> shift, 0), 255)

    @_kernel
    def gaussian_blur(src, taps, scratch, out):
        """restore.gaussian_blur: separable taps, reflect border, along x then y, each tap a fused multiply-add
        onto the first tap's product (torch's addcmul_ rounds once). scratch: (h + len(taps) - 1, w) float32."""
        h, w = src.shape
        size = taps.shape[0]
        radius = size // 2
        padded = np.empty(w + 2 * radius, np.float32)
        for y in range(h):  # x pass into scratch rows radius .. radius + h
            source = src[y]
            for x in range(w):
                padded[radius + x] = source[x]
            for r in range(1, radius + 1):
                padded[radius - r] = source[r]
                padded[radius + w - 1 + r] = source[w - 1 - r]
            row = scratch[radius + y]
            for x in range(w):
                row[x] = padded[x] * taps[0]
            for t in range(1, size):
                for x in range(w):
                    row[x] = _fma(padded[x + t], taps[t], row[x])
        for r in range(1, radius + 1):  # reflect rows
            scratch[radius - r] = scratch[radius + r]
            scratch[radius + h - 1 + r] = scratch[radius + h - 1 - r]
        for y in range(h):  # y pass
            row, first = out[y], scratch[y]
            for x in range(w):
                row[x] = first[x] * taps[0]
            for t in range(1, size):
                source = scratch[y + t]
                for x in range(w):
                    row[x] = _fma(source[x], taps[t], row[x])

    @_kernel
    def paste_blend(samples, coverage, mask, soft, fill, image):
        """Blend a warped face into image (3, h, w) uint8 planes in place, restore.paste_region's torch steps in
        their order: face = sample + (1 - coverage) * fill, pasted = clamp(face / 2 + 0.5, 0, 1) * 255 * mask,
        image = uint8(pasted * soft + (1 - soft) * image), truncated. samples (3, h, w) float32 in [-1, 1], the
        rest (h, w) float32. Planes, not (h, w, 3) pixels: every access contiguous, so SIMD (2x as fast)."""
        one, zero = np.float32(1), np.float32(0)
        for c in range(3):
            for y in range(image.shape[1]):
                covered, masked, weights, row, sampled = coverage[y], mask[y], soft[y], image[c, y], samples[c, y]
                for x in range(row.shape[0]):
                    face = sampled[x] + (one - covered[x]) * fill
                    level = face / np.float32(2) + np.float32(0.5)
                    level = zero if level < zero else level  # selects, not min/max: NaN stays NaN, as in clamp_
                    level = one if level > one else level
                    pasted = level * np.float32(255) * masked[x]
                    row[x] = np.int32(pasted * weights[x] + (one - weights[x]) * np.float32(row[x]))

    @_kernel
    def affine_planes(theta, xs, ys, out):
        """out (B, 2, h, w) = (theta[b, i, 0] * xs[col] + theta[b, i, 1] * ys[row]) + theta[b, i, 2]: the planes of
        align.sampling_grid, each product and sum rounded as its torch ops round them. theta (B, 2, 3) float32."""
        products = np.empty(out.shape[3], np.float32)
        for b in range(out.shape[0]):
            for i in range(2):
                t0, t1, t2 = theta[b, i, 0], theta[b, i, 1], theta[b, i, 2]
                for x in range(products.shape[0]):
                    products[x] = t0 * xs[x]
                for y in range(out.shape[2]):
                    row, term = out[b, i, y], t1 * ys[y]
                    for x in range(row.shape[0]):
                        row[x] = (products[x] + term) + t2
