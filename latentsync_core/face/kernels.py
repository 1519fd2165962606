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
    from llvmlite import ir
    from numba import types
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

    @intrinsic
    def _load_u64(typingctx, array, index):
        """The 8 bytes of a uint8 array from `index` on as one little-endian uint64 (an unaligned load)."""
        if array.dtype != types.uint8:  # the index counts bytes
            return None

        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            pointer = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(64).as_pointer())
            return builder.load(pointer, align=1)

        return types.uint64(array, index), codegen

    @_kernel
    def _affine_row(products, term, shift, out):
        """out = (products + term) + shift: one row of a sampling grid plane, (t0 * x + t1 * y) + t2 summed as
        align.sampling_grid sums it (products = t0 * x per column, term = t1 * y of the row)."""
        for x in range(out.shape[0]):
            out[x] = (products[x] + term) + shift

    @_kernel
    def _bilinear_row(grid_x, grid_y, src_h, src_w, corners, weights, out):
        """grid_sample's bilinear arithmetic (zeros padding, align_corners=True) along one row of the grid, each step
        as ATen's CPU kernel takes it: unnormalise (g + 1) * ((size - 1) / 2), floor -> corners (2, w) float32 (x_w,
        y_n), weights -> (4, w) (s * e, s * w, n * e, n * w for nw, ne, sw, se), and into out (w,) the coverage,
        grid_sample of an all-ones source: the in-bounds corners' weights, masked terms 0 * weight, summed
        nw + ne + sw + se. Multiplying by 1 or 0 is exact, so a fused multiply-add there rounds as this does."""
        one, zero = np.float32(1), np.float32(0)
        scale_x, scale_y = np.float32(src_w - 1) / np.float32(2), np.float32(src_h - 1) / np.float32(2)
        # corner (column, row) in bounds as ATen's int tests; a float test agrees, NaN and huge values included, for
        # sides below 2**24 (float32 holds size - 1 exactly)
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
            nw, ne, sw, se = s * e, s * w, n * e, n * w
            corners[0, j], corners[1, j] = x_w, y_n
            weights[0, j], weights[1, j], weights[2, j], weights[3, j] = nw, ne, sw, se
            out[j] = ((nw * (west * north) + ne * (east * north)) + sw * (west * south)) + se * (east * south)

    @_kernel
    def coverage(grid_x, grid_y, src_h, src_w, out):
        """out (h, w) float32 = grid_sample(ones(src_h, src_w), grid, bilinear, zeros, align_corners=True) at the
        (h, w) normalised grid planes (_bilinear_row)."""
        corners, weights = np.empty((2, out.shape[1]), np.float32), np.empty((4, out.shape[1]), np.float32)
        for i in range(out.shape[0]):
            _bilinear_row(grid_x[i], grid_y[i], src_h, src_w, corners, weights, out[i])

    @_kernel
    def _gather_corners(frame, corners, top, bottom):
        """For each sample of a row: the 8 frame bytes from its north-west corner pixel on (its RGB, then the
        north-east pixel's) into top, from the south-west one into bottom; bytes of corners outside the frame are 0,
        as grid_sample's masked gathers. frame (H, W, 3) uint8, C-contiguous. The one scalar loop of affine_crop:
        two loads per sample where inside the frame (the last pixel's 8 bytes would run past it: byte by byte)."""
        H, W = frame.shape[0], frame.shape[1]
        flat = frame.reshape(-1)
        row_bytes, end = 3 * W, flat.shape[0]
        last_x, last_y = np.float32(W - 1), np.float32(H - 1)
        for j in range(top.shape[0]):
            x_w, y_n = corners[0, j], corners[1, j]
            if x_w >= 0 and x_w < last_x and y_n >= 0 and y_n < last_y:  # float tests: NaN is outside
                start = (np.int64(y_n) * W + np.int64(x_w)) * 3
                if start + row_bytes + 8 <= end:
                    top[j], bottom[j] = _load_u64(flat, start), _load_u64(flat, start + row_bytes)
                    continue
            top[j], bottom[j] = np.uint64(0), np.uint64(0)
            for dy in range(2):
                for dx in range(2):
                    x, y = x_w + np.float32(dx), y_n + np.float32(dy)
                    if x >= 0 and x <= last_x and y >= 0 and y <= last_y:
                        start = (np.int64(y) * W + np.int64(x)) * 3
                        rgb = np.uint64(flat[start]) | np.uint64(flat[start + 1]) << np.uint64(8)
                        rgb = (rgb | np.uint64(flat[start + 2]) << np.uint64(16)) << np.uint64(24 * dx)
                        if dy == 0:
                            top[j] |= rgb
                        else:
                            bottom[j] |= rgb

    @_kernel
    def affine_crop(frame, theta, xs, ys, minus_fill, out):
        """upstream's face crop, align.FaceAligner.warp_crop in one pass over the crop: kornia's warp_affine of the
        (H, W, 3) uint8 C-contiguous frame (bilinear, align_corners=True, constant fill) at the grid of theta (2, 3)
        float32 and the normalised columns xs and rows ys (align.sampling_grid's), then the uint8 cast -> out
        (h, 3, w) uint8 rows. Only the frame pixels it samples are read, as uint8 (their float value is exact).
        Per sample and channel: grid_sample's nw*v_nw + ne*v_ne + sw*v_sw + se*v_se as ATen's AVX2 build rounds
        it (the nw product, then fused multiply-adds: align.py checks this CPU's torch agrees, else uses it), then
        kornia's fill sample + (coverage - 1) * -fill, truncated toward zero."""
        H, W = frame.shape[0], frame.shape[1]
        w = out.shape[2]
        one = np.float32(1)
        products = np.empty((2, w), np.float32)
        for i in range(2):
            for x in range(w):
                products[i, x] = theta[i, 0] * xs[x]
        grid, corners = np.empty((2, w), np.float32), np.empty((2, w), np.float32)
        weights, covered = np.empty((4, w), np.float32), np.empty(w, np.float32)
        top, bottom = np.empty(w, np.uint64), np.empty(w, np.uint64)
        top_words, bottom_words = top.view(np.uint32), bottom.view(np.uint32)  # (low, high) words per sample
        nw, ne, sw, se = weights[0], weights[1], weights[2], weights[3]
        for y in range(out.shape[0]):
            for i in range(2):
                _affine_row(products[i], theta[i, 1] * ys[y], theta[i, 2], grid[i])
            _bilinear_row(grid[0], grid[1], H, W, corners, weights, covered)
            _gather_corners(frame, corners, top, bottom)
            for c in range(3):  # bytes c and c + 3 of each 8, in 32-bit words (so SIMD): c < 4, c + 3 in word c > 0
                row, high = out[y, c], np.int64(c > 0)
                nw_shift, ne_shift = np.uint32(8 * c), np.uint32(8 * (c + 3 - 4 * high))
                for j in range(w):
                    v_nw = (top_words[2 * j] >> nw_shift) & np.uint32(255)
                    v_ne = (top_words[2 * j + high] >> ne_shift) & np.uint32(255)
                    v_sw = (bottom_words[2 * j] >> nw_shift) & np.uint32(255)
                    v_se = (bottom_words[2 * j + high] >> ne_shift) & np.uint32(255)
                    value = np.float32(np.int32(v_nw)) * nw[j]
                    value = _fma(np.float32(np.int32(v_ne)), ne[j], value)
                    value = _fma(np.float32(np.int32(v_sw)), sw[j], value)
                    value = _fma(np.float32(np.int32(v_se)), se[j], value)
                    row[j] = np.int32(value + (covered[j] - one) * minus_fill)

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
                    _affine_row(products, t1 * ys[y], t2, out[b, i, y])
