"""The in-process reference pipeline, and the per-stream logic the Triton orchestrator reuses.

`LipSyncStream` holds what upstream keeps per call (alignment smoothing, the one initial noise, the RNG, the
audio chunks) and turns one window of frames (<= 16) into synced frames. It reaches the models only through a
`ModelBackend`; `LocalModels` implements it with torch modules in this process (the oracle), and the `lipsync`
Triton model implements it with BLS calls to the other Triton models. The numerics in between are shared.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np
import torch

from . import audio as audio_features
from .configs import DEFAULT_GUIDANCE, DEFAULT_SEED, DEFAULT_STEPS, NUM_FRAMES, Variant, get_variant
from .denoise import WindowConditioning, denoise_window, frames_to_batch, initial_noise, mask_latents
from .face.align import FaceAligner, box_hw
from .face.mask import masked_face_inputs, mouth_mask
from .face.restore import paste_back, resize_face_to_box
from .samplers import make_sampler
from .vae import Posterior, sample_latents


@dataclass
class Detections:
    points: np.ndarray  # (n, 3, 2) float32: left eyebrow, right eyebrow, nose centre (upstream's 3 points)
    found: np.ndarray   # (n,) bool


class ModelBackend(Protocol):
    """The model calls of the pipeline; each is batchable across frames/windows/streams."""

    def detect(self, frames: np.ndarray) -> Detections: ...
    def encode_audio(self, mel_segments: torch.Tensor) -> torch.Tensor: ...  # (s,80,3000) -> (s,1500,L+1,C)
    def vae_posterior(self, pixels: torch.Tensor) -> Posterior: ...
    def unet(self, sample: torch.Tensor, timesteps: torch.Tensor, audio: torch.Tensor) -> torch.Tensor: ...
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor: ...
    def paste_back(self, frames: np.ndarray, faces: torch.Tensor, affines: np.ndarray) -> np.ndarray: ...


@dataclass
class WindowResult:
    frames: np.ndarray      # (n, H, W, 3) uint8
    indices: np.ndarray     # (n,) int64 frame index in the stream
    face_found: np.ndarray  # (n,) bool


class LipSyncStream:
    """One video stream: call `set_audio` once, then `process` windows of frames in order."""

    def __init__(self, backend: ModelBackend, variant: str | Variant = "1.5", steps: int = DEFAULT_STEPS,
                 guidance: float = DEFAULT_GUIDANCE, seed: int = DEFAULT_SEED, mask: np.ndarray | None = None,
                 dtype: torch.dtype = torch.float32):
        self.backend = backend
        self.variant = variant if isinstance(variant, Variant) else get_variant(variant)
        if guidance < 1.0:
            raise ValueError(f"guidance must be >= 1 (1 disables guidance), got {guidance}")
        self.steps, self.guidance, self.dtype = int(steps), float(guidance), dtype
        self.scheduler = make_sampler("ddim", self.steps)
        self.aligner = FaceAligner(self.variant.resolution)
        self.mask = mouth_mask(self.variant.resolution) if mask is None else mask
        self.generator = torch.Generator().manual_seed(int(seed))
        self.latent_hw = (self.variant.latent_size, self.variant.latent_size)
        # Drawn first, as upstream's prepare_latents runs before any VAE posterior sample.
        self.noise = initial_noise(self.generator, self.latent_hw)
        self.chunks: torch.Tensor | None = None
        self.next_index = 0

    @property
    def num_frames(self) -> int:
        return 0 if self.chunks is None else len(self.chunks)

    def set_audio(self, samples: np.ndarray) -> int:
        """Whole 16 kHz track -> per-frame whisper chunks; returns the number of output frames (upstream's count)."""
        mel = audio_features.log_mel_spectrogram(samples)
        features = audio_features.encode_features(self.backend.encode_audio, mel)
        self.chunks = torch.as_tensor(audio_features.feature_chunks(features))
        return self.num_frames

    def process(self, frames: np.ndarray) -> WindowResult:
        """Synced frames for the next window (n <= 16 frames, RGB uint8). Frames without a face pass through."""
        if self.chunks is None:
            raise RuntimeError("set_audio() must be called before process()")
        n = len(frames)
        if not 0 < n <= NUM_FRAMES:
            raise ValueError(f"a window holds 1..{NUM_FRAMES} frames, got {n}")
        indices = np.arange(self.next_index, self.next_index + n, dtype=np.int64)
        if indices[-1] >= self.num_frames:
            raise ValueError(f"frame {indices[-1]} is past the audio's {self.num_frames} frames")
        self.next_index += n
        det = self.backend.detect(frames)
        out = frames.copy()
        found = np.flatnonzero(det.found)
        if len(found):
            aligned = [self.aligner.align(frames[i], det.points[i]) for i in found]
            faces = np.stack([a.face for a in aligned])
            affines = np.stack([a.affine for a in aligned])
            synced = self._generate(faces, self.chunks[indices[found]])
            out[found] = self.backend.paste_back(frames[found], synced, affines)
        return WindowResult(out, indices, det.found.astype(bool))

    def _generate(self, faces: np.ndarray, audio: torch.Tensor) -> torch.Tensor:
        """Aligned faces (f, R, R, 3) uint8 -> composited faces (f, 3, R, R) float in [-1, 1]."""
        ref, masked, masks = masked_face_inputs(faces, self.mask)
        dt = self.dtype
        post_masked = self.backend.vae_posterior(masked.to(dt))
        post_ref = self.backend.vae_posterior(ref.to(dt))
        cond = WindowConditioning(
            mask=mask_latents(masks, self.latent_hw).to(dt),
            masked=frames_to_batch(sample_latents(post_masked, self.generator)),
            reference=frames_to_batch(sample_latents(post_ref, self.generator)),
            audio=audio.to(dt),
        )
        latents = self.noise.repeat(1, 1, len(faces), 1, 1).to(dt)
        latents = denoise_window(self.backend.unet, latents, cond, self.scheduler, self.guidance)
        decoded = self.backend.vae_decode(latents[0].transpose(0, 1))
        # Only the masked mouth region comes from the diffusion output (mask 1 = keep the original pixels).
        masks = masks.to(decoded.dtype)
        return decoded * (1 - masks) + ref.to(decoded.dtype) * masks


class LocalModels:
    """ModelBackend with every model in this process (the reference the Triton deployment must match)."""

    def __init__(self, unet, whisper, codec, detector=None, device: str = "cpu"):
        self.unet_model, self.whisper, self.codec, self.detector = unet, whisper, codec, detector
        self.device = torch.device(device)

    def detect(self, frames):
        if self.detector is None:
            raise RuntimeError("no face detector configured")
        res = self.detector.detect(frames)
        return Detections(res.points.astype(np.float32), res.found.astype(bool))

    @torch.no_grad()
    def encode_audio(self, mel_segments):
        return self.whisper(mel_segments.to(self.device, self._dtype(self.whisper))).float().cpu()

    @torch.no_grad()
    def vae_posterior(self, pixels):
        # contiguous, as a server receives every tensor: oneDNN's result depends on the memory layout (~1e-3
        # on a VAE posterior), and the Triton deployment must reproduce this oracle exactly.
        return self.codec.posterior(pixels.to(self.device, self.codec.dtype).contiguous())

    @torch.no_grad()
    def unet(self, sample, timesteps, audio):
        dt = self._dtype(self.unet_model)
        return self.unet_model(sample.to(self.device, dt), timesteps.to(self.device), audio.to(self.device, dt))

    @torch.no_grad()
    def vae_decode(self, latents):
        return self.codec.decode(latents.to(self.device, self.codec.dtype).contiguous()).float().cpu()

    def paste_back(self, frames, faces, affines):
        resized = resize_face_to_box(faces.float(), box_hw(faces.shape[-1]))
        return paste_back(frames, resized, affines)

    @staticmethod
    def _dtype(module) -> torch.dtype:
        return next(module.parameters()).dtype


class LipSyncPipeline:
    """Video frames + 16 kHz audio in, synced frames out, window by window (bounded memory)."""

    def __init__(self, models: LocalModels, variant: str = "1.5"):
        self.models, self.variant = models, get_variant(variant)

    @classmethod
    def from_weights(cls, weights: str | Path, variant: str = "1.5", detector: str = "mediapipe",
                     device: str = "cpu", dtype: torch.dtype = torch.float32) -> "LipSyncPipeline":
        from .weights import load_models

        return cls(load_models(weights, detector=detector, device=device, dtype=dtype), variant)

    def stream(self, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, seed=DEFAULT_SEED, **kw) -> LipSyncStream:
        return LipSyncStream(self.models, self.variant, steps, guidance, seed, **kw)

    def __call__(self, frames: Iterable[np.ndarray], samples: np.ndarray, **params) -> Iterator[WindowResult]:
        """Frames beyond the audio's frame count are dropped (the caller loops a short video, as upstream)."""
        stream = self.stream(**params)
        total = stream.set_audio(samples)
        window: list[np.ndarray] = []
        for i, frame in enumerate(frames):
            if i >= total:
                break
            window.append(frame)
            if len(window) == NUM_FRAMES:
                yield stream.process(np.stack(window))
                window = []
        if window:
            yield stream.process(np.stack(window))
