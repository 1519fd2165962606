"""The fixed mouth mask and the masked model inputs (upstream load_fixed_mask + ImageProcessor masking).

Convention as upstream: 1 = keep the reference pixel, 0 = region the UNet regenerates (lower face and mouth).
Upstream's mask is the image latentsync/utils/mask.png of its repository, the mask its UNet was trained with:
`load_fixed_mask` reads it as upstream does, from a weights folder that holds it (mask.png beside the
checkpoints; latentsync-export --mask). It is not shipped with this project; without it `mouth_mask` is this
project's own drawing on a 256 x 256 canvas: the band from just below the eyes down to the chin, bounded by a half
ellipse, with a notch left open around the nose (a few latent cells along the jaw differ from upstream's).
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import torch

CANVAS = 256
# Geometry on the 256 canvas, (x, y) pixels, inclusive corners.
BAND_TOP_LEFT, BAND_BOTTOM_RIGHT = (9, 95), (246, 140)  # straight-sided top part of the regenerated region
CHIN_CENTER, CHIN_AXES = (128, 140), (119, 102)  # lower half ellipse down to the chin (y = 242)
NOSE_TOP_LEFT, NOSE_BOTTOM_RIGHT = (78, 95), (177, 127)  # kept notch around the nose tip


def mouth_mask(resolution: int) -> np.ndarray:
    """(R, R) float32 in [0, 1]: the canvas resized with LANCZOS4 and divided by 255, like load_fixed_mask."""
    canvas = np.full((CANVAS, CANVAS), 255, np.uint8)
    cv2.rectangle(canvas, BAND_TOP_LEFT, BAND_BOTTOM_RIGHT, 0, thickness=-1)
    cv2.ellipse(canvas, CHIN_CENTER, CHIN_AXES, 0, 0, 180, 0, thickness=-1)  # 0..180 deg = the lower half
    cv2.rectangle(canvas, NOSE_TOP_LEFT, NOSE_BOTTOM_RIGHT, 255, thickness=-1)
    resized = cv2.resize(canvas, (resolution, resolution), interpolation=cv2.INTER_LANCZOS4)
    return (resized / 255.0).astype(np.float32)


@functools.lru_cache(maxsize=8)
def load_fixed_mask(path: str | Path, resolution: int) -> np.ndarray:
    """Upstream's load_fixed_mask: the image read by OpenCV, resized to R x R with LANCZOS4, divided by 255, as
    (R, R) float32 (read-only: cached). Upstream multiplies each colour channel by its own mask
    channel and gives the UNet the first: its mask.png is grey, and an image whose channels differ is refused."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: not an image OpenCV can read (expected upstream's latentsync/utils/mask.png)")
    if not (np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])):
        raise ValueError(f"{path}: the mouth mask must be grey (upstream's mask.png is); its colour channels differ")
    resized = cv2.resize(image[..., 0], (resolution, resolution), interpolation=cv2.INTER_LANCZOS4)
    mask = (resized / 255.0).astype(np.float32)
    mask.flags.writeable = False
    return mask


def fixed_mask(resolution: int, image: str | Path | None = None) -> np.ndarray:
    """The (R, R) mouth mask of a stream, its own copy: upstream's mask image where the weights have it (read once
    per process), else `mouth_mask`."""
    return mouth_mask(resolution) if image is None else load_fixed_mask(str(image), resolution).copy()


def keep_levels(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """An (R, R) mask in [0, 1] -> its uint8 levels (R, R), 255 = keep: what the VAE encoder receives, a quarter
    of the float bytes. Exact only for masks of k/255 values (upstream's mask image is one); others are refused."""
    mask = torch.as_tensor(mask, dtype=torch.float32)
    levels = (mask * 255).round().clamp(0, 255).to(torch.uint8)
    if not torch.equal(levels.float() / 255.0, mask):
        raise ValueError("the mouth mask must hold multiples of 1/255 (an 8-bit mask image divided by 255)")
    return levels


_NORMALIZED = ((torch.arange(256, dtype=torch.uint8).float() / 255.0 - 0.5) / 0.5).numpy()  # per uint8 value


def normalized_faces(faces: torch.Tensor) -> torch.Tensor:
    """uint8 faces -> float32 in [-1, 1], upstream's normalize(image / 255), in the faces' memory layout. On the CPU
    through a table of that arithmetic's 256 results (cv2.LUT, one pass): the four whole-tensor ops took 19 ms
    for a window of 16 faces at 256 px, the table 1 ms. Not while traced (ONNX export, torch.compile): a table
    lookup outside torch would turn the faces into a constant of the graph."""
    tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
    if faces.device.type == "cpu" and faces.dtype == torch.uint8 and faces.numel() and not tracing:
        for order in ((0, 1, 2, 3), (0, 2, 3, 1)) if faces.dim() == 4 else ():  # as stored: NCHW or NHWC
            stored = faces.permute(order)
            if stored.is_contiguous():
                values = cv2.LUT(stored.numpy().reshape(-1, stored.shape[-1]), _NORMALIZED)
                return torch.from_numpy(values.reshape(stored.shape)).permute(*map(int, np.argsort(order)))
    return (faces.float() / 255.0 - 0.5) / 0.5


def encoder_pixels(faces: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The VAE encoder's input from uint8 faces (n, 3, R, R) and uint8 keep levels (n, 1, R, R): the faces in
    [-1, 1] times keep / 255 (255 = the reference face as is). Bit-identical to `masked_face_inputs`' masked and
    reference pixels: k / 255 in float32 is the mask's float32 value for every k. Contiguous, as a served model
    receives it (oneDNN's result depends on the layout)."""
    return (normalized_faces(faces) * (keep.float() / 255.0)).contiguous()


def masked_face_inputs(
    faces: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Aligned uint8 faces (n, R, R, 3) or (n, 3, R, R) and an (R, R) mask ->
    (ref_pixels (n, 3, R, R) in [-1, 1], masked_pixels = ref * mask, masks (n, 1, R, R)), float32 on the faces'
    device (upstream's are float64 because its mask is; values agree to float32 rounding)."""
    faces = channels_first(torch.as_tensor(faces))
    ref = normalized_faces(faces)
    mask = torch.as_tensor(mask, dtype=torch.float32, device=faces.device).reshape(1, 1, *ref.shape[-2:])
    return ref, ref * mask, mask.expand(len(ref), -1, -1, -1).contiguous()


def channels_first(faces: torch.Tensor) -> torch.Tensor:
    """(n, R, R, 3) -> (n, 3, R, R) as a view; (n, 3, R, R) as is (the same test as upstream)."""
    return faces.permute(0, 3, 1, 2) if faces.shape[3] == 3 else faces
