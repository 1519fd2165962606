"""Face alignment: 106 landmarks -> 3 points -> smoothed similarity transform -> face crop (upstream AlignRestore).

The crop is a (h_box, w_box) = (100, 75) * ratio window of the frame, ratio = 2.8 * resolution / 256, that puts
the eyebrow centres and the nose on a fixed template; it is then squashed to resolution x resolution.
Warps follow kornia.geometry.transform.warp_affine (bilinear, align_corners=True, pixel-centre normalisation,
optional constant fill) so crops and paste-backs match upstream to the uint8 truncation step. A crop reads only the
frame pixels it samples, at exactly the whole-frame sample positions: on the CPU one compiled pass over the uint8
frame (compiled_crop), elsewhere grid_sample on the frame's source_window converted to float (sampled_crop).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from . import kernels
from .lanczos import lanczos4_resizer

log = logging.getLogger(__name__)

# Template (x, y) at ratio 1: left eyebrow centre, right eyebrow centre, nose centre; box is 75 wide x 100 high.
FACE_TEMPLATE = np.array([[17.0, 20.0], [58.0, 20.0], [37.5, 40.0]])
BOX_WH = (75, 100)
FILL_VALUE = 127.0  # crop pixels that fall outside the frame
SMOOTH_MOMENTUM = 0.2  # weight of the previous frame's bias in the EMA

# Landmark indices (InsightFace 2d106) averaged into the three alignment points.
LEFT_BROW = [43, 48, 49, 51, 50]
RIGHT_BROW = [101, 102, 103, 104, 105]
NOSE = [74, 77, 83, 86]


def landmarks_to_points(lmk106: np.ndarray) -> np.ndarray:
    """(106, 2) landmarks (x, y) -> (3, 2) float32 rounded [left brow, right brow, nose] centres."""
    lmk106 = np.asarray(lmk106)
    # mean in the landmarks' own dtype, then round (half to even), exactly as upstream
    points = [np.round(np.mean(lmk106[idx], axis=0)) for idx in (LEFT_BROW, RIGHT_BROW, NOSE)]
    return np.stack(points).astype(np.float32)


def crop_ratio(resolution: int) -> float:
    return resolution / 256 * 2.8


def box_hw(resolution: int) -> tuple[int, int]:
    """(height, width) of the frame-space crop that is resized to resolution x resolution."""
    ratio = crop_ratio(resolution)
    return int(BOX_WH[1] * ratio), int(BOX_WH[0] * ratio)


def similarity_transform(points: torch.Tensor, template: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Procrustes fit points -> template (both (3, 2) float32).

    Returns the (2, 3) matrix and the nose offset (template - points) in normalised units, the raw smoothing bias.
    """
    c1, c2 = points.mean(0), template.mean(0)
    p1, p2 = points - c1, template - c2
    s1, s2 = p1.std(), p2.std()  # unbiased, over all 6 coordinates
    p1, p2 = p1 / s1, p2 / s2
    u, _, vh = torch.linalg.svd(p1.T @ p2)
    v = vh.mT
    rot = v @ u.T
    if torch.det(rot) < 0:  # reflection -> flip the weakest axis
        v = torch.cat([v[:, :1], -v[:, 1:]], dim=1)
        rot = v @ u.T
    scale = s2 / s1
    shift = c2[:, None] - scale * (rot @ c1[:, None])
    return torch.cat([scale * rot, shift], dim=1), p2[2] - p1[2]


def _normaliser(h: int, w: int) -> torch.Tensor:
    """Pixel -> [-1, 1] (align_corners=True) as a 3x3 float32 matrix (kornia's normal_transform_pixel)."""
    sx = 1.0 if w == 1 else 2.0 / (w - 1.0)
    sy = 1.0 if h == 1 else 2.0 / (h - 1.0)
    return torch.tensor([[sx, 0.0, -1.0 if w > 1 else 0.0], [0.0, sy, -1.0 if h > 1 else 0.0], [0.0, 0.0, 1.0]])


def _inverse_3x3(m: torch.Tensor) -> torch.Tensor:
    """Adjugate inverse (rows = cross products of columns), the closed form kornia uses inside its warps."""
    a, b, c = m[..., :, 0], m[..., :, 1], m[..., :, 2]
    adj = torch.stack([torch.linalg.cross(b, c), torch.linalg.cross(c, a), torch.linalg.cross(a, b)], dim=-2)
    return adj / (a * adj[..., 0, :]).sum(-1)[..., None, None]


def _homogeneous(affine: torch.Tensor) -> torch.Tensor:
    return F.pad(affine, [0, 0, 0, 1]) + F.pad(torch.ones_like(affine[..., :1, :1]), [2, 0, 2, 0])


def invert_affine(affine: torch.Tensor) -> torch.Tensor:
    """(..., 2, 3) -> inverse (..., 2, 3) via the 3x3 homogeneous matrix (kornia invert_affine_transform)."""
    return torch.linalg.inv(_homogeneous(affine))[..., :2, :]


@functools.lru_cache(maxsize=64)
def _grid_constants(src_hw: tuple[int, int], dst_hw: tuple[int, int], device: str) -> tuple[torch.Tensor, ...]:
    """What sampling_grid needs besides the affine, per size pair: the source's inverse normaliser, the
    destination's normaliser and its normalised row and column positions (shared, never written)."""
    ys = torch.linspace(-1.0, 1.0, dst_hw[0]) if dst_hw[0] > 1 else torch.zeros(1)
    xs = torch.linspace(-1.0, 1.0, dst_hw[1]) if dst_hw[1] > 1 else torch.zeros(1)
    constants = _inverse_3x3(_normaliser(*src_hw)), _normaliser(*dst_hw), ys, xs
    return tuple(c.to(device) for c in constants)


def grid_theta(affine: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """(B, 2, 3) src -> dst pixels affine -> (B, 3, 3) float32 CPU matrix from the destination's normalised
    positions to the source's, kornia's closed-form inverse of normaliser products (sampling_grid's rows 0 and 1)."""
    src_from_norm, norm_dst, _, _ = _grid_constants(src_hw, dst_hw, "cpu")
    return _inverse_3x3(norm_dst @ (_homogeneous(affine.float().cpu()) @ src_from_norm))


def sampling_grid(
    affine: torch.Tensor,
    src_hw: tuple[int, int],
    dst_hw: tuple[int, int],
    window: tuple[int, int, int, int] | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """grid_sample grid (B, h, w, 2) warping src -> dst with (B, 2, 3) float32 `affine` (src pixels -> dst pixels),
    on `device` (default: the affine's).

    Same arithmetic as kornia.geometry.transform.warp_affine (normalise, closed-form inverse, per-axis
    multiply-adds), so sample positions agree to the last bit. `window` = (y0, y1, x0, x1) restricts the grid to
    that part of the destination with the values of the full grid there. The 3x3 products always run on the CPU
    in float32: on a GPU they may run in TF32 (10-bit mantissas: sample positions off by up to ~0.7 px at 1080p)
    whatever this process's other models allow; only the elementwise grid arithmetic runs on `device`.
    """
    dev = affine.device if device is None else torch.device(device)
    theta = grid_theta(affine, src_hw, dst_hw).to(dev)
    _, _, ys, xs = _grid_constants(src_hw, dst_hw, str(dev))
    y0, y1, x0, x1 = window or (0, dst_hw[0], 0, dst_hw[1])
    ys, xs = ys[y0:y1], xs[x0:x1]
    planes = torch.empty(len(theta), 2, len(ys), len(xs), dtype=torch.float32, device=dev)
    if dev.type == "cpu" and kernels.AVAILABLE:  # one pass (kernels.py)
        kernels.affine_planes(theta[:, :2].contiguous().numpy(), xs.numpy(), ys.numpy(), planes.numpy())
        return planes.permute(0, 2, 3, 1)
    for i, t in enumerate(theta[:, :2, :, None].unbind(1)):  # t: (B, 3, 1)
        # (t0 * x + t1 * y) + t2 as kornia sums it; the products depend on one axis only, so they are taken per
        # column and per row and only the two sums run over the whole grid
        torch.add((t[:, 0] * xs)[:, None], (t[:, 1] * ys)[:, :, None], out=planes[:, i]).add_(t[:, 2, :, None])
    return planes.permute(0, 2, 3, 1)  # x and y planes seen as (B, h, w, 2): grid_sample reads them as they are


def source_window(grid: torch.Tensor, src_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the source pixels that bilinear grid_sample (align_corners=True) reads at a sampling_grid,
    from the floor of the smallest sample position to the pixel after the largest, clipped to the source (may be
    empty). The grid is affine in its row and column (monotone products and sums), so its extremes lie at its
    corners; positions are unnormalised as grid_sample does, (g + 1) * ((size - 1) / 2) in float32, also monotone.
    One pixel of slack on each side costs nothing and keeps the reads inside whatever the rounding. (The 8 corner
    values go through numpy: a torch reduction, even that small, can wait milliseconds for a busy OpenMP thread.
    They are sliced out before they leave the grid's device: a GPU grid's 2 MB at 512 px stay there.)"""
    h, w = grid.shape[1:3]
    (H, W), corners = src_hw, grid[:, :: max(h - 1, 1), :: max(w - 1, 1)].cpu().numpy().reshape(-1, 2)
    if not np.isfinite(corners).all():  # overflowing corners say nothing of the samples between them: all pixels
        return 0, H, 0, W
    scale = np.array([(W - 1) / 2, (H - 1) / 2], np.float32)
    (x_lo, y_lo), (x_hi, y_hi) = (
        np.floor((c + np.float32(1)) * scale).tolist() for c in (corners.min(0), corners.max(0))
    )
    clip = lambda v, n: int(min(max(v, 0), n))  # noqa: E731 - Python's min/max: np.clip costs ~5 us per scalar
    return clip(y_lo - 1, H), clip(y_hi + 3, H), clip(x_lo - 1, W), clip(x_hi + 3, W)


def region_as_source(region: torch.Tensor, window: tuple[int, int, int, int], src_hw: tuple[int, int]) -> torch.Tensor:
    """(h, w, C) `region` = src[y0:y1, x0:x1] -> (1, C + 1, H, W) float32 tensor that grid_sample can take for the
    whole (H, W) source: a buffer holding only the region, addressed with a full source's strides (pixel (y, x) at
    (C + 1) * (y * w + x)). grid_sample then computes exactly the full-source sample positions; elements outside
    the window alias other rows or unset memory, so it may only be sampled where source_window says. The last
    channel is 1.0: its warp is grid_coverage, from the same grid_sample call (each channel is interpolated alone
    with the same weights, so every channel equals its own call's result bit for bit)."""
    (H, W), (h, w, C), (y0, _, x0, _) = src_hw, region.shape, window
    if h == 0 or w == 0:  # nothing is sampled (all reads are masked): zeros of any layout will do
        return torch.zeros(1, 1, 1, 1, device=region.device).expand(1, C + 1, H, W)
    buffer = torch.empty((C + 1) * ((H - 1) * w + W), dtype=torch.float32, device=region.device)
    start = (C + 1) * (y0 * w + x0)
    pixels = buffer[start : start + h * w * (C + 1)].view(h, w, C + 1)
    if C == 3 and region.dtype == torch.uint8 and region.device.type == "cpu":
        # RGB -> RGBA in OpenCV, then one contiguous cast: ~2.5x faster than torch's strided copy into 4 channels
        rgba = cv2.cvtColor(region.numpy(), cv2.COLOR_RGB2RGBA)  # reads the strided region as it is
        np.copyto(pixels.numpy(), rgba, casting="unsafe")
    else:
        pixels[..., :C].copy_(region)
    pixels[..., C].fill_(1.0)
    return buffer.as_strided((1, C + 1, H, W), (0, 1, (C + 1) * w, C + 1))


def bilinear_sample(src: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """grid_sample as kornia's warp_affine calls it: bilinear, zeros outside the source, align_corners=True."""
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def fill_uncovered(warped: torch.Tensor, coverage: torch.Tensor, fill: float) -> torch.Tensor:
    """kornia's constant fill, in place: the weight a sample lost outside the source goes to `fill`."""
    return warped.add_((1 - coverage).mul_(fill))


def grid_coverage(src_hw: tuple[int, int], grid: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) bilinear warp at `grid` of an all-ones (H, W) image, zero outside it: the weight each sample keeps
    inside the source. On the CPU a kernel computes grid_sample's arithmetic for it (kernels.coverage), elsewhere
    grid_sample samples a stride-0 view of one 1."""
    if grid.device.type != "cpu" or grid.dtype != torch.float32 or not kernels.AVAILABLE:
        return bilinear_sample(grid.new_ones(1, 1, 1, 1).expand(grid.shape[0], 1, *src_hw), grid)
    out = torch.empty(grid.shape[0], 1, *grid.shape[1:3], dtype=torch.float32)
    for item, planes in zip(out.numpy(), grid.numpy()):
        kernels.coverage(planes[..., 0], planes[..., 1], *src_hw, item[0])
    return out


def grid_warp(
    src: torch.Tensor, grid: torch.Tensor, fill: float | None = None, coverage: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear sample (B, C, H, W) float at `grid`; returns (warped, coverage) where coverage is grid_coverage (pass
    it when it is at hand). With `fill`, uncovered weight is filled with that value (kornia)."""
    coverage = grid_coverage(tuple(src.shape[2:]), grid) if coverage is None else coverage
    warped = bilinear_sample(src, grid)
    if fill is not None:
        warped = fill_uncovered(warped, coverage, fill)
    return warped, coverage


def planes_to_hwc(planes: torch.Tensor) -> np.ndarray:
    """(C, h, w) uint8 tensor -> contiguous (h, w, C) array; cv2.merge interleaves ~4x faster than a torch permute."""
    return cv2.merge(list(planes.cpu().numpy()))


def compiled_crop(frame: torch.Tensor, affine: torch.Tensor, box_hw: tuple[int, int]) -> torch.Tensor:
    """FaceAligner.warp_crop by kernels.affine_crop: one pass over the crop that reads the (H, W, 3) uint8
    C-contiguous CPU frame where it samples, as uint8, and writes the truncated crop rows."""
    frame_hw = tuple(frame.shape[:2])
    theta = grid_theta(affine, frame_hw, box_hw)[0, :2].contiguous().numpy()
    _, _, ys, xs = _grid_constants(frame_hw, box_hw, "cpu")
    rows = np.empty((box_hw[0], 3, box_hw[1]), np.uint8)
    kernels.affine_crop(frame.numpy(), theta, xs.numpy(), ys.numpy(), np.float32(-FILL_VALUE), rows)
    return torch.from_numpy(rows).permute(1, 0, 2)


def sampled_crop(
    frame: torch.Tensor, affine: torch.Tensor, box_hw: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """FaceAligner.warp_crop in torch ops on `device`: the frame's source_window as float with a channel of ones,
    one grid_sample for the samples and their coverage, kornia's fill and the uint8 cast."""
    frame_hw = tuple(frame.shape[:2])
    grid = sampling_grid(affine, frame_hw, box_hw, device=device)
    y0, y1, x0, x1 = window = source_window(grid, frame_hw)
    sampled = bilinear_sample(region_as_source(frame[y0:y1, x0:x1].to(device), window, frame_hw), grid)[0]
    samples = fill_uncovered(sampled[:3], sampled[3:], FILL_VALUE).permute(1, 0, 2)
    return samples.to(torch.uint8, memory_format=torch.contiguous_format).cpu().permute(1, 0, 2)


def _takes_compiled_warp(frame: torch.Tensor) -> bool:
    """Whether a CPU aligner's crop of `frame` runs kernels.affine_crop: a C-contiguous (H, W, 3) uint8 CPU frame
    (a decoded one; any other takes the torch ops, exact too) on a CPU whose torch rounds as the kernel does. Sides
    of 2**24 pixels and more go to torch too: the kernel tests bounds in float32, which holds W - 1 exactly only
    below that (a frame that wide is no video's)."""
    return (
        frame.device.type == "cpu"
        and frame.dtype == torch.uint8
        and frame.dim() == 3
        and frame.shape[2] == 3
        and 0 < frame.numel()
        and max(frame.shape[:2]) <= 2**24
        and frame.is_contiguous()
        and kernels.AVAILABLE
        and _compiled_warp_matches_torch()
    )


def rounding_check_case() -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """(frame, affine, box) that _compiled_warp_matches_torch crops both ways: a 41 x 57 frame of flat 4x4 blocks
    (where all four corners are equal, an order that rounds differently truncates to another value: ~10 % of
    samples; on noise almost none), the crop rotated, scaled and partly off it."""
    blocks = np.random.default_rng(0).integers(0, 256, (11, 15, 3), dtype=np.uint8)
    frame = torch.from_numpy(np.ascontiguousarray(blocks.repeat(4, 0).repeat(4, 1)[:41, :57]))
    return frame, torch.tensor([[[1.37, 0.41, -11.3], [-0.41, 1.37, 7.9]]]), (64, 48)


@functools.cache
def _compiled_warp_matches_torch() -> bool:
    """Whether kernels.affine_crop's rounding is grid_sample's on this CPU (ATen's AVX2 build fuses its corner sums
    into multiply-adds; another build may round otherwise), on rounding_check_case."""
    frame, affine, box = rounding_check_case()
    same = torch.equal(compiled_crop(frame, affine, box), sampled_crop(frame, affine, box, torch.device("cpu")))
    if not same:
        log.warning("the compiled face crop does not round as this torch's grid_sample: using grid_sample")
    return same


@dataclass
class AlignedFace:
    face: np.ndarray  # (R, R, 3) uint8 RGB, HWC: the crop squashed to the model resolution
    crop_pixels: torch.Tensor  # (3, h_box, w_box) uint8 RGB planes (FaceAligner.warp_crop): the frame-space crop
    affine: np.ndarray  # (2, 3) float32, frame pixels -> crop pixels (smoothing bias included)

    @property
    def crop(self) -> np.ndarray:
        """(h_box, w_box, 3) uint8 RGB, HWC; made on demand, as the pipeline needs only `face`."""
        return planes_to_hwc(self.crop_pixels)


class FaceAligner:
    """Stateful aligner, one per stream: the nose bias is smoothed over successive `align` calls."""

    def __init__(self, resolution: int, device: str | torch.device = "cpu"):
        self.resolution = resolution
        self.device = torch.device(device)
        self.box_hw = box_hw(resolution)
        self.template = torch.tensor(FACE_TEMPLATE * crop_ratio(resolution), dtype=torch.float32)
        self.p_bias: torch.Tensor | None = None

    def reset(self) -> None:
        self.p_bias = None

    def transform(self, points3: np.ndarray, smooth: bool = True) -> np.ndarray:
        """(3, 2) points -> (2, 3) float32 frame -> crop affine; with `smooth`, updates the bias state."""
        matrix, bias = similarity_transform(torch.as_tensor(np.asarray(points3), dtype=torch.float32), self.template)
        if smooth:
            if self.p_bias is not None:
                bias = self.p_bias * SMOOTH_MOMENTUM + bias * (1 - SMOOTH_MOMENTUM)
            self.p_bias = bias
            # upstream adds the normalised-unit bias to the pixel translation; kept for parity
            matrix[:, 2] = matrix[:, 2] + bias
        return matrix.numpy()

    def warp_crop(self, frame_rgb: np.ndarray | torch.Tensor, affine: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 frame -> (3, h_box, w_box) uint8 crop: upstream's crop (fill 127 included, truncated
        toward zero), as a view of (h_box, 3, w_box) rows: the layout the Lanczos resize reads in place. Only the
        part of the frame that the crop samples is read."""
        frame, affine = torch.as_tensor(frame_rgb), torch.as_tensor(affine)[None]
        if self.device.type == "cpu" and _takes_compiled_warp(frame):
            return compiled_crop(frame, affine, self.box_hw)
        return sampled_crop(frame, affine, self.box_hw, self.device)

    def warp(self, frame_rgb: np.ndarray | torch.Tensor, affine: np.ndarray) -> np.ndarray:
        """The (h_box, w_box, 3) uint8 HWC crop (upstream's face crop before the resize)."""
        return planes_to_hwc(self.warp_crop(frame_rgb, affine))

    def align(self, frame_rgb: np.ndarray, points3: np.ndarray, smooth: bool = True) -> AlignedFace:
        return self.align_affine(frame_rgb, self.transform(points3, smooth))

    def align_affine(self, frame_rgb: np.ndarray, affine: np.ndarray) -> AlignedFace:
        """The face that a known frame -> crop affine cuts out (align without the landmark fit)."""
        crop = self.warp_crop(frame_rgb, affine)
        # cv2.resize(crop, (R, R), interpolation=cv2.INTER_LANCZOS4), bit for bit
        face = lanczos4_resizer(self.box_hw, (self.resolution, self.resolution))(crop)
        return AlignedFace(face=face, crop_pixels=crop, affine=np.asarray(affine, np.float32))
