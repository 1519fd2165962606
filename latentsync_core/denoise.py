"""One 16-frame window of LatentSync's denoising loop: a sampler (upstream's DDIM from samplers.make_sampler)
+ classifier-free guidance on 13-channel input.

The UNet is passed in as a callable `unet(sample, timesteps, audio) -> noise_pred` so the same loop runs
in-process (torch module) and in the Triton orchestrator (a BLS call to the `unet` model).
  sample    (b, 13, f, h, w)  channels [noisy latents 4 | mask 1 | masked-face latents 4 | reference latents 4]
  timesteps (b,) int64        one per batch item (different streams may be at different steps on a server)
  audio     (b, f, 50, 384)   whisper chunks; with guidance the unconditional item is all-zero audio, FIRST
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def initial_noise(generator: torch.Generator, latent_hw: tuple[int, int], dtype=torch.float32) -> torch.Tensor:
    """(1, 4, 1, h, w): upstream draws ONE noise frame per video and repeats it over every frame."""
    return torch.randn((1, 4, 1, *latent_hw), generator=generator, dtype=dtype)


def mask_latents(masks: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(f, 1, R, R) pixel mask -> (1, 1, f, h, w), nearest-neighbour as upstream's F.interpolate default."""
    small = F.interpolate(masks, size=latent_hw)
    return small.transpose(0, 1).unsqueeze(0)


def frames_to_batch(latents: torch.Tensor) -> torch.Tensor:
    """(f, c, h, w) per-frame latents -> (1, c, f, h, w)."""
    return latents.transpose(0, 1).unsqueeze(0)


@dataclass
class WindowConditioning:
    """Everything but the noisy latents, per window; each (1, c, f, h, w) with c = 1, 4, 4."""

    mask: torch.Tensor
    masked: torch.Tensor
    reference: torch.Tensor
    audio: torch.Tensor  # (f, 50, 384)

    def unet_input(self, latents: torch.Tensor, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (sample (b,13,f,h,w), audio (b,f,50,384)) with b = 2 under guidance [uncond, cond]."""
        sample = torch.cat([latents, self.mask, self.masked, self.reference], dim=1)
        audio = self.audio.unsqueeze(0)
        if guided:
            sample = torch.cat([sample, sample])
            audio = torch.cat([torch.zeros_like(audio), audio])
        return sample, audio


def denoise_window(unet: UNetFn, latents: torch.Tensor, cond: WindowConditioning, scheduler,
                   guidance: float, callback: Callable[[int, dict], None] | None = None) -> torch.Tensor:
    """Run every timestep of `scheduler` (a samplers.make_sampler object) on one window; returns the final
    (1, 4, f, h, w) latents."""
    guided = guidance > 1.0
    for i, t in enumerate(scheduler.timesteps):
        sample, audio = cond.unet_input(scheduler.scale_model_input(latents, t), guided)
        timesteps = torch.full((sample.shape[0],), int(t), dtype=torch.int64)
        noise_pred = unet(sample, timesteps, audio)
        eps = noise_pred
        if guided:
            uncond, audio_pred = noise_pred.chunk(2)
            eps = uncond + guidance * (audio_pred - uncond)
        latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
        if callback is not None:
            callback(i, {"t": int(t), "unet_input": sample, "noise_pred": noise_pred, "latents": latents})
    return latents
