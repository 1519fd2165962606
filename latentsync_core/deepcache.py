"""DeepCache feature reuse for the LatentSync UNet (opt-in; a quality/speed trade-off), equal to the DeepCache
library that upstream's entry points enable: `DeepCacheSDHelper(cache_interval=3, cache_branch_id=0)`
(PyPI DeepCache 0.1.1; tests/test_deepcache_parity.py runs that library on this UNet and compares).

Which steps are full: the library takes step k as the position of t in `scheduler.timesteps`, so k restarts
at 0 in every window (every window runs the whole schedule); step k runs the full UNet when (k - k0) % interval
== 0, k0 being the step of the first UNet call after enable() (0 in LatentSync): `deepcache_plan`. With 20 steps
that is 0, 3, 6, ..., 18: 7 full and 13 cached steps per window.

What a full step does: the whole UNet, and it keeps the hidden state entering the final up block's last layer
(the "feature", (b*f, C0, h, w) with C0 = block_out_channels[0]).

What a cached step does, in the library (branch 0 on upstream's UNet): the UNet's own forward runs the time
embedding, conv_in and the head (conv_norm_out, SiLU, conv_out); every down block, the mid block and every up
block but the final one return their outputs stored at the last full step; in the final up block, the ResNets
and transformers of all layers but the last return stored outputs, the motion modules after them (which the
library does not wrap) run again on those stored outputs and so give the stored result once more, and the last
layer runs: ResNet on [feature | fresh conv_in output] with the fresh time embedding, transformer (audio
cross-attention), motion module. Here a cached step runs only that fresh work, from the UNet's own pieces:
`embed` (time embedding, conv_in), `last_layer` on the stored feature, `head`. Same values; nothing re-run.

Every function here takes a batch of several windows (b items of f frames; with guidance a window is two items,
[unconditional, audio]); features are frame batches, item j's rows j*f..(j+1)*f-1, so a caller can split and
concatenate them per item along dim 0. `deepcache_step` serves a batch whose items are at different steps
(windows of different streams); denoise.WindowJob keeps each window's features between its steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:  # type hints only: the orchestrator imports this module (through denoise) without the UNet
    from .models.unet3d import UNet3DConditionModel


def deepcache_plan(step_index: int, interval: int) -> bool:
    """True when step `step_index` of a window (0-based, counted from the window's first step) runs the full
    UNet; False when it reuses the feature of the window's last full step. interval 1 = always full."""
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    return step_index % interval == 0


def full_step(
    unet: UNet3DConditionModel,
    sample: torch.Tensor,
    timestep,
    audio: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`unet(sample, timestep, audio)` (the same result, bit for bit) and the feature: the hidden state entering
    the final up block's last layer, (b*f, C0, h, w)."""
    x, temb, audio, shape = unet.embed(sample, timestep, audio)
    f = shape[1]
    deep, skips = unet.encode(x, temb, audio, f)
    feature = unet.decode(deep, skips, temb, audio, f, stop_before_last_layer=True)
    return unet.head(unet.last_layer(feature, x, temb, audio, f), shape), feature


def cached_step(
    unet: UNet3DConditionModel, sample: torch.Tensor, timestep, audio: torch.Tensor, feature: torch.Tensor
) -> torch.Tensor:
    """A reused step: time embedding, conv_in, the final up block's last layer on [feature | conv_in output],
    head. `feature` (b*f, C0, h, w) comes from full_step on the same items."""
    x, temb, audio, shape = unet.embed(sample, timestep, audio)
    return unet.head(unet.last_layer(feature, x, temb, audio, shape[1]), shape)


def deepcache_step(
    unet: UNet3DConditionModel,
    sample: torch.Tensor,
    timesteps,
    audio: torch.Tensor,
    features: Sequence[torch.Tensor | None],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One step for b items that may be at different steps of their windows: item j runs the full UNet where
    features[j] is None (the caller decides with deepcache_plan), else a cached step on features[j] (f, C0, h, w).

    sample (b, c_in, f, h, w); timesteps (b,), one per item, or one for all; audio (b, f, 50, 384) or
    (b*f, 50, 384). Returns (noise_pred (b, c_out, f, h, w), every item's feature: new for full items, the
    given one for the others). At most two UNet calls: the full items together, the cached items together.
    """
    b, f = sample.shape[0], sample.shape[2]
    if len(features) != b:
        raise ValueError(f"need one feature (or None) per item: {len(features)} for {b} items")
    timesteps = torch.as_tensor(timesteps, device=sample.device).reshape(-1).expand(b)
    audio = audio.reshape(b, f, *audio.shape[-2:])
    full = [j for j in range(b) if features[j] is None]
    reuse = [j for j in range(b) if features[j] is not None]
    features, preds = list(features), []
    if full:
        pred, new = full_step(unet, *_items((sample, timesteps, audio), full, b))
        preds.append(pred)
        for j, feature in zip(full, new.split(f)):
            features[j] = feature
    if reuse:
        preds.append(
            cached_step(unet, *_items((sample, timesteps, audio), reuse, b), torch.cat([features[j] for j in reuse]))
        )
    if not (full and reuse):
        return preds[0], features
    position = {item: k for k, item in enumerate(full + reuse)}
    return _rows(torch.cat(preds), [position[j] for j in range(b)]), features


def _items(tensors, index: list[int], b: int):
    """The rows `index` of every tensor (no copy when that is all of them, in order)."""
    if index == list(range(b)):
        return tensors
    return tuple(_rows(t, index) for t in tensors)


def _rows(t: torch.Tensor, index: list[int]) -> torch.Tensor:
    """t[index] as slices of its runs of consecutive rows: an index tensor made from a Python list on a GPU is a
    copy from host memory that waits for all the work queued before it (the UNet step of the other items)."""
    runs, start = [], 0
    for k in range(1, len(index) + 1):
        if k == len(index) or index[k] != index[k - 1] + 1:
            runs.append(t[index[start] : index[k - 1] + 1])
            start = k
    return runs[0] if len(runs) == 1 else torch.cat(runs)
