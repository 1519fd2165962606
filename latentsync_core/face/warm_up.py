"""Compile and build what the face path needs before a server's first request.

numba compiles face/kernels.py's loops on their first call (seconds in all where no cache directory is writable:
each process then compiles its own), and a Lanczos resizer checks its tables against cv2.resize when it is built.
A model that aligns or pastes calls warm_up from its initialize, so its first stream does not wait for either.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .align import FaceAligner, box_hw
from .restore import paste_faces, paste_window


def warm_up(resolution: int, align: bool = True, paste: bool = True, device: str | torch.device = "cpu") -> float:
    """Align and paste back a synthetic face at `resolution`, the crop partly off the frame (so the fill is taken
    too), with the types and layouts a stream uses. Returns the seconds it took."""
    start = time.perf_counter()
    box = box_hw(resolution)
    frame_hw = (box[0] * 2, box[1] * 2)
    frame = np.random.default_rng(0).integers(0, 256, (*frame_hw, 3), dtype=np.uint8)
    affine = np.array([[1.0, 0.0, -box[1] * 1.5], [0.0, 1.0, 0.0]], np.float32)  # the box's right half off-frame
    if align:
        FaceAligner(resolution, device).align_affine(frame, affine)
    if paste:
        y0, y1, x0, x1 = window = paste_window(affine, box, frame_hw)
        face = torch.zeros(1, 3, resolution, resolution, device=device)
        paste_faces([frame[y0:y1, x0:x1]], face, affine[None], [window], frame_hw)
    return time.perf_counter() - start
