"""Convolutional parts of the LatentSync UNet: clip-wide GroupNorm, the "inflated" 2D ResNet block, down/upsampling.

Every module here works on a FRAME BATCH: the (b, c, f, h, w) clip tensor stored as (b*f, c, h, w), batch-major
(rows 0..f-1 are clip 0). Upstream applies its 2D convolutions per frame by rearranging to exactly this layout
and back around every conv; keeping the whole UNet in it removes those copies. Only the norms that upstream
applies to the 5-D tensor need the clip boundaries, so they take `num_frames`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish}


class ClipGroupNorm(nn.GroupNorm):
    """nn.GroupNorm as upstream applies it to a (b, c, f, h, w) clip: each group's statistics span all f frames.

    It runs the native kernel on a clip-major copy: two copies per norm, but bit-identical to upstream (a
    hand-fused version drifts by float32 rounding, which the tiny 2-element groups of small configs amplify
    past the parity tolerances). `per_frame=True` is upstream's `use_inflated_groupnorm` (plain 2D GroupNorm).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float, per_frame: bool = False):
        super().__init__(num_groups, num_channels, eps=eps)
        self.per_frame = per_frame

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        if self.per_frame:
            return super().forward(x)
        bf, c, h, w = x.shape
        clips = x.view(-1, num_frames, c, h, w).transpose(1, 2).contiguous()  # (b, c, f, h, w)
        out = F.group_norm(clips, self.num_groups, self.weight, self.bias, self.eps)
        return out.transpose(1, 2).reshape(bf, c, h, w)


class ResnetBlock3D(nn.Module):
    """Pre-norm ResNet block with timestep injection; convs per frame, GroupNorms across the clip's frames."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        groups: int = 32,
        eps: float = 1e-6,
        act_fn: str = "silu",
        output_scale_factor: float = 1.0,
        per_frame_norm: bool = False,
    ):
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = ClipGroupNorm(groups, in_channels, eps, per_frame_norm)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = ClipGroupNorm(groups, out_channels, eps, per_frame_norm)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = ACTIVATIONS[act_fn]()
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, num_frames: int) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x, num_frames)))
        # temb is per clip (b, C): broadcast it over that clip's frames.
        t = self.time_emb_proj(self.act(temb))[:, None, :, None, None]
        h = (h.unflatten(0, (-1, num_frames)) + t).flatten(0, 1)
        h = self.conv2(self.act(self.norm2(h, num_frames)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Downsample3D(nn.Module):
    """Stride-2 3x3 conv per frame."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3D(nn.Module):
    """Nearest spatial upsampling per frame to `size` (the matching skip connection's h, w), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
