"""DeepCache-style feature reuse for the LatentSync UNet (opt-in; a quality/speed trade-off).

Upstream's entry points enable `DeepCacheSDHelper(cache_interval=3, cache_branch_id=0)`: in every window the
full UNet runs on step indices 0, 3, 6, ...; on the other steps everything but the shallowest branch is reused
from the last full step. With branch 0 the fresh work of a reused step is: time embedding, conv_in, the LAST
layer of the final up block (ResNet, transformer, motion module) on [cached hidden state | fresh conv_in
skip], and the output head. This module computes exactly that from the model's own submodules, with no
monkey-patching.

The cache is per stream and per window (upstream restarts the step count in each window), so this wraps one
stream's in-process UNet. A Triton `unet` model batches windows of different streams at different steps and
would need the cached tensor per stream (two engines: a full UNet that also returns the cached feature and a
shallow one that takes it); docs/PERFORMANCE.md measures what that would gain.
"""
from __future__ import annotations

import torch

from .models.unet3d import UNet3DConditionModel


def _embed(unet: UNet3DConditionModel, sample: torch.Tensor, timestep, audio: torch.Tensor):
    """What every step computes first: frame-batch input after conv_in, time embedding, flat audio tokens."""
    b, _, f, h, w = sample.shape
    if unet.center_input_sample:
        sample = 2 * sample - 1.0
    audio = audio.flatten(0, 1) if audio.dim() == 4 else audio
    t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep, device=sample.device)
    temb = unet.time_embedding(unet.time_proj(t.to(sample.device).reshape(-1).expand(b)).to(sample.dtype))
    x = unet.conv_in(sample.transpose(1, 2).reshape(b * f, -1, h, w))
    return x, temb, audio, (b, f, h, w)


def _layer(block, i: int, x, skip, temb, audio, f: int):
    """Layer i of an up block: ResNet on [x | skip] -> [transformer] -> [motion module]."""
    x = block.resnets[i](torch.cat([x, skip], dim=1), temb, f)
    if block.attentions is not None:
        x = block.attentions[i](x, audio)
    if block.motion_modules is not None:
        x = block.motion_modules[i](x, f)
    return x


def _head(unet: UNet3DConditionModel, x, shape) -> torch.Tensor:
    b, f, h, w = shape
    x = unet.conv_out(unet.conv_act(unet.conv_norm_out(x, f)))
    return x.view(b, f, -1, h, w).transpose(1, 2).contiguous()


def full_step(unet: UNet3DConditionModel, sample, timestep, audio) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's forward (same result as `unet(sample, timestep, audio)`), plus the hidden state entering the
    last layer of the final up block (the feature reused by `cached_step`)."""
    x, temb, audio, shape = _embed(unet, sample, timestep, audio)
    f = shape[1]
    skips = [x]
    for block in unet.down_blocks:
        x, block_skips = block(x, temb, audio, f)
        skips += block_skips
    x = unet.mid_block(x, temb, audio, f)
    for block in unet.up_blocks[:-1]:
        n = len(block.resnets)
        block_skips, skips = skips[-n:], skips[:-n]
        x = block(x, block_skips, temb, audio, f, skips[-1].shape[-2:])
    last = unet.up_blocks[-1]
    for i in range(len(last.resnets) - 1):
        x = _layer(last, i, x, skips[-1 - i], temb, audio, f)
    cached = x
    x = _layer(last, len(last.resnets) - 1, x, skips[0], temb, audio, f)
    return _head(unet, x, shape), cached


def cached_step(unet: UNet3DConditionModel, sample, timestep, audio, cached: torch.Tensor) -> torch.Tensor:
    """A reused step: only conv_in, the final up block's last layer and the head run on the new input."""
    x, temb, audio, shape = _embed(unet, sample, timestep, audio)
    last = unet.up_blocks[-1]
    x = _layer(last, len(last.resnets) - 1, cached, x, temb, audio, shape[1])
    return _head(unet, x, shape)


class DeepCacheUNet:
    """A UNetFn `(sample, timesteps, audio) -> noise_pred` for ONE stream that reuses deep features.

    Step k of a window (k = 0, 1, ...) runs the full UNet when k % interval == 0. A window is recognised by
    its timesteps restarting (the sampler's timesteps decrease within a window) or the input shape changing.
    `interval=1` is the plain UNet.
    """

    def __init__(self, unet: UNet3DConditionModel, interval: int = 3):
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.unet, self.interval = unet, interval
        self.step = 0
        self.full_steps = 0  # counters for reports and tests
        self.cached_steps = 0
        self._cache: torch.Tensor | None = None
        self._last: tuple[int, torch.Size] | None = None

    def reset(self) -> None:
        self.step, self._cache, self._last = 0, None, None

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        t = int(torch.as_tensor(timesteps).reshape(-1)[0])
        if self._last is None or t >= self._last[0] or sample.shape != self._last[1]:
            self.step = 0  # a new window
        self._last = (t, sample.shape)
        if self.step % self.interval == 0 or self._cache is None:
            out, self._cache = full_step(self.unet, sample, timesteps, audio)
            self.full_steps += 1
        else:
            out = cached_step(self.unet, sample, timesteps, audio, self._cache)
            self.cached_steps += 1
        self.step += 1
        return out
