"""LatentSync's denoising loop per 16-frame window: DDIM + classifier-free guidance on 13-channel input.

The UNet is a callable `unet(sample, timesteps, audio) -> noise_pred`. A window's loop is a `WindowJob`;
`step` advances any number of jobs, each at its own step, with as few UNet forwards as their shapes allow
(iteration-level batching): the in-process pipeline runs one job to its end (`denoise_window`), the Triton
`denoiser` model keeps the windows of every stream in flight and admits new ones between steps.
  sample    (b, 13, f, h, w)  channels [noisy latents 4 | mask 1 | masked-face latents 4 | reference latents 4]
  timesteps (b,) int64        one per batch item (different streams may be at different steps on a server)
  audio     (b, f, 50, 384)   whisper chunks; with guidance the unconditional item is all-zero audio, FIRST
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .configs import DEFAULT_GUIDANCE, DEFAULT_STEPS, SAMPLERS
from .deepcache import deepcache_plan, deepcache_step

UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Sampler = Any  # DDIMScheduler or samplers.MultistepSampler: timesteps, scale_model_input, step


@dataclass(frozen=True)
class DenoiseSpec:
    """How a stream's windows are denoised; upstream's recipe is 20 DDIM steps with guidance 1.5."""

    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    sampler: str = "ddim"
    deepcache: int = 0  # DeepCache interval: the full UNet every k-th step of a window (0 = off)

    def __post_init__(self):
        if not 1 <= int(self.steps) <= 1000:
            raise ValueError(f"steps must be in 1..1000, got {self.steps}")
        if not self.guidance >= 1.0:
            raise ValueError(f"guidance must be >= 1 (1 disables guidance), got {self.guidance}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {', '.join(SAMPLERS)}")
        if self.deepcache < 0:
            raise ValueError(f"deepcache must be >= 0 (0 = off), got {self.deepcache}")

    def sampler_for_window(self):
        """A fresh sampler: every window starts from noise, and a multistep sampler's history with it."""
        from .samplers import make_sampler  # diffusers' schedulers: only where windows are denoised

        return make_sampler(self.sampler, self.steps)

    def job(self, latents: torch.Tensor, cond: WindowConditioning, **kw) -> WindowJob:
        """One window's loop under this spec."""
        return WindowJob(latents, cond, self.sampler_for_window(), self.guidance, self.deepcache, **kw)


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

    def to(self, device: torch.device | str, dtype: torch.dtype) -> WindowConditioning:
        return WindowConditioning(*(t.to(device, dtype) for t in (self.mask, self.masked, self.reference, self.audio)))

    def unet_input(self, latents: torch.Tensor, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (sample (b,13,f,h,w), audio (b,f,50,384)) with b = 2 under guidance [uncond, cond]."""
        sample = torch.cat([latents, self.mask, self.masked, self.reference], dim=1)
        audio = self.audio.unsqueeze(0)
        if guided:
            sample = torch.cat([sample, sample])
            audio = torch.cat([torch.zeros_like(audio), audio])
        return sample, audio


@dataclass(eq=False)
class WindowJob:
    """One window's denoising loop, advanced a step at a time by `step`, alone or batched with other windows.

    The latents stay float32 for the sampler (as upstream's float32 path); the UNet sees them in the
    conditioning's dtype. The sampler is this window's own: DPM-Solver++ keeps a history per window.
    """

    latents: torch.Tensor  # (1, 4, f, h, w)
    cond: WindowConditioning
    sampler: Sampler
    guidance: float
    deepcache: int = 0  # DeepCache interval (0 = every step runs the full UNet)
    trace: Callable[[int, dict], None] | None = None
    index: int = 0  # steps done
    features: list[torch.Tensor] | None = None  # DeepCache: the items' features of the last full step

    @property
    def guided(self) -> bool:
        return self.guidance > 1.0

    @property
    def done(self) -> bool:
        return self.index >= len(self.sampler.timesteps)

    @property
    def frames(self) -> int:
        return self.latents.shape[2]

    def cached_features(self) -> list[torch.Tensor | None]:
        """Per UNet item: the feature a DeepCache step reuses, or None where this step runs the full UNet."""
        full = not self.deepcache or self.features is None or deepcache_plan(self.index, self.deepcache)
        return [None] * (2 if self.guided else 1) if full else self.features

    def unet_input(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample (b,13,f,h,w), timesteps (b,), audio (b,f,50,384)) of this window's next step."""
        t = self.sampler.timesteps[self.index]
        latents = self.sampler.scale_model_input(self.latents, t).to(self.cond.mask.dtype)
        sample, audio = self.cond.unet_input(latents, self.guided)
        return sample, torch.full((len(sample),), int(t), dtype=torch.int64, device=sample.device), audio

    def advance(self, noise_pred: torch.Tensor, unet_input: torch.Tensor | None = None) -> None:
        """Guidance and the sampler update from this window's UNet output, on the latents' device."""
        t = self.sampler.timesteps[self.index]
        eps = noise_pred.to(self.latents.dtype)
        if self.guided:
            uncond, audio_pred = eps.chunk(2)
            eps = uncond + self.guidance * (audio_pred - uncond)
        self.latents = self.sampler.step(eps, t, self.latents, eta=0.0).prev_sample
        if self.trace is not None:
            self.trace(
                self.index, {"t": int(t), "unet_input": unet_input, "noise_pred": noise_pred, "latents": self.latents}
            )
        self.index += 1


def step(unet: UNetFn, jobs: Sequence[WindowJob]) -> int:
    """Advance every job by one step. Windows of equal frame count share one UNet forward (guided windows give
    two items each); with DeepCache the items at a full step and those reusing a feature run as two sub-batches
    (only a UNet module has the pieces for that; a plain callable runs every step in full). Returns the number
    of UNet calls."""
    groups: dict[int, list[WindowJob]] = {}
    for job in jobs:
        groups.setdefault(job.frames, []).append(job)
    calls = 0
    for group in groups.values():
        inputs = [job.unet_input() for job in group]
        sample, timesteps, audio = (torch.cat(parts) if len(group) > 1 else parts[0] for parts in zip(*inputs))
        sizes = [len(i[0]) for i in inputs]
        if any(job.deepcache for job in group) and hasattr(unet, "embed"):
            cached = [f for job in group for f in job.cached_features()]
            noise_pred, features = deepcache_step(unet, sample, timesteps, audio, cached)
            calls += any(f is None for f in cached) + any(f is not None for f in cached)
            for job, start, n in zip(group, itertools.accumulate([0, *sizes]), sizes):
                job.features = features[start : start + n] if job.deepcache else None
        else:
            noise_pred = unet(sample, timesteps, audio)
            calls += 1
        for job, (own, _, _), pred in zip(group, inputs, noise_pred.split(sizes)):
            job.advance(pred, own)
    return calls


def denoise_window(
    unet: UNetFn,
    latents: torch.Tensor,
    cond: WindowConditioning,
    sampler: Sampler,
    guidance: float,
    callback: Callable[[int, dict], None] | None = None,
    deepcache: int = 0,
) -> torch.Tensor:
    """Run every timestep of `sampler` on one window; returns the final (1, 4, f, h, w) latents."""
    job = WindowJob(latents, cond, sampler, guidance, deepcache, trace=callback)
    while not job.done:
        step(unet, [job])
    return job.latents
