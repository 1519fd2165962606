"""(d) of latentsync-gpu-bench: face alignment and paste-back on the GPU against the CPU.

On `--target gpu` the restorer pastes each face back on the GPU, and FaceAligner can warp crops there too
(device=...); the golden tests pin the CPU path to upstream bit for bit. Here, for a few bundled frames and a
random similarity affine per frame around the frame's centre (no detector needed), at each resolution:
FaceAligner's crop and R x R face on the device against the CPU, and paste_region of a random face. TF32 is
allowed for CUDA products meanwhile, as a network model's instance allows it in its process. Reported per
resolution: how many values differ and by how much at most, and ms per frame (align + paste) on each side. The
CUDA grid sampler's fused multiply-adds may move a truncation by one level; more than that is a bug.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from latentsync_core.face.align import FaceAligner, box_hw
from latentsync_core.face.restore import paste_region, paste_window


@dataclass
class GeometryRow:
    resolution: int
    frames: int
    crop_differ: int  # uint8 values of the frame-space crops that differ, over all frames
    crop_max_diff: int
    face_differ: int  # ... of the R x R faces
    face_max_diff: int
    paste_differ: int  # ... of the pasted regions
    paste_max_diff: int
    device_ms: float  # align + paste per frame
    cpu_ms: float


def random_affine(rng: np.random.Generator, frame_hw: tuple[int, int], box: tuple[int, int]) -> np.ndarray:
    """(2, 3) float32 frame -> crop similarity: a face-sized square near the frame's centre onto the crop box."""
    (H, W), (h, w) = frame_hw, box
    scale = w / (min(H, W) / 4 * rng.uniform(0.8, 1.25))
    angle = rng.uniform(-0.2, 0.2)
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centre = np.array([W / 2, H / 2]) + rng.uniform(-0.05, 0.05, 2) * [W, H]
    shift = np.array([w / 2, h / 2]) - rotation @ centre
    return np.concatenate([rotation, shift[:, None]], axis=1).astype(np.float32)


def _differ(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(np.count_nonzero(diff)), int(diff.max(initial=0))


def _align_and_paste(aligner: FaceAligner, frame: np.ndarray, affine: np.ndarray, face: torch.Tensor):
    aligned = aligner.align_affine(frame, affine)
    frame_hw = frame.shape[:2]
    y0, y1, x0, x1 = window = paste_window(affine, face.shape[-2:], frame_hw)
    pasted = paste_region(frame[y0:y1, x0:x1], face, affine, window, frame_hw)
    return aligned.crop, aligned.face, pasted


def compare(frames: np.ndarray, resolutions: list[int], device: torch.device, seed: int) -> list[GeometryRow]:
    rng, rows = np.random.default_rng(seed), []
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        for res in resolutions:
            box = box_hw(res)
            sides = {"device": FaceAligner(res, device), "cpu": FaceAligner(res)}
            counts, seconds = np.zeros(6, np.int64), {"device": 0.0, "cpu": 0.0}
            for k, frame in enumerate(frames):
                affine = random_affine(rng, frame.shape[:2], box)
                face = torch.from_numpy(rng.uniform(-1, 1, (3, *box)).astype(np.float32))
                out = {}
                for side, aligner in sides.items():
                    on = face.to(aligner.device)
                    if k == 0:  # warm-up: kernels, tables, caches
                        _align_and_paste(aligner, frame, affine, on)
                    start = time.perf_counter()
                    out[side] = _align_and_paste(aligner, frame, affine, on)
                    if aligner.device.type == "cuda":
                        torch.cuda.synchronize(aligner.device)
                    seconds[side] += time.perf_counter() - start
                for i, (a, b) in enumerate(zip(out["device"], out["cpu"])):
                    differ, largest = _differ(a, b)
                    counts[2 * i] += differ
                    counts[2 * i + 1] = max(counts[2 * i + 1], largest)
            n = len(frames)
            rows.append(GeometryRow(res, n, *map(int, counts), 1e3 * seconds["device"] / n, 1e3 * seconds["cpu"] / n))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
    return rows
