"""Paste generated faces back into their frames (upstream AlignRestore.restore_img + the resize before it).

The face is warped back with the inverse of the alignment affine and alpha-blended through a feathered mask: the
warped all-ones crop mask, eroded 2x2, eroded again by (2*w_edge)^2 (w_edge = sqrt(area)//20), then Gaussian
blurred. Everything is computed only inside a window around the warped crop (paste_window), sized so that the
result is identical to computing on the whole frame; pixels outside the window are the input frame, untouched.
So the paste needs only that region of the frame: paste_region / paste_faces take and return regions, and a
caller that holds the frame writes them back (paste_back does so for whole frames).
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from . import kernels
from .align import (
    FILL_VALUE,
    bilinear_sample,
    box_hw,
    grid_coverage,
    grid_warp,
    invert_affine,
    planes_to_hwc,
    sampling_grid,
)

Window = tuple[int, int, int, int]  # (y0, y1, x0, x1) of the frame


def resize_face_to_box(face: torch.Tensor, box_hw: tuple[int, int]) -> torch.Tensor:
    """(3, R, R) or (n, 3, R, R) float face -> same rank at (h_box, w_box): torchvision BICUBIC antialias resize."""
    x = face[None] if face.dim() == 3 else face
    dtype = x.dtype
    if x.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # CPU has no half bicubic-aa kernel
    out = F.interpolate(x, size=tuple(box_hw), mode="bicubic", antialias=True, align_corners=False).to(dtype)
    return out[0] if face.dim() == 3 else out


def erode(mask: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Min over the window [-before, +after] in both axes; outside the image is ignored (kornia geodesic border,
    cv2 default border). (1, 1, H, W) float, finite. On the CPU cv2.erode (a min is exact in any order: 2.5x as
    fast), elsewhere torch (erode_by_steps)."""
    if mask.device.type != "cpu":
        return erode_by_steps(mask, before, after)
    size = before + after + 1
    out = cv2.erode(mask[0, 0].numpy(), np.ones((size, size), np.uint8), anchor=(before, before), borderValue=math.inf)
    return torch.from_numpy(out)[None, None]


def erode_by_steps(mask: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """erode in torch ops: each axis takes log2(size) steps; after a step of `span` every element holds the min of
    the `span` elements from it on."""
    size = before + after + 1
    for axis in (-1, -2):  # a square window = a row min then a column min
        x = F.pad(mask, [before, after, 0, 0] if axis == -1 else [0, 0, before, after], value=math.inf)
        span = 1
        while span < size:
            step = min(span, size - span)
            m = x.shape[axis] - step
            x = torch.minimum(x.narrow(axis, 0, m), x.narrow(axis, step, m))
            span += step
        mask = x
    return mask


@functools.cache
def gaussian_taps(size: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """The `size` taps of kornia's normalised Gaussian, sigma = 0.3*((size-1)*0.5-1)+0.8, as 0-dim float32 tensors."""
    sigma = torch.tensor(0.3 * ((size - 1) * 0.5 - 1) + 0.8, device=device)
    x = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    gauss = torch.exp(-x.pow(2) / (2 * sigma.pow(2)))
    return (gauss / gauss.sum()).unbind()


def gaussian_blur(mask: torch.Tensor, size: int) -> torch.Tensor:
    """kornia.filters.gaussian_blur2d(mask, (size, size), (s, s)), s = 0.3*((size-1)*0.5-1)+0.8, reflect border;
    taps accumulated one by one along x then y (fused multiply-adds), as kornia's CPU path does. (1, 1, H, W)."""
    h, w = mask.shape[-2:]
    compiled = mask.device.type == "cpu" and mask.dtype == torch.float32 and size // 2 < min(h, w)  # else: as torch
    if not (compiled and kernels.AVAILABLE and _compiled_blur_matches_torch()):
        return blur_by_taps(mask, size)
    return _compiled_blur(mask, size)


def _compiled_blur(mask: torch.Tensor, size: int) -> torch.Tensor:
    """gaussian_blur by kernels.gaussian_blur: one pass per axis, 2.5x as fast as the torch taps."""
    h, w = mask.shape[-2:]
    out = torch.empty(1, 1, h, w, dtype=torch.float32)
    taps = torch.stack(gaussian_taps(size)).numpy()
    kernels.gaussian_blur(mask[0, 0].numpy(), taps, np.empty((h + size - 1, w), np.float32), out[0, 0].numpy())
    return out


@functools.cache
def _compiled_blur_matches_torch() -> bool:
    """Whether the compiled blur's fused multiply-adds are what torch's addcmul_ computes on this CPU: its vectorised
    kernels (AVX2 and up) round once; a build without them rounds twice (then so would blur_by_taps here)."""
    mask = torch.from_numpy(np.random.default_rng(0).uniform(size=(1, 1, 23, 31)).astype(np.float32))
    return torch.equal(_compiled_blur(mask, 9), blur_by_taps(mask, 9))


def blur_by_taps(mask: torch.Tensor, size: int) -> torch.Tensor:
    """gaussian_blur in torch ops: a padded copy and one addcmul_ per tap and axis."""
    kernel = gaussian_taps(size, str(mask.device))
    radius = size // 2
    for axis in (-1, -2):
        n = mask.shape[axis]
        padded = F.pad(mask, [radius, radius, 0, 0] if axis == -1 else [0, 0, radius, radius], mode="reflect")
        out = padded.narrow(axis, 0, n) * kernel[0]
        for tap in range(1, size):
            out.addcmul_(padded.narrow(axis, tap, n), kernel[tap])
        mask = out
    return mask


def feather(coverage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Warped all-ones crop (1, 1, h, w) -> (mask, soft): the 2x2-eroded paste mask and its feathered blend weight."""
    mask = erode(coverage, 1, 0)  # kornia erosion, 2x2 kernel, origin (1, 1)
    w_edge = int(mask.sum() ** 0.5) // 20
    # cv2.erode: an even 2w kernel spans [-w, w-1]; an empty kernel (w_edge 0) means 3x3
    core = erode(mask, w_edge, w_edge - 1) if w_edge > 0 else erode(mask, 1, 1)
    return mask, gaussian_blur(core, 2 * w_edge + 1)


def _inverse_affine(affine: np.ndarray) -> np.ndarray:
    """(2, 3) frame -> crop affine -> its (2, 3) inverse in float64, in closed form (a non-finite affine gives a
    non-finite inverse). Not np.linalg.inv: in the served orchestrator under load its 3x3 solve (numpy's OpenBLAS
    LAPACK) held 27 % of the GIL samples, and lipsync took 29 ms of CPU per frame against 20 without it (RESULTS.md
    "eleventh round"); alone it takes 4 us, so the cause is contention that a test here did not reproduce."""
    (a, b, c), (d, e, f) = np.asarray(affine, np.float64).reshape(2, 3)
    det = a * e - b * d
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.array([[e, -b, b * f - c * e], [-d, a, c * d - a * f]]) / det


def paste_window(affine: np.ndarray, box_hw: tuple[int, int], frame_hw: tuple[int, int]) -> Window:
    """(y0, y1, x0, x1) of the frame that holds every pixel the paste can change, plus the zero margin the erosion
    and blur need to see to give full-frame results (the blur reaches w_edge <= sqrt(area)//20 pixels). Always a
    valid slice of the frame; empty when the crop lies off the frame."""
    h, w = box_hw
    cx, cy = np.array([-1.0, w, -1.0, w]), np.array([-1.0, -1.0, h, h])
    (a, b, c), (d, e, f) = _inverse_affine(affine)
    xs, ys = a * cx + b * cy + c, d * cx + e * cy + f  # elementwise: no BLAS call either
    y0, y1, x0, x1 = math.floor(ys.min()), math.ceil(ys.max()) + 1, math.floor(xs.min()), math.ceil(xs.max()) + 1
    margin = int(math.sqrt(max(y1 - y0, 0) * max(x1 - x0, 0))) // 20 + 2
    H, W = frame_hw
    y0, x0 = min(max(y0 - margin, 0), H), min(max(x0 - margin, 0), W)
    return y0, max(min(y1 + margin, H), y0), x0, max(min(x1 + margin, W), x0)


def _grid_back(
    affine: np.ndarray, box_hw: tuple[int, int], window: Window, frame_hw: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """The sampling grid that warps a crop-box image back into `window` of the frame."""
    inv = invert_affine(torch.as_tensor(np.asarray(affine), dtype=torch.float32).reshape(1, 2, 3))  # on the CPU
    return sampling_grid(inv, tuple(box_hw), frame_hw, window, device)


def _support(soft: torch.Tensor) -> tuple[slice, slice]:
    """Rows and columns of the bounding box of soft > 0 (empty slices if none): outside it the blend is a no-op."""
    nonzero = (soft[0, 0] > 0).cpu().numpy()
    rows, cols = np.flatnonzero(nonzero.any(1)), np.flatnonzero(nonzero.any(0))
    if not len(rows):
        return slice(0, 0), slice(0, 0)
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def paste_region(
    region: np.ndarray, face: torch.Tensor, affine: np.ndarray, window: Window, frame_hw: tuple[int, int]
) -> np.ndarray:
    """Blend one generated face into `region` = frame[y0:y1, x0:x1] for `window` = (y0, y1, x0, x1), any window
    that contains paste_window(affine, box, frame_hw) (the result there equals the whole-frame paste).

    region (h, w, 3) uint8 RGB, face (3, h_box, w_box) float in [-1, 1], affine (2, 3) frame -> crop, frame_hw the
    frame's (H, W). Returns the new (h, w, 3) uint8 region (a new array). Computes on the face's device.
    """
    y0, y1, x0, x1 = window
    if tuple(region.shape) != (y1 - y0, x1 - x0, 3):
        raise ValueError(f"region of shape {tuple(region.shape)} does not fit window {window}")
    out = np.array(region, np.uint8)
    if y1 <= y0 or x1 <= x0:  # crop entirely off-frame
        return out
    grid = _grid_back(affine, face.shape[-2:], window, frame_hw, face.device)
    coverage = grid_coverage(tuple(face.shape[-2:]), grid)
    mask, soft = feather(coverage)
    rows, cols = _support(soft)  # where soft is 0 the blend gives the region itself: sample and blend only inside
    if rows.start == rows.stop:
        return out
    face, grid = face.float(), grid[:, rows, cols]
    if face.device.type == "cpu":
        # grid_sample reads the face in gathers that no prefetcher follows: on a face that has left the cache (one
        # pasted right after an alignment, say) they took 1.0 ms at 512 px against 0.22 cached. One ordered read
        # brings it in for 0.03-0.04 ms (RESULTS.md "sixteenth round")
        face.sum()
    if face.device.type == "cpu" and kernels.AVAILABLE:  # fill, blend and truncation in one pass (kernels.py)
        samples = bilinear_sample(face[None], grid)[0].numpy()
        # contiguous copies (a few 100 KB): one argument layout, so the loop is compiled once (warm_up.py)
        weights = [np.ascontiguousarray(t[0, 0, rows, cols].numpy()) for t in (coverage, mask, soft)]
        image = np.array(cv2.split(out[rows, cols]))  # planes
        kernels.paste_blend(samples, *weights, np.float32(FILL_VALUE), image)
        out[rows, cols] = cv2.merge(list(image))
        return out
    warped, _ = grid_warp(face[None], grid, FILL_VALUE, coverage[..., rows, cols])
    pasted = warped.div_(2).add_(0.5).clamp_(0, 1).mul_(255).mul_(mask[..., rows, cols])
    soft = soft[..., rows, cols]
    src = torch.as_tensor(out[rows, cols]).to(face.device).permute(2, 0, 1)[None].float()
    blended = pasted.mul_(soft).add_((1 - soft) * src)
    out[rows, cols] = planes_to_hwc(blended[0].to(torch.uint8))  # truncation, as upstream
    return out


def paste_faces(
    regions: list[np.ndarray],
    faces: torch.Tensor,
    affines: np.ndarray,
    windows: list[Window],
    frame_hw: tuple[int, int],
) -> list[np.ndarray]:
    """paste_region for n faces at the model resolution R, each into its own region: faces (n, 3, R, R) float in
    [-1, 1] are first resized to the crop box (resize_face_to_box), as the pipeline does before pasting."""
    faces = torch.as_tensor(faces)
    box = box_hw(faces.shape[-1])
    if faces.device.type == "cpu":
        # one face at a time: its box-sized copy (2.8 MB at 512) is still in the cache when it is pasted, a window's
        # 16 are not (and are mapped anew): 7.2 -> 4.4 ms per face at 512, 2.6 -> 1.9 at 256 (RESULTS.md)
        boxed = (resize_face_to_box(f.float(), box) for f in faces)
    else:  # one resize kernel for all
        boxed = resize_face_to_box(faces.float(), box)
    return [paste_region(r, f, a, w, frame_hw) for r, f, a, w in zip(regions, boxed, np.asarray(affines), windows)]


def paste_back(frame: np.ndarray, face: torch.Tensor | np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Blend generated face(s) into whole frame(s): paste_region on paste_window, written into a copy.

    frame (H, W, 3) uint8 RGB, face (3, h_box, w_box) float in [-1, 1], affine (2, 3) frame -> crop;
    or batches (n, H, W, 3), (n, 3, h_box, w_box), (n, 2, 3). Returns uint8 frame(s) of the input shape.
    """
    face = torch.as_tensor(face)
    if face.dim() == 4:
        return np.stack([paste_back(f, x, a) for f, x, a in zip(frame, face, np.asarray(affine))])
    frame_hw = tuple(frame.shape[:2])
    y0, y1, x0, x1 = window = paste_window(affine, face.shape[-2:], frame_hw)
    out = frame.copy()
    out[y0:y1, x0:x1] = paste_region(frame[y0:y1, x0:x1], face, affine, window, frame_hw)
    return out


def paste_mask(
    affine: np.ndarray,
    box_hw: tuple[int, int],
    frame_hw: tuple[int, int],
    device: str | torch.device = "cpu",
    window: Window | None = None,
) -> tuple[torch.Tensor, Window]:
    """The feathered blend weight (upstream inv_soft_mask) inside `window` (default paste_window), zero outside it."""
    window = window or paste_window(affine, box_hw, frame_hw)
    y0, y1, x0, x1 = window
    if y1 <= y0 or x1 <= x0:
        return torch.zeros(0, 0, device=device), window
    grid = _grid_back(affine, box_hw, window, frame_hw, torch.device(device))
    return feather(grid_coverage(tuple(box_hw), grid))[1][0, 0], window
