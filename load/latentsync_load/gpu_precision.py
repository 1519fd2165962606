"""(c) of latentsync-gpu-bench: bfloat16 against float32 on one window of the in-process pipeline.

The same random full-size weights are loaded in both precisions (latentsync_core.loaders, as the served models
load them) and one 16-frame window of real face frames goes through LipSyncStream (detection, alignment, VAE
encoding, the denoising loop, decoding, paste-back) with the same seed. Reported per variant: the largest and
mean absolute difference of the final latents, their scale (largest |latent| in float32), and the largest and
mean pixel difference of the output frames. With random weights the UNet's output is noise-like, so these are an
upper bound of what trained weights give; they show whether bfloat16 is safe to serve, not lip-sync quality.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latentsync_core.loaders import load_models
from latentsync_core.pipeline import LipSyncPipeline


@dataclass
class PrecisionRow:
    variant: str
    frames: int
    faces: int
    max_latent_diff: float
    mean_latent_diff: float
    latent_scale: float
    max_pixel_diff: int
    mean_pixel_diff: float
    float32_s: float
    bfloat16_s: float


def run_window(
    models,
    variant: str,
    frames: np.ndarray,
    audio: np.ndarray,
    steps: int,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor | None, np.ndarray, int, float]:
    """(final latents, output frames, faces found, seconds) of the stream's first window."""
    stream = LipSyncPipeline(models, variant).stream(steps=steps, seed=seed, dtype=dtype, device=device)
    stream.set_audio(audio)
    start = time.perf_counter()
    with torch.no_grad():
        window = stream.prepare(frames)
        latents = stream.denoise(window)
        result = stream.finish(window, latents)
        result.apply(np.array(frames, copy=True))  # the regions into copies of the window's frames
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    latents = None if latents is None else latents.float().cpu()
    return latents, result.frames, int(result.face_found.sum()), time.perf_counter() - start


def compare(
    weights: Path,
    variants: list[str],
    frames: np.ndarray,
    audio: np.ndarray,
    steps: int,
    seed: int,
    device: torch.device,
    detector_dir: Path | None = None,
) -> list[PrecisionRow]:
    """Load the weights in float32, run each variant's window; again in bfloat16; compare."""
    options = {"model_dir": str(detector_dir)} if detector_dir else None
    runs: dict[tuple[str, torch.dtype], tuple] = {}
    for dtype in (torch.float32, torch.bfloat16):
        models = load_models(weights, "mediapipe", str(device), dtype, options)
        for variant in variants:
            runs[variant, dtype] = run_window(models, variant, frames, audio, steps, seed, dtype, device)
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = []
    for variant in variants:
        (lat32, out32, faces, s32), (lat16, out16, _, s16) = runs[variant, torch.float32], runs[variant, torch.bfloat16]
        if lat32 is None or lat16 is None:
            raise RuntimeError(f"{variant}: no face found in the window, nothing was denoised")
        latent_diff = (lat32 - lat16).abs()
        pixel_diff = np.abs(out32.astype(np.int16) - out16.astype(np.int16))
        rows.append(
            PrecisionRow(
                variant,
                len(frames),
                faces,
                float(latent_diff.max()),
                float(latent_diff.mean()),
                float(lat32.abs().max()),
                int(pixel_diff.max()),
                float(pixel_diff.mean()),
                s32,
                s16,
            )
        )
    return rows
