"""Paste generated faces back into their frames (upstream AlignRestore.restore_img + the resize before it).

The face is warped back with the inverse of the alignment affine and alpha-blended through a feathered mask: the
warped all-ones crop mask, eroded 2x2, eroded again by (2*w_edge)^2 (w_edge = sqrt(area)//20), then Gaussian
blurred. Everything is computed only inside a window around the warped crop, sized so that the result is
identical to computing on the whole frame; pixels outside the window are the input frame, untouched.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .align import FILL_VALUE, grid_warp, invert_affine, sampling_grid


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
    cv2 default border). (1, 1, H, W) float."""
    size = before + after + 1
    for axis in (-1, -2):  # a square window = a row min then a column min
        n = mask.shape[axis]
        padded = F.pad(mask, [before, after, 0, 0] if axis == -1 else [0, 0, before, after], value=math.inf)
        out = padded.narrow(axis, 0, n).clone()
        for tap in range(1, size):
            torch.minimum(out, padded.narrow(axis, tap, n), out=out)
        mask = out
    return mask


def gaussian_blur(mask: torch.Tensor, size: int) -> torch.Tensor:
    """kornia.filters.gaussian_blur2d(mask, (size, size), (s, s)), s = 0.3*((size-1)*0.5-1)+0.8, reflect border;
    taps accumulated one by one along x then y, as kornia's CPU path does."""
    sigma = torch.tensor(0.3 * ((size - 1) * 0.5 - 1) + 0.8, device=mask.device)
    x = torch.arange(size, dtype=torch.float32, device=mask.device) - size // 2
    gauss = torch.exp(-x.pow(2) / (2 * sigma.pow(2)))
    kernel = gauss / gauss.sum()
    radius = size // 2
    for axis in (-1, -2):
        n = mask.shape[axis]
        padded = F.pad(mask, [radius, radius, 0, 0] if axis == -1 else [0, 0, radius, radius], mode="reflect")
        out = padded.narrow(axis, 0, n) * kernel[0]
        for tap in range(1, size):
            out.addcmul_(padded.narrow(axis, tap, n), kernel[tap])
        mask = out
    return mask


def paste_window(affine: np.ndarray, box_hw: tuple[int, int], frame_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the frame that holds every pixel the paste can change, plus the zero margin the erosion
    and blur need to see to give full-frame results (the blur reaches w_edge <= sqrt(area)//20 pixels)."""
    h, w = box_hw
    corners = np.array([[-1, -1, 1], [w, -1, 1], [-1, h, 1], [w, h, 1]], dtype=np.float64).T
    inv = np.linalg.inv(np.vstack([np.asarray(affine, np.float64).reshape(2, 3), [0, 0, 1]]))
    xs, ys = (inv @ corners)[:2]
    y0, y1, x0, x1 = math.floor(ys.min()), math.ceil(ys.max()) + 1, math.floor(xs.min()), math.ceil(xs.max()) + 1
    margin = int(math.sqrt(max(y1 - y0, 0) * max(x1 - x0, 0))) // 20 + 2
    H, W = frame_hw
    return max(y0 - margin, 0), min(y1 + margin, H), max(x0 - margin, 0), min(x1 + margin, W)


def paste_in_window(frame: np.ndarray, face: torch.Tensor, affine: np.ndarray, window: tuple[int, int, int, int]
                    ) -> tuple[np.ndarray, torch.Tensor]:
    """paste_back of one (3, h_box, w_box) face, computed inside `window` (y0, y1, x0, x1) of the frame only.
    Returns the new frame and the blend weight inside the window."""
    dev = face.device
    box = tuple(face.shape[-2:])
    frame_hw = tuple(frame.shape[:2])
    y0, y1, x0, x1 = window
    if y1 <= y0 or x1 <= x0:  # crop entirely off-frame
        return frame.copy(), torch.zeros(0, 0, device=dev)
    inv = invert_affine(torch.as_tensor(np.asarray(affine), dtype=torch.float32, device=dev).reshape(1, 2, 3))
    grid = sampling_grid(inv, box, frame_hw, window)

    warped, coverage = grid_warp(face.float()[None], grid, fill=FILL_VALUE)
    warped = (warped / 2 + 0.5).clamp(0, 1) * 255
    mask = erode(coverage, 1, 0)  # kornia erosion, 2x2 kernel, origin (1, 1)
    pasted = mask * warped

    w_edge = int(mask.sum() ** 0.5) // 20
    # cv2.erode: an even 2w kernel spans [-w, w-1]; an empty kernel (w_edge 0) means 3x3
    core = erode(mask, w_edge, w_edge - 1) if w_edge > 0 else erode(mask, 1, 1)
    soft = gaussian_blur(core, 2 * w_edge + 1)

    region = torch.from_numpy(np.ascontiguousarray(frame[y0:y1, x0:x1])).to(dev).permute(2, 0, 1)[None].float()
    blended = soft * pasted + (1 - soft) * region
    out = frame.copy()
    out[y0:y1, x0:x1] = blended[0].permute(1, 2, 0).to(torch.uint8).cpu().numpy()  # truncation, as upstream
    return out, soft[0, 0]


def paste_back(frame: np.ndarray, face: torch.Tensor | np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Blend generated face(s) into frame(s).

    frame (H, W, 3) uint8 RGB, face (3, h_box, w_box) float in [-1, 1], affine (2, 3) frame -> crop;
    or batches (n, H, W, 3), (n, 3, h_box, w_box), (n, 2, 3). Returns uint8 frame(s) of the input shape.
    Computes on the face's device.
    """
    face = torch.as_tensor(face)
    if face.dim() == 4:
        return np.stack([paste_back(f, x, a) for f, x, a in zip(frame, face, np.asarray(affine))])
    return paste_in_window(frame, face, affine, paste_window(affine, face.shape[-2:], frame.shape[:2]))[0]


def paste_mask(affine: np.ndarray, box_hw: tuple[int, int], frame_hw: tuple[int, int],
               device: str | torch.device = "cpu") -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The feathered blend weight (upstream inv_soft_mask) inside paste_window; zero everywhere outside it."""
    window = paste_window(affine, box_hw, frame_hw)
    frame = np.zeros((*frame_hw, 3), np.uint8)
    return paste_in_window(frame, torch.zeros(3, *box_hw, device=device), affine, window)[1], window
