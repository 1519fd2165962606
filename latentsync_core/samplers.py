"""Samplers for the denoising loop: upstream's DDIM (the default) and DPM-Solver++ (fewer steps, opt-in).

`make_sampler(name, steps)` returns an object with the interface `denoise.denoise_window` uses (`timesteps`,
`scale_model_input`, `step(eps, t, latents, eta=...)`); it is the one place that builds upstream's DDIM.

DPM-Solver++ is a multistep solver: it keeps the previous model outputs. LatentSync denoises every 16-frame
window from fresh noise, so that history must start empty in every window: `MultistepSampler` resets it
whenever a window starts again at the first timestep.

Trade-off (documented in docs/PERFORMANCE.md): DPM-Solver++ at 10 steps costs half the UNet time of DDIM at
20 steps; its output differs from upstream's DDIM output (it is a different sampler, not a faster DDIM).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from .configs import SAMPLERS, SCHEDULER_CONFIG  # noqa: F401 - SAMPLERS: the names clients may ask for


class MultistepSampler:
    """A diffusers multistep scheduler whose solver history restarts with every window."""

    def __init__(self, scheduler: DPMSolverMultistepScheduler, steps: int):
        self.scheduler, self.steps = scheduler, steps
        scheduler.set_timesteps(steps)

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    @property
    def config(self):
        return self.scheduler.config

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        return self.scheduler.scale_model_input(sample, timestep)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0, **kwargs):
        """`eta` is accepted for DDIM's call signature; DPM-Solver++ is deterministic (eta 0) anyway."""
        if int(timestep) == int(self.timesteps[0]) and self.scheduler.step_index not in (None, 0):
            self.scheduler.set_timesteps(self.steps)  # a new window: forget the previous window's outputs
        return self.scheduler.step(model_output, timestep, sample, **kwargs)


def make_sampler(name: str = "ddim", steps: int = 20):
    """'ddim': upstream's configs/scheduler_config.json ('leading' spacing: 951, 901, ..., 1 for 20 steps; the
    loop passes eta 0); 'dpmsolver++': 2nd-order DPM-Solver++ on the same noise schedule (its own default
    linspace spacing, lower-order final steps)."""
    if not 1 <= int(steps) <= 1000:
        raise ValueError(f"steps must be in 1..1000, got {steps}")
    if name == "ddim":
        scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
        scheduler.set_timesteps(int(steps))
        return scheduler
    if name == "dpmsolver++":
        config = {
            k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("clip_sample", "set_alpha_to_one", "skip_prk_steps")
        }
        scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
        return MultistepSampler(scheduler, int(steps))
    raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
